"""International mail (issue #10 §4): SMTPUTF8 addresses, non-ASCII logins and IDN host names,
against the lab's real Postfix and Dovecot; a scripted server only for a server without
SMTPUTF8 (the lab's Postfix offers it) and for what the lab's ASCII-only users cannot log in as."""

from __future__ import annotations

import base64
import re

from inbox_exporter.check import Checker
from inbox_exporter.config import parse_config
from inbox_exporter.model import Category, Reason, Status, Step
from inbox_exporter.oauth.tokens import TokenCache
from inbox_exporter.probes.transport import ascii_host

from .conftest import make_inbox, wait_until
from .fakeserver import SMTP_GREETING, FakeServer
from .test_oauth import CLIENT_SECRET_ENV, config_text, oauth_entry, refresh_file

CHECKER = Checker()
NO_SMTPUTF8 = "250-fake.example.test\r\n250-AUTH PLAIN LOGIN XOAUTH2\r\n250 8BITMIME\r\n"


def sasl_lines(transcript: list[str]) -> list[str]:
    """The base64 SASL lines a client sent (after AUTH MECH, or on their own), decoded."""
    out = []
    for line in transcript:
        payload = line.split()[-1] if line.upper().startswith("AUTH ") else line
        try:
            out.append(base64.b64decode(payload, validate=True).decode("utf-8"))
        except ValueError:
            continue
    return out


# --- SMTPUTF8 (RFC 6531) ------------------------------------------------------------------

def test_a_utf8_sender_address_goes_out_with_smtputf8_through_the_real_postfix(lab, lab_inbox):
    inbox = lab_inbox(email="jörg.müller@example.test", username=lab.users["alice"].address)
    result = CHECKER.check(inbox)
    assert result.step(Step.SMTP_LOGIN).status is Status.OK
    assert result.step(Step.TEST_EMAIL).status is Status.OK, result.step(Step.TEST_EMAIL).diagnosis

    def envelope_sender():
        # Postfix logs the queue id with our Message-ID, then the envelope sender of that id.
        log = lab.log_tail("postfix", 2000)
        queued = re.search(rf"(\w+): message-id=<inbox-exporter\.{result.probe_id}@", log)
        sender = queued and re.search(rf"{queued.group(1)}: from=<([^>]*)>", log)
        return sender and sender.group(1)

    assert wait_until(envelope_sender, what="Postfix to log the probe's sender") == \
        "jörg.müller@example.test"


def test_a_non_ascii_sender_without_smtputf8_is_a_classified_failure_before_mail_from():
    script = [(None, SMTP_GREETING), (r"^EHLO", NO_SMTPUTF8),
              (r"^AUTH PLAIN", "235 2.7.0 Authentication successful\r\n")]
    with FakeServer(script) as server:
        result = CHECKER.check(make_inbox(email="jörg@example.test", imap={"port": 1},
                                          smtp={"port": server.port},
                                          test_email={"to": "bcc@example.test"}))
    step = result.step(Step.TEST_EMAIL)
    assert step.status is Status.FAILED
    d = step.diagnosis
    assert (d.category, d.reason) == (Category.TEST_EMAIL_FAILED,
                                      Reason.INTERNATIONAL_ADDRESS_UNSUPPORTED)
    assert "sender address jörg@example.test" in d.detail and "SMTPUTF8" in d.detail
    assert "SMTPUTF8" in d.hint
    assert not any(line.upper().startswith("MAIL") for line in server.transcripts[0])


def test_a_non_ascii_recipient_without_smtputf8_is_the_same_failure_naming_the_recipient():
    script = [(None, SMTP_GREETING), (r"^EHLO", NO_SMTPUTF8),
              (r"^AUTH PLAIN", "235 2.7.0 Authentication successful\r\n")]
    with FakeServer(script) as server:
        result = CHECKER.check(make_inbox(imap={"port": 1}, smtp={"port": server.port},
                                          test_email={"to": "eingangskörbchen@crm.example.test"}))
    d = result.step(Step.TEST_EMAIL).diagnosis
    assert d.reason is Reason.INTERNATIONAL_ADDRESS_UNSUPPORTED
    assert "recipient address eingangskörbchen@crm.example.test" in d.detail


def test_an_idn_domain_goes_out_in_a_labels_when_the_server_has_no_smtputf8():
    script = [(None, SMTP_GREETING), (r"^EHLO", NO_SMTPUTF8),
              (r"^AUTH PLAIN", "235 2.7.0 Authentication successful\r\n"),
              (r"^MAIL FROM", "250 2.1.0 Ok\r\n"),
              (r"^RCPT TO", "550 5.1.1 <bcc@xn--bcher-kva.example>: Recipient address rejected\r\n")]
    with FakeServer(script) as server:
        result = CHECKER.check(make_inbox(email="alice@straße.example", imap={"port": 1},
                                          smtp={"port": server.port},
                                          test_email={"to": "bcc@bücher.example"}))
    transcript = [line.upper() for line in server.transcripts[0]]
    assert "MAIL FROM:<ALICE@XN--STRAE-OQA.EXAMPLE>" in transcript  # IDNA 2008: ß stays ß
    assert "RCPT TO:<BCC@XN--BCHER-KVA.EXAMPLE>" in transcript
    assert result.step(Step.TEST_EMAIL).diagnosis.reason is Reason.RECIPIENT_REJECTED


# --- non-ASCII logins ----------------------------------------------------------------------

def test_a_non_ascii_password_logs_in_with_auth_plain_at_the_real_postfix(lab, lab_inbox):
    if "intl" not in lab.users:
        lab.add_user("intl", "Pässwörd-ß-€")
    inbox = lab_inbox("intl", imap={"port": 1, "security": "ssl"})  # the SMTP chain is under test
    result = CHECKER.check(inbox)
    assert result.step(Step.SMTP_LOGIN).status is Status.OK, result.step(Step.SMTP_LOGIN).diagnosis
    assert result.step(Step.TEST_EMAIL).status is Status.OK


def test_a_non_ascii_user_and_password_go_as_utf8_with_auth_login():
    script = [(None, SMTP_GREETING), (r"^EHLO", "250-fake.example.test\r\n250 AUTH LOGIN\r\n"),
              # smtplib sends the user with AUTH LOGIN (an initial response), then the password
              (r"^AUTH LOGIN \S", "334 UGFzc3dvcmQ6\r\n"),
              (r".", "535 5.7.8 Error: authentication failed\r\n")]
    with FakeServer(script) as server:
        result = CHECKER.check(make_inbox(username="jörg", password="pässwort",
                                          imap={"port": 1}, smtp={"port": server.port}))
    # The server got both, UTF-8 encoded, and said no: a verdict on the credentials, not a crash.
    assert sasl_lines(server.transcripts[0]) == ["jörg", "pässwort"]
    assert result.step(Step.SMTP_LOGIN).diagnosis.reason is Reason.AUTH_FAILED


def test_xoauth2_carries_a_non_ascii_user_as_utf8(lab, tmp_path):
    rt = refresh_file(tmp_path, lab.oauth.refresh_token_for("alice"))
    script = [(None, SMTP_GREETING), (r"^EHLO", NO_SMTPUTF8),
              (r"^AUTH XOAUTH2 ", "235 2.7.0 Authentication successful\r\n")]
    with FakeServer(script) as server:
        entry = oauth_entry(lab, "intl", rt_file=rt)
        entry.update(username="jörg@example.test", imap={"host": "127.0.0.1", "port": 1},
                     smtp={"host": "127.0.0.1", "port": server.port, "security": "none"},
                     allow_plaintext_login=True)  # the scripted server speaks no TLS
        environ = {CLIENT_SECRET_ENV: lab.oauth.clients["exporter"].client_secret}
        inbox = parse_config(config_text(lab, [entry]), "t.yaml", environ).inboxes[0]
        result = Checker(tokens=TokenCache()).check(inbox)
    assert result.step(Step.SMTP_LOGIN).status is Status.OK, result.step(Step.SMTP_LOGIN).diagnosis
    assert sasl_lines(server.transcripts[0])[0].startswith("user=jörg@example.test\x01auth=Bearer ")


# --- IDN host names ---------------------------------------------------------------------------

def test_a_host_name_is_sent_to_dns_and_tls_in_its_idna_2008_form():
    assert ascii_host("mail.straße.example") == "mail.xn--strae-oqa.example"  # not strasse
    assert ascii_host("IMAP.Bücher.Example") == "imap.xn--bcher-kva.example"
    assert ascii_host("mail.example.com") == "mail.example.com"


def test_an_idn_host_connects_and_its_certificate_is_checked_against_the_a_label(lab, lab_inbox):
    # "localhost" in full-width letters maps to "localhost" (UTS 46): a non-ASCII name that
    # resolves here, served by the lab's certificate for DNS:localhost. Both the implicit-TLS
    # (IMAPS) and the STARTTLS (submission) paths verify the name.
    host = "ｌｏｃａｌｈｏｓｔ"  # noqa: RUF001 - full-width letters on purpose: the IDN under test
    result = CHECKER.check(lab_inbox(imap={"host": host}, smtp={"host": host}))
    assert result.ok, [(s.step.value, s.diagnosis) for s in result.failures]
    wrong = CHECKER.check(lab_inbox(imap={"host": host, "port": lab.ports.imaps_wronghost},
                                    smtp={"port": 1}))
    assert wrong.step(Step.IMAP_CONNECT).diagnosis.reason is Reason.CERTIFICATE_HOSTNAME_MISMATCH
