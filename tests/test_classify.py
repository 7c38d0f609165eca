"""Classification: the table's order, real replies through the real client code, the docs."""

from __future__ import annotations

import base64
import socket
import ssl
from pathlib import Path

import pytest
import yaml

from inbox_exporter import classify as cl
from inbox_exporter.check import Checker
from inbox_exporter.model import Category, Phase, Reason, Status, Step
from inbox_exporter.redact import one_line, sasl_plain

from .conftest import make_inbox
from .fakeserver import (
    CUT,
    IMAP_CAPABILITY,
    IMAP_GREETING,
    SILENT,
    SMTP_EHLO,
    SMTP_GREETING,
    FakeServer,
    Trickle,
)

ROOT = Path(__file__).parent.parent
REPLIES = yaml.safe_load((Path(__file__).parent / "testdata" / "replies.yaml").read_text())
CTX = cl.Context("mail.example.test", 993, "ssl")


def diagnose(step, exc, phase=Phase.COMMAND):
    return cl.classify(step, exc, phase, CTX)


def cert_error(message: str, code: int) -> ssl.SSLCertVerificationError:
    e = ssl.SSLCertVerificationError(
        1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    e.verify_code, e.verify_message = code, message
    return e


@pytest.mark.parametrize("exc,reason", [
    (cert_error("certificate has expired", 10), Reason.CERTIFICATE_EXPIRED),
    (cert_error("self-signed certificate", 18), Reason.CERTIFICATE_UNTRUSTED),
    (cert_error("IP address mismatch, certificate is not valid for '127.0.0.1'.", 64),
     Reason.CERTIFICATE_HOSTNAME_MISMATCH),
])
def test_certificate_errors_win_over_the_general_tls_and_os_errors_they_subclass(exc, reason):
    # SSLCertVerificationError is an SSLError is an OSError: the specific rows must come first.
    assert isinstance(exc, ssl.SSLError) and isinstance(exc, OSError)
    for step, phase in ((Step.IMAP_CONNECT, Phase.TLS), (Step.SMTP_CONNECT, Phase.STARTTLS)):
        d = diagnose(step, exc, phase)
        assert (d.category, d.reason) == (Category.CERTIFICATE_UNTRUSTED, reason)


def test_a_connect_timeout_is_the_allowlist_signature_but_a_silent_server_is_not():
    assert diagnose(Step.IMAP_CONNECT, TimeoutError(), Phase.CONNECT).reason is Reason.CONNECTION_TIMEOUT
    assert diagnose(Step.IMAP_CONNECT, TimeoutError(), Phase.GREETING).reason is Reason.GREETING_TIMEOUT
    assert diagnose(Step.IMAP_VALIDATE, TimeoutError(), Phase.COMMAND).reason is Reason.TIMEOUT
    assert "allowlist" in diagnose(Step.IMAP_CONNECT, TimeoutError(), Phase.CONNECT).hint


def test_dns_and_refused_are_told_apart_from_other_os_errors():
    gai = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert diagnose(Step.SMTP_CONNECT, gai, Phase.DNS).reason is Reason.DNS_ERROR
    refused = ConnectionRefusedError(111, "Connection refused")
    d = diagnose(Step.SMTP_CONNECT, refused, Phase.CONNECT)
    assert (d.category, d.reason) == (Category.SMTP_SETTINGS_INCORRECT, Reason.CONNECTION_REFUSED)


def test_a_rewrapped_error_is_classified_by_its_cause():
    # IMAPClient raises LoginError(str(e)) and loses the type; the text and the chain remain.
    try:
        try:
            raise TimeoutError("timed out")
        except TimeoutError as inner:
            raise RuntimeError("socket error: timed out") from inner
    except RuntimeError as outer:
        assert diagnose(Step.IMAP_CONNECT, outer, Phase.CONNECT).reason is Reason.CONNECTION_TIMEOUT


def test_every_category_and_reason_has_a_hint_and_documentation():
    assert set(cl.HINTS) == set(Reason)
    assert set(cl.CATEGORY_DOCS) == set(Category) == set(cl.GUIDE_NAMES)
    assert cl.RULES[-1] == cl.Rule(Reason.UNKNOWN)  # the catch-all is last


def test_the_docs_are_generated_from_the_table():
    assert (ROOT / "docs" / "errors.md").read_text() == cl.render_docs(), (
        "regenerate: PYTHONPATH=daemon python -m inbox_exporter.classify > docs/errors.md")


def _script(at: str, reply: str) -> list:
    if at == "imap_login":
        return [(None, IMAP_GREETING), IMAP_CAPABILITY, (r"LOGIN", "{tag} " + reply + "\r\n")]
    if at == "smtp_greeting":
        return [(None, reply + "\r\n")]
    script = [(None, SMTP_GREETING), (r"^EHLO", SMTP_EHLO)]
    if at == "smtp_auth":
        return [*script, (r"^AUTH", reply + "\r\n")]
    script.append((r"^AUTH", "235 2.7.0 Authentication successful\r\n"))
    if at == "smtp_mail":
        return [*script, (r"^MAIL", reply + "\r\n")]
    return [*script, (r"^MAIL", "250 2.1.0 Ok\r\n"), (r"^RCPT", reply + "\r\n")]


STEP_OF = {"imap_login": Step.IMAP_LOGIN, "smtp_greeting": Step.SMTP_CONNECT,
           "smtp_auth": Step.SMTP_LOGIN, "smtp_mail": Step.TEST_EMAIL, "smtp_rcpt": Step.TEST_EMAIL}


@pytest.mark.parametrize("row", REPLIES, ids=[f"{r['at']}:{r['reply'][:40]}" for r in REPLIES])
def test_a_real_reply_gets_its_category_and_reason(row):
    proto = "imap" if row["at"].startswith("imap") else "smtp"
    with FakeServer(_script(row["at"], row["reply"])) as server:
        inbox = make_inbox(**{proto: {"port": server.port}},
                           test_email={"to": "bcc@example.test"})
        result = Checker().check(inbox)
    step = result.step(STEP_OF[row["at"]])
    assert step.status is Status.FAILED
    d = step.diagnosis
    assert (d.category.value, d.reason.value) == (row["category"], row["reason"]), d.detail
    assert d.hint and d.detail


@pytest.mark.parametrize("proto,script,phase_reason", [
    ("imap", [(None, SILENT)], Reason.GREETING_TIMEOUT),
    ("smtp", [(None, SILENT)], Reason.GREETING_TIMEOUT),
    ("imap", [(None, "\x16\x03\x01garbage\x00\xff\r\n")], Reason.PROTOCOL_ERROR),
    ("smtp", [(None, "garbage bytes, not SMTP\r\n")], Reason.PROTOCOL_ERROR),
    ("imap", [(None, IMAP_GREETING), IMAP_CAPABILITY, (r"LOGIN", CUT)], Reason.SERVER_UNAVAILABLE),
    ("smtp", [(None, SMTP_GREETING), (r"^EHLO", SMTP_EHLO), (r"^AUTH", CUT)],
     Reason.SERVER_UNAVAILABLE),
])
def test_faults_only_a_scripted_server_can_produce(proto, script, phase_reason):
    with FakeServer(script) as server:
        inbox = make_inbox(**{proto: {"port": server.port}}, timeout="1s")
        result = Checker().check(inbox)
    failed = result.failures
    mine = [s for s in failed if s.step.protocol.value == proto]
    assert len(mine) == 1 and mine[0].diagnosis.reason is phase_reason, mine
    assert mine[0].duration_seconds < 3  # bounded by the step timeout


def test_a_server_trickling_bytes_cannot_stretch_a_step_past_its_timeout():
    # Each byte arrives well within the socket timeout; only the watchdog ends the step.
    with FakeServer([(None, Trickle("* OK " + "x" * 200 + "\r\n", every=0.1))]) as server:
        result = Checker().check(make_inbox(imap={"port": server.port}, timeout="1s"))
    step = result.step(Step.IMAP_CONNECT)
    assert step.status is Status.FAILED
    assert step.diagnosis.reason in (Reason.GREETING_TIMEOUT, Reason.TIMEOUT)
    assert 0.9 < step.duration_seconds < 1.5


SECRET = 'Pw"never\\shown-7f3a9c'  # quotes and backslashes: IMAP quoting changes them


@pytest.mark.parametrize("reply", [
    f"NO [AUTHENTICATIONFAILED] Invalid credentials for {SECRET}",
    "500 5.5.2 Error: command not recognized: AUTH PLAIN " + sasl_plain("alice@example.test", SECRET),
    "535 5.7.8 Error: authentication failed: " + base64.b64encode(SECRET.encode()).decode(),
    'BAD Error in IMAP command LOGIN: alice "' + SECRET.replace("\\", "\\\\").replace('"', '\\"') + '"',
    f"b'NO login {SECRET!r} refused'",
])
def test_a_detail_never_shows_the_password_in_any_form_a_server_may_echo(reply):
    out = one_line(reply, [SECRET, sasl_plain("alice@example.test", SECRET)])
    assert "<redacted>" in out
    assert "never" not in out and "7f3a9c" not in out


def test_connections_end_with_logout_and_quit_even_after_a_failure():
    imap_script = [(None, IMAP_GREETING), IMAP_CAPABILITY,
                   (r"LOGIN", "{tag} NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n")]
    smtp_script = [(None, SMTP_GREETING), (r"^EHLO", SMTP_EHLO),
                   (r"^AUTH", "535 5.7.8 Error: authentication failed\r\n")]
    with FakeServer(imap_script) as imap, FakeServer(smtp_script) as smtp:
        # The server records a line before it answers it: once LOGOUT/QUIT were answered,
        # the transcripts hold them.
        result = Checker().check(make_inbox(imap={"port": imap.port}, smtp={"port": smtp.port}))
    assert len(result.failures) == 2
    assert imap.transcripts[0][-1].split()[1].upper() == "LOGOUT"
    assert smtp.transcripts[0][-1].upper() == "QUIT"
