"""Transcripts: what was said during a check, with the facts a support desk asks for, and no
credential, token or message body in any form, whatever the login mechanism."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest

from inbox_exporter.check import Checker
from inbox_exporter.config import parse_config
from inbox_exporter.oauth.tokens import TokenCache
from inbox_exporter.redact import sasl_plain
from inbox_exporter.transcript import MAX_BYTES, Transcript, unpack

from .conftest import PASSWORD, env_name, lab_entry, write_config
from .test_oauth import oauth_inbox, refresh_file


def forms(user: str, secret: str) -> list[str]:
    """Every way a credential could show up in a transcript."""
    xoauth2 = f"user={user}\x01auth=Bearer {secret}\x01\x01"
    bearer = f"n,a={user},\x01auth=Bearer {secret}\x01\x01"
    return [secret, base64.b64encode(secret.encode()).decode(), sasl_plain(user, secret),
            base64.b64encode(xoauth2.encode()).decode(),
            base64.b64encode(bearer.encode()).decode()]


def inbox_for(lab, tmp_path, entry: dict, password: str):
    config = write_config(tmp_path, lab, [entry])
    return parse_config(config.read_text(), str(config), {env_name(entry["name"]): password}).inboxes[0]


def test_a_transcript_shows_the_conversation_and_what_a_support_desk_asks(lab, tmp_path):
    inbox = inbox_for(lab, tmp_path, lab_entry(lab, "t"), lab.users["alice"].password)
    result = Checker().check(inbox)
    assert result.ok
    text = unpack(result.transcript)
    for expected in ("imap * connected to 127.0.0.1 port", "TLS TLSv1.3, cipher",
                     "certificate: subject commonName=localhost; issuer commonName=maillab test CA",
                     "SANs localhost, 127.0.0.1", "imap S * OK [CAPABILITY IMAP4rev1",
                     'EXAMINE "INBOX"', "smtp S 250-PIPELINING", "smtp C AUTH PLAIN <redacted",
                     "235 2.7.0 Authentication successful", "250 2.0.0 Ok: queued as",
                     f"X-Inbox-Exporter-Probe: {result.probe_id}", "bytes not shown>"):
        assert expected in text, expected
    assert "this is a test email" not in text.lower()  # the body: a size only
    lines = text.splitlines()
    times = [int(line.split("ms")[0]) for line in lines]
    assert times == sorted(times) and times[-1] < result.duration_seconds * 1000 + 5


CREDENTIAL_CASES = ["imap LOGIN + smtp AUTH PLAIN", "utf-8 password: imap SASL PLAIN",
                    "wrong password (the server's refusals shown)"]


@pytest.mark.parametrize("case", CREDENTIAL_CASES)
def test_no_password_appears_in_any_form(lab, tmp_path, case):
    if case.startswith("utf-8"):
        password = "pässwörd-ünïcode-42"
        lab.add_user("unicode", password) if "unicode" not in lab.users else None
        lab.set_password("unicode", password)
        inbox = inbox_for(lab, tmp_path, lab_entry(lab, "u", "unicode"), password)
    elif case.startswith("wrong"):
        password = PASSWORD
        inbox = inbox_for(lab, tmp_path, lab_entry(lab, "w"), password)
    else:
        password = lab.users["alice"].password
        inbox = inbox_for(lab, tmp_path, lab_entry(lab, "p"), password)
    result = Checker().check(inbox)
    text = unpack(result.transcript)
    assert "LOGIN" in text or "AUTHENTICATE PLAIN" in text
    for form in forms(inbox.username, password):
        assert form not in text, case
    assert "<redacted" in text


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_no_access_or_refresh_token_appears_in_any_form(lab, tmp_path, mechanism):
    refresh = lab.oauth.refresh_token_for("alice")
    inbox = oauth_inbox(lab, rt_file=refresh_file(tmp_path, refresh), mechanism=mechanism)
    tokens = TokenCache()
    result = Checker(tokens=tokens).check(inbox)
    assert result.ok
    text = unpack(result.transcript)
    assert f"AUTHENTICATE {mechanism.upper()} <redacted" in text
    assert f"AUTH {mechanism.upper()} <redacted" in text
    secrets = [*tokens.secrets(), refresh]
    assert secrets and all(secrets)
    for secret in secrets:
        for form in forms(inbox.username, secret):
            assert form not in text


def test_login_exchanges_are_redacted_in_both_directions_until_the_final_answer():
    t = Transcript(secrets=["hunter2"])
    t.received("imap", b"* OK ready")
    t.sent("imap", b"a1 AUTHENTICATE XOAUTH2\r\n")
    t.received("imap", b"+ ")
    t.sent("imap", base64.b64encode(b"user=a\x01auth=Bearer tok-123\x01\x01") + b"\r\n")
    t.received("imap", b"+ eyJzdGF0dXMiOiI0MDEifQ==")  # the error challenge
    t.sent("imap", b"\r\n")
    t.received("imap", b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.")
    t.sent("imap", b"a2 LOGOUT\r\n")
    t.sent("smtp", b"AUTH LOGIN\r\n")
    t.received("smtp", b"334 VXNlcm5hbWU6")
    t.sent("smtp", base64.b64encode(b"alice") + b"\r\n")
    t.received("smtp", b"334 UGFzc3dvcmQ6")
    t.sent("smtp", base64.b64encode(b"hunter2") + b"\r\n")
    t.received("smtp", b"235 2.7.0 Authentication successful")
    t.sent("smtp", b"MAIL FROM:<alice@example.test>\r\n")
    text = t.text()
    assert "tok-123" not in text and base64.b64encode(b"hunter2").decode() not in text
    assert "eyJzdGF0dXMiOiI0MDEifQ" not in text  # continuations from the server too
    assert "a1 NO [AUTHENTICATIONFAILED]" in text and "a2 LOGOUT" in text
    assert "MAIL FROM:<alice@example.test>" in text
    assert text.count("<redacted") == 7


def test_a_transcript_is_capped_in_bytes():
    t = Transcript()
    for i in range(5000):
        t.received("imap", b"* %d EXISTS" % i)
    assert len(t.text()) <= MAX_BYTES + 20 and t.text().endswith("... truncated")
    assert len(t.packed()) < 2000


def test_check_prints_the_transcript_when_asked(lab, tmp_path):
    config = write_config(tmp_path, lab, [lab_entry(lab, "cli")])
    env = {env_name("cli"): PASSWORD, "PATH": "/usr/bin:/bin"}
    base = [sys.executable, "-m", "inbox_exporter", "check", f"--config.file={config}",
            "--no-test-email"]
    out = subprocess.run([*base, "--transcript"], capture_output=True, text=True, env=env,
                         timeout=60, cwd=tmp_path)
    assert "transcript (redacted):" in out.stdout and "LOGIN" in out.stdout
    assert PASSWORD not in out.stdout + out.stderr
    out = subprocess.run([*base, "--output", "json", "--transcript"], capture_output=True,
                         text=True, env=env, timeout=60, cwd=tmp_path)
    doc = json.loads(out.stdout)
    assert "NO [AUTHENTICATIONFAILED]" in doc["inboxes"][0]["transcript"]
    plain = subprocess.run([*base, "--output", "json"], capture_output=True, text=True, env=env,
                           timeout=60, cwd=tmp_path)
    assert "transcript" not in json.loads(plain.stdout)["inboxes"][0]
