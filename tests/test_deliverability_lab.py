"""The lab's deliverability side (lab.deliverability): real SPF, DKIM and DMARC checks.

Scenario users submit over the lab's submission port (STARTTLS + AUTH), OpenDKIM signs, Postfix
relays mail for rcpt.example.test to its "mx" smtpd, where policyd-spf, OpenDKIM (verifying)
and OpenDMARC check it against the lab's own DNS (nsd) and write Authentication-Results with
authserv-id mx.lab.example; the message is then read back over IMAP from the receiving mailbox.
Every assertion needs those headers: with the verifiers down there is none (or no mail)."""

from __future__ import annotations

import email
import email.policy
import imaplib
import os
import smtplib
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import authres
import pytest

from maillab.deliverability import (
    AUTHSERV_ID,
    ESP_BOUNCE,
    ESP_DOMAIN,
    SCENARIOS,
    SELECTOR,
    Deliverability,
)

METHODS = ("spf", "dkim", "dmarc")


@pytest.fixture(scope="module")
def deliv(lab) -> Iterator[Deliverability]:
    """The verifiers start on first use (here), and stop again after this module, so the rest
    of the session's submissions are not signed."""
    yield lab.deliverability.start()
    lab.deliverability.stop()


def submit(lab, sender, to: str, *, extra_headers: dict[str, str] | None = None) -> str:
    """Send a message as `sender` through the submission port; returns its unique token."""
    token = uuid.uuid4().hex
    msg = EmailMessage()
    for name, value in (extra_headers or {}).items():
        msg[name] = value
    msg["From"] = sender.address
    msg["To"] = to
    msg["Subject"] = f"deliverability {token}"
    msg["X-Lab-Token"] = token
    msg.set_content("A test message of the deliverability lab.\n")
    with smtplib.SMTP(lab.host, lab.ports.submission, timeout=10) as s:
        s.starttls(context=lab.ssl_context())
        s.login(sender.address, sender.password)
        s.send_message(msg)
    return token


def fetch_over_imap(lab, user, token: str, timeout: float = 15.0) -> EmailMessage:
    """The message carrying `token`, read from `user`'s INBOX over IMAPS (polling)."""
    deadline = time.monotonic() + timeout
    with imaplib.IMAP4_SSL(lab.host, lab.ports.imaps, ssl_context=lab.ssl_context(),
                           timeout=10) as imap:
        imap.login(user.address, user.password)
        while True:
            imap.select("INBOX", readonly=True)
            typ, data = imap.uid("SEARCH", "HEADER", "X-Lab-Token", token)
            assert typ == "OK"
            uids = data[0].split()
            if uids:
                typ, parts = imap.uid("FETCH", uids[0], "(BODY.PEEK[])")
                assert typ == "OK"
                raw = parts[0][1]
                msg = email.message_from_bytes(raw, policy=email.policy.default)
                assert isinstance(msg, EmailMessage)
                return msg
            if time.monotonic() > deadline:
                pytest.fail(f"no message {token} in {user.address} within {timeout}s\n"
                            + lab.deliverability.log_excerpt() + "\n" + lab.log_tail("postfix", 30))
            time.sleep(0.1)


def auth_results(msg: EmailMessage) -> list[authres.AuthenticationResultsHeader]:
    """Every Authentication-Results header, parsed (RFC 8601 grammar), topmost first."""
    return [authres.AuthenticationResultsHeader.parse(
        "Authentication-Results: " + " ".join(str(v).split()))
        for v in msg.get_all("Authentication-Results", [])]


def results_by_method(msg: EmailMessage, authserv_id: str = AUTHSERV_ID) -> dict[str, list]:
    out: dict[str, list] = {}
    for header in auth_results(msg):
        if header.authserv_id == authserv_id:
            for r in header.results:
                out.setdefault(str(r.method), []).append(r)
    return out


def prop(result, ptype: str, name: str) -> str | None:
    for p in result.properties:
        if p.type == ptype and p.name == name:
            return str(p.value)
    return None


# ---------------------------------------------------------------- DNS
def test_nsd_serves_every_scenario_record(deliv):
    for s in SCENARIOS.values():
        rcode, spf = deliv.query(s.domain)
        assert rcode == 0
        assert [t for t in spf if t.startswith("v=spf1")] == ([s.spf] if s.spf else [])
        rcode, dmarc = deliv.query(f"_dmarc.{s.domain}")
        assert dmarc == ([s.dmarc] if s.dmarc else [])
        rcode, key = deliv.query(f"{SELECTOR}._domainkey.{s.domain}")
        if s.published_key:
            assert key == [f"v=DKIM1; k=rsa; p={deliv.public_key(s.published_key)}"]
        else:
            assert rcode == 3 and key == []   # NXDOMAIN
    assert deliv.query(ESP_DOMAIN)[1] == ["v=spf1 ip4:127.0.0.1 -all"]
    assert deliv.public_key("good") != deliv.public_key("other")


def test_verifiers_resolve_through_nsd_not_the_machine(deliv):
    """opendmarc and policyd-spf read /etc/resolv.conf: in their mount namespace it names nsd;
    the machine's own file is another (untouched) one."""
    dmarc = next(p for p in deliv._procs if p.name == "opendmarc")
    inside = Path(f"/proc/{dmarc.popen.pid}/root/etc/resolv.conf").read_text()
    assert f"nameserver {deliv.nameserver}" in inside
    assert deliv.nameserver not in Path("/etc/resolv.conf").read_text()
    assert os.readlink(f"/proc/{dmarc.popen.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")


# ---------------------------------------------------------------- the verdicts
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_verdict(lab, deliv, name):
    scenario = SCENARIOS[name]
    sender = deliv.add_sender(name)
    assert sender.address.endswith("@" + scenario.domain)
    token = submit(lab, sender, deliv.receiver.address)
    msg = fetch_over_imap(lab, deliv.receiver, token)

    headers = auth_results(msg)
    assert headers, "no Authentication-Results: are the verifiers running?"
    assert {h.authserv_id for h in headers} == {AUTHSERV_ID}
    results = results_by_method(msg)
    got = {m: [str(r.result) for r in results.get(m, [])] for m in METHODS}
    assert got == {m: [v] for m, v in scenario.expected.items()}, msg.get_all("Authentication-Results")

    spf, dkim, dmarc = results["spf"][0], results["dkim"][0], results["dmarc"][0]
    envelope_domain = (scenario.envelope_sender or sender.address).rpartition("@")[2]
    assert prop(spf, "smtp", "mailfrom") == envelope_domain
    assert prop(dmarc, "header", "from") == scenario.domain
    if scenario.sign_as:
        assert prop(dkim, "header", "d") == scenario.sign_as
        assert prop(dkim, "header", "s") == SELECTOR
        assert f"d={scenario.sign_as};" in " ".join(str(msg["DKIM-Signature"]).split())
    else:
        assert msg["DKIM-Signature"] is None


def test_the_reasons_the_verifiers_give(lab, deliv):
    """The comments and reasons each verifier writes, as the exporter will meet them."""
    texts = {}
    for name in ("pass", "nokey", "wrongkey", "unaligned"):
        token = submit(lab, deliv.add_sender(name), deliv.receiver.address)
        msg = fetch_over_imap(lab, deliv.receiver, token)
        texts[name] = [" ".join(str(v).split()) for v in msg.get_all("Authentication-Results")]
    dkim = {n: next(t for t in v if "dkim=" in t) for n, v in texts.items()}
    assert "dkim=pass (2048-bit key; unprotected) header.d=pass.example.test" in dkim["pass"]
    assert 'dkim=fail reason="key not found in DNS"' in dkim["nokey"]
    assert 'dkim=fail reason="signature verification failed"' in dkim["wrongkey"]
    assert f"dkim=pass (2048-bit key; unprotected) header.d={ESP_DOMAIN}" in dkim["unaligned"]
    unaligned = texts["unaligned"]
    assert (f"{AUTHSERV_ID}; dmarc=fail (p=reject dis=none) header.from=unaligned.example.test"
            in unaligned)
    assert any(t.startswith(f"{AUTHSERV_ID}; spf=pass (sender SPF authorized) "
                            f"smtp.mailfrom={ESP_DOMAIN} (client-ip=127.0.0.1;")
               and f"envelope-from={ESP_BOUNCE};" in t for t in unaligned)


def test_one_header_per_verifier_dmarc_on_top(lab, deliv):
    """Three headers with the same authserv-id, one per verifier (as any Postfix + OpenDKIM +
    OpenDMARC receiver writes them): topmost DMARC, then DKIM, then SPF; a reader must merge
    them, not take the topmost alone."""
    token = submit(lab, deliv.add_sender("pass"), deliv.receiver.address)
    msg = fetch_over_imap(lab, deliv.receiver, token)
    methods = [[str(r.method) for r in h.results] for h in auth_results(msg)]
    assert methods == [["dmarc"], ["dkim", "dkim-atps"], ["spf"]]


def test_plain_path_has_no_authentication_results(lab, deliv):
    """Mail to an example.test mailbox never meets the mx: signed, but no verdict at all."""
    sender = deliv.add_sender("pass")
    token = submit(lab, sender, deliv.plain_recipient.address)
    msg = fetch_over_imap(lab, deliv.plain_recipient, token)
    assert msg["DKIM-Signature"] is not None
    assert msg.get_all("Authentication-Results") is None


@pytest.mark.parametrize("forged", [
    f"{AUTHSERV_ID}; spf=pass smtp.mailfrom=spoof.example.test",
    f"{AUTHSERV_ID}; dmarc=pass header.from=spoof.example.test",
    f"{AUTHSERV_ID.upper()}; spf=pass smtp.mailfrom=spoof.example.test; "
    "dkim=pass header.d=spoof.example.test; dmarc=pass header.from=spoof.example.test",
])
def test_forged_results_never_arrive(lab, deliv, forged):
    """A sender's own Authentication-Results claiming the mx's id is dropped on the way to the
    mx (else OpenDMARC believes a forged spf=pass, and spoof gets dmarc=pass)."""
    token = submit(lab, deliv.add_sender("spoof"), deliv.receiver.address,
                   extra_headers={"Authentication-Results": forged})
    msg = fetch_over_imap(lab, deliv.receiver, token)
    values = [" ".join(str(v).split()) for v in msg.get_all("Authentication-Results")]
    assert len(values) == 3 and all(v.startswith(f"{AUTHSERV_ID}; ") for v in values)
    assert {m: [str(r.result) for r in rs] for m, rs in results_by_method(msg).items()
            if m in METHODS} == {"spf": ["fail"], "dkim": ["none"], "dmarc": ["fail"]}


def test_results_of_another_server_stay_below(lab, deliv):
    foreign = "other.example; dkim=pass header.d=spoof.example.test"
    token = submit(lab, deliv.add_sender("spoof"), deliv.receiver.address,
                   extra_headers={"Authentication-Results": foreign})
    msg = fetch_over_imap(lab, deliv.receiver, token)
    values = [" ".join(str(v).split()) for v in msg.get_all("Authentication-Results")]
    assert len(values) == 4 and values[-1] == foreign
    assert all(v.startswith(f"{AUTHSERV_ID}; ") for v in values[:3])


# ---------------------------------------------------------------- lifecycle
def test_stop_then_start_again(lab, deliv):
    """Stopped: submitted mail is no longer signed.  start() brings everything back."""
    sender = deliv.add_sender("pass")
    deliv.stop()
    try:
        assert not deliv.running and deliv.nameserver is None
        token = submit(lab, sender, deliv.plain_recipient.address)
        assert fetch_over_imap(lab, deliv.plain_recipient, token)["DKIM-Signature"] is None
    finally:
        deliv.start()
    assert deliv.running
    assert deliv.timings["start"] < 5.0
    token = submit(lab, sender, deliv.receiver.address)
    msg = fetch_over_imap(lab, deliv.receiver, token)
    assert {m: str(r[0].result) for m, r in results_by_method(msg).items()
            if m in METHODS} == {"spf": "pass", "dkim": "pass", "dmarc": "pass"}
