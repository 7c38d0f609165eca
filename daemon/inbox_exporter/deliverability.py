"""Did the test email pass SPF, DKIM and DMARC where it landed? The receiving server's verdict,
read from the `Authentication-Results` header (RFC 8601) of the delivered probe mail.

Only a header the receiving side wrote is believed: the topmost one whose authserv-id is one the
inbox trusts (`delivery.authserv_id`, or its provider's preset). A sender can put any header in
its message; a receiving server adds its own above those (and should remove forged ones with
its id). Without a configured or preset id, the topmost header is taken: the mailbox's own
server writes last. A message that was forwarded may carry the first receiver's verdict only in
`ARC-Authentication-Results` (RFC 8617): used when no trusted Authentication-Results is there.

Parsing is the `authres` package's (the RFC 8601 grammar, as used by dkimpy), not ours. Exchange
Online writes its header without an authserv-id (`spf=pass (...) ...; dkim=...; dmarc=...`):
such a header is read under the id "" (what the Microsoft presets trust).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import authres

METHODS = ("spf", "dkim", "dmarc")
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
# What verifiers write beyond RFC 8601's words, in the closed set the metric allows.
_ALIASES = {"hardfail": "fail", "policy": "fail", "bestguesspass": "pass", "invalid": "permerror"}
_ARC_INSTANCE = re.compile(r"^\s*i\s*=\s*(\d+)\s*;")


@dataclass(frozen=True)
class Verdict:
    """One method's result per method ("none" when the header did not say), the header's own
    reason text, and whose header it was."""

    results: dict[str, str] = field(default_factory=lambda: dict.fromkeys(METHODS, "none"))
    reasons: dict[str, str] = field(default_factory=dict)  # method -> `dkim=fail reason="..."`
    authserv_id: str | None = None  # None: no trusted header: nothing was verified
    source: str | None = None  # "Authentication-Results" or "ARC-Authentication-Results"

    @property
    def failed(self) -> bool:
        """DMARC failed, or neither SPF nor DKIM passed where they were checked: mail that a
        receiver enforcing DMARC, or filtering on SPF/DKIM, sends to spam or rejects."""
        r = self.results
        if r["dmarc"] == "fail":
            return True
        checked = [r[m] for m in ("spf", "dkim") if r[m] != "none"]
        return bool(checked) and "pass" not in checked

    def summary(self) -> str:
        """`spf=pass dkim=fail (signature verification failed) dmarc=fail` for details."""
        if self.authserv_id is None:
            return "no Authentication-Results from a trusted server"
        parts = []
        for m in METHODS:
            reason = self.reasons.get(m)
            parts.append(f"{m}={self.results[m]}" + (f" ({reason})" if reason else ""))
        return " ".join(parts) + f" [{self.source} by {self.authserv_id or 'unnamed server'}]"


NO_VERDICT = Verdict()


def read_verdict(auth_results: Sequence[str], arc_results: Sequence[str] = (),
                 trusted: Iterable[str] | None = None) -> Verdict:
    """The verdict from a message's header values, topmost first. `trusted`: authserv-ids to
    believe (case-insensitive); None believes the topmost header's id.

    A receiver may write one header per verifier (Postfix with OpenDMARC, OpenDKIM and an SPF
    policy service writes three, all with its id): the trusted headers are merged, the topmost
    result of each method winning, so a header further down cannot overrule the receiver's."""
    parsed = [p for p in map(_parse, auth_results) if p is not None]
    ids = ({t.lower() for t in trusted} if trusted is not None
           else {parsed[0][0].lower()} if parsed else set())
    mine = [p for p in parsed if p[0].lower() in ids]
    if mine:
        return _verdict(mine, source="Authentication-Results")
    arcs = sorted(((int(m.group(1)), _ARC_INSTANCE.sub("", v, count=1))
                   for v in arc_results if (m := _ARC_INSTANCE.match(v))), reverse=True)
    for _, value in arcs:  # the highest instance: the last hop that sealed the chain
        arc = _parse(value)
        if arc is not None and (trusted is None or arc[0].lower() in ids):
            return _verdict([arc], source="ARC-Authentication-Results")
    return NO_VERDICT


def _parse(value: str) -> tuple[str, list] | None:
    text = " ".join(value.split())
    head = text.split(";", 1)[0]
    if "=" in head:  # Exchange Online: no authserv-id before the first result
        text = "unnamed; " + text
    try:
        header = authres.AuthenticationResultsHeader.parse(f"Authentication-Results: {text}")
    except authres.core.AuthResError:
        return None
    authserv_id = "" if header.authserv_id == "unnamed" and "=" in head else header.authserv_id
    return authserv_id, list(header.results)


def _verdict(headers: list[tuple[str, list]], source: str) -> Verdict:
    out: dict[str, str | None] = dict.fromkeys(METHODS)
    reasons: dict[str, str] = {}
    for _, results in headers:
        seen_here: set[str] = set()
        for r in results:
            method = str(r.method).lower()
            if method not in out:
                continue
            if out[method] is not None and method not in seen_here:
                continue  # a header higher up already said: it wins
            if out[method] == "pass":
                continue  # one passing DKIM signature is enough (several may be checked)
            seen_here.add(method)
            value = str(r.result).lower()
            out[method] = _ALIASES.get(value, value if value in RESULTS else "none")
            if r.reason:
                reasons[method] = str(r.reason)
            else:
                reasons.pop(method, None)
    results_ = {m: v or "none" for m, v in out.items()}
    return Verdict(results_, reasons, headers[0][0], source)


# Where the presets' mail lands and who writes the header there.
PRESET_AUTHSERV_IDS: dict[str, tuple[str, ...]] = {
    "gmail": ("mx.google.com",),
    "outlook": ("",),  # Exchange Online writes no authserv-id
    "microsoft365": ("",),
}


def hint(verdict: Verdict, from_domain: str) -> str:
    """What to fix, in the order a postmaster would look."""
    r, steps = verdict.results, []
    if r["spf"] in ("fail", "softfail", "none", "permerror"):
        steps.append(f"add the sending provider to the SPF record of {from_domain} (a TXT "
                     "record starting v=spf1; include the provider's SPF domain)")
    if r["dkim"] != "pass":
        steps.append(f"publish the provider's DKIM key for {from_domain} (selector._domainkey "
                     "TXT or CNAME records from the provider's admin console) and turn signing on")
    if r["dmarc"] == "fail":
        steps.append(f"align the From domain: SPF (envelope sender) or DKIM (d=) must be "
                     f"{from_domain} or a subdomain, as its DMARC record requires")
    return ("Receivers will send this inbox's mail to spam or reject it: "
            + "; ".join(steps or ["check the domain's SPF, DKIM and DMARC records"]) + ".")
