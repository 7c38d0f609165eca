"""Did the test email pass SPF, DKIM and DMARC where it landed? The receiving server's verdict,
read from the `Authentication-Results` header (RFC 8601) of the delivered probe mail.

Only headers the receiving hop wrote are believed. A sender can put any header in its message,
and a receiving server adds its own above those (and should remove forged ones with its id,
RFC 8601 section 5). So: the topmost header whose authserv-id the inbox trusts
(`delivery.authserv_id`, or its provider's preset; without either, the topmost header's id: the
mailbox's own server writes last), and below it only the trusted headers up to the next
`Received:` field, the hop boundary: a receiver may write one header per verifier (Postfix with
OpenDMARC, OpenDKIM and an SPF policy service writes three, above its own `Received:`; Gmail
writes one, just below its own), while a header the sender carried in sits below the receiver's
`Received:`. An unreadable topmost trusted header ends the search: nothing lower stands in for
the receiver. A forwarded message may carry the verdict only in `ARC-Authentication-Results`
(RFC 8617): used when no trusted Authentication-Results is there, the highest instance whose
authserv-id is trusted.

Parsing is the `authres` package's (the RFC 8601 grammar, as used by dkimpy), not ours. Exchange
Online writes its header without an authserv-id (`spf=pass (...) ...; dkim=...; dmarc=...`):
such a header is read under the id "" (what the Microsoft presets trust).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import authres

METHODS = ("spf", "dkim", "dmarc")
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
# What verifiers write beyond RFC 8601's words, in the closed set the metric allows.
_ALIASES = {"hardfail": "fail", "policy": "fail", "bestguesspass": "pass", "invalid": "permerror"}
_ARC_INSTANCE = re.compile(r"^\s*i\s*=\s*(\d+)\s*;")
AR, ARC = "Authentication-Results", "ARC-Authentication-Results"


@dataclass(frozen=True)
class Verdict:
    """One method's result per method ("none" when the header did not say), the header's own
    reason text, and whose header it was."""

    results: dict[str, str] = field(default_factory=lambda: dict.fromkeys(METHODS, "none"))
    reasons: dict[str, str] = field(default_factory=dict)  # method -> `dkim=fail reason="..."`
    authserv_id: str | None = None  # None: no trusted header: nothing was verified
    source: str | None = None  # "Authentication-Results" or "ARC-Authentication-Results"
    unreadable: bool = False  # the trusted header is there, but could not be parsed

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
        by = f"{self.source} by {self.authserv_id or 'unnamed server'}"
        if self.unreadable:
            return f"the receiver's header could not be read [{by}]"
        parts = []
        for m in METHODS:
            reason = self.reasons.get(m)
            parts.append(f"{m}={self.results[m]}" + (f" ({reason})" if reason else ""))
        return " ".join(parts) + f" [{by}]"


NO_VERDICT = Verdict()


@dataclass(frozen=True)
class _Header:
    """One Authentication-Results (or ARC-Authentication-Results) field, parsed."""

    authserv_id: str | None  # None: not even the id could be read
    results: list | None  # None: the field could not be parsed
    rank: int  # Authentication-Results: Received fields above it; ARC: its instance


def read_header(fields: Iterable[tuple[str, str]],
                trusted: Iterable[str] | None = None) -> Verdict:
    """The verdict from a message's header fields, (name, value) in their order, topmost first;
    fields other than Received, Authentication-Results and ARC-Authentication-Results are
    ignored. `trusted`: authserv-ids to believe (case-insensitive); None believes the topmost
    Authentication-Results' id."""
    hop, found, arcs = 0, [], []
    for name, value in fields:
        kind = name.strip().lower()
        if kind == "received":
            hop += 1
        elif kind == AR.lower():
            found.append(_parse(value, hop))
        elif kind == ARC.lower() and (m := _ARC_INSTANCE.match(value)):
            arcs.append(_parse(value[m.end():], int(m.group(1))))
    # Without a configured id, an unreadable topmost header's id (None) is the one trusted, so
    # that header still ends the search below.
    ids = ({t.lower() for t in trusted} if trusted is not None
           else {found[0].authserv_id} if found else set())
    top = next((h for h in found if h.authserv_id in ids), None)
    if top is not None:
        # the trusted headers of the topmost one's hop: none above it is trusted
        return _verdict([h for h in found if h.rank == top.rank and h.authserv_id in ids],
                        source=AR)
    arc = max((h for h in arcs if h.authserv_id in ids), key=lambda h: h.rank, default=None)
    return NO_VERDICT if arc is None else _verdict([arc], source=ARC)


def _parse(value: str, rank: int) -> _Header:
    text = " ".join(value.split())
    unnamed = "=" in text.split(";", 1)[0]  # Exchange Online: no authserv-id before a result
    if unnamed:
        text = "unnamed; " + text
    try:
        header = authres.AuthenticationResultsHeader.parse(f"{AR}: {text}")
    except authres.core.AuthResError:
        # whose header it is, when only the rest is beyond the grammar
        try:
            head = text.split(";", 1)[0]
            header = authres.AuthenticationResultsHeader.parse(f"{AR}: {head}; none")
        except authres.core.AuthResError:
            return _Header(None, None, rank)
        return _Header("" if unnamed else header.authserv_id, None, rank)
    # authres keeps a `none` that follows results as an entry without a method: not a result
    results = [r for r in header.results if isinstance(r, authres.core.AuthenticationResult)]
    return _Header("" if unnamed else header.authserv_id, results, rank)


def _verdict(headers: list[_Header], source: str) -> Verdict:
    top = headers[0]
    if top.results is None:  # the receiver's header: nothing lower stands in for it
        return Verdict(authserv_id=top.authserv_id or "", source=source, unreadable=True)
    out: dict[str, str | None] = dict.fromkeys(METHODS)
    reasons: dict[str, str] = {}
    for header in headers:
        seen_here: set[str] = set()
        for r in header.results or ():  # a lower unreadable one adds nothing
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
    return Verdict(results_, reasons, top.authserv_id, source)


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
