"""Transcripts: what was said during a check, with the facts a support desk asks for, and no
credential, token or message body in any form, whatever the login mechanism."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import socket
import string
import subprocess
import sys

import pytest

from inbox_exporter.check import Checker
from inbox_exporter.config import parse_config
from inbox_exporter.oauth.tokens import TokenCache
from inbox_exporter.probes import smtp as smtp_probe
from inbox_exporter.redact import sasl_plain
from inbox_exporter.transcript import MAX_BYTES, MAX_PACKED, Transcript, pack, unpack

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


# --- failures before the conversation: connect and TLS handshake -------------------------------

def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_a_check_refused_at_connect_shows_the_addresses_and_the_refusal(lab_inbox):
    port = closed_port()
    result = Checker().check(lab_inbox(imap={"port": port}, smtp={"port": port}))
    text = unpack(result.transcript)
    for leg in ("imap", "smtp"):
        assert f"{leg} * connecting to 127.0.0.1 port {port} (addresses: 127.0.0.1)" in text
        assert f"{leg} * 127.0.0.1 port {port}: connection refused" in text


@pytest.mark.skipif(os.geteuid() != 0, reason="iptables needs root")
def test_a_check_timing_out_at_connect_says_which_address_did_not_answer(lab, lab_inbox):
    with lab.blackhole() as port:
        result = Checker().check(lab_inbox(timeout="1s", imap={"port": port}, smtp={"port": port}))
    text = unpack(result.transcript)
    assert f"imap * connecting to 127.0.0.1 port {port} (addresses: 127.0.0.1)" in text
    for leg in ("imap", "smtp"):
        assert re.search(rf"{leg} \* 127\.0\.0\.1 port {port}: timed out", text)
    assert "connected to" not in text


def test_a_check_failing_at_dns_says_which_name_did_not_resolve(lab_inbox):
    host = "no-such-host.invalid"  # RFC 6761: never resolves
    result = Checker().check(lab_inbox(timeout="2s", imap={"host": host}, smtp={"host": host}))
    text = unpack(result.transcript)
    for leg in ("imap", "smtp"):
        assert f"{leg} * DNS lookup of {host} failed: " in text


def not_after(cert_path) -> str:
    """The certificate's expiry as OpenSSL prints it (and Python's ssl module too)."""
    out = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", str(cert_path)],
                         capture_output=True, text=True, check=True).stdout
    return out.strip().split("=", 1)[1]


@pytest.mark.parametrize("kind,error,subject", [
    ("selfsigned", "self-signed certificate", "commonName=localhost; issuer commonName=localhost"),
    ("expired", "certificate has expired", "commonName=localhost; issuer commonName=maillab test CA"),
    ("wronghost", "mismatch, certificate is not valid for '127.0.0.1'",
     "commonName=wrong.example.net; issuer commonName=maillab"),
])
@pytest.mark.parametrize("mode", ["ssl", "starttls"])
def test_a_failed_tls_handshake_shows_the_error_and_the_certificate_presented(lab, lab_inbox, kind,
                                                                               error, subject, mode):
    imap_port = getattr(lab.ports, f"imaps_{kind}" if mode == "ssl" else f"imap_{kind}")
    smtp_port = getattr(lab.ports, f"smtps_{kind}" if mode == "ssl" else f"submission_{kind}")
    result = Checker().check(lab_inbox(imap={"port": imap_port, "security": mode},
                                       smtp={"port": smtp_port, "security": mode}))
    assert not result.ok
    text = unpack(result.transcript)
    for leg, port in (("imap", imap_port), ("smtp", smtp_port)):
        lines = [line.split(f" {leg} ", 1)[1] for line in text.splitlines() if f" {leg} " in line]
        assert f"* connected to 127.0.0.1 port {port}" in lines
        failed = lines.index(next(line for line in lines if line.startswith("* TLS handshake failed: ")))
        assert error in lines[failed]
        assert lines[failed + 1].startswith(f"* certificate presented: subject {subject}")
        assert lines[failed + 1].endswith(f"; expires {not_after(lab.tls.pair(kind)[0])}")
        assert lines[failed + 1:] == [lines[failed + 1]]  # nothing said on that session after it


# --- credentials: SMTP AUTH LOGIN's initial response, IMAP LOGIN's arguments --------------------

@pytest.mark.parametrize("right", [True, False], ids=["right password", "wrong password"])
def test_smtp_auth_login_and_imap_login_show_neither_user_name_nor_password(lab, tmp_path,
                                                                            monkeypatch, right):
    # Postfix offers PLAIN first, and the probe prefers it: make LOGIN the only choice, so that
    # smtplib sends `AUTH LOGIN <base64 user name>` (an initial response, RFC 4954) to the real server.
    monkeypatch.setattr(smtp_probe, "MECHANISMS", ("LOGIN",))
    password = lab.users["alice"].password if right else PASSWORD
    inbox = inbox_for(lab, tmp_path, lab_entry(lab, "l"), password)
    result = Checker().check(inbox)
    text = unpack(result.transcript)
    assert re.search(r"smtp C AUTH LOGIN <redacted \d+ bytes>\n", text)
    assert re.search(r"imap C \w+ LOGIN <redacted \d+ bytes>\n", text)
    if right:
        assert "235 2.7.0 Authentication successful" in text
    user = base64.b64encode(inbox.username.encode()).decode()
    for form in [*forms(inbox.username, password), user, user.rstrip("=")]:
        assert form not in text
    assert not [line for line in text.splitlines() if "LOGIN" in line and inbox.username in line]


# --- the mailbox beyond counts ------------------------------------------------------------------

@pytest.mark.parametrize("line,shown", [  # shown None: the line as it came
    (r'* LIST (\HasNoChildren) "/" "Clients/Acme Corp"', r'* LIST (\HasNoChildren) "/" <folder>'),
    (r'* LIST (\HasNoChildren \Sent) "/" "[Gmail]/Sent Mail"', None),
    (r'* LIST (\HasChildren \Noselect) "/" "[Gmail]"', r'* LIST (\HasChildren \Noselect) "/" <folder>'),
    (r'* LIST (\HasNoChildren) "." INBOX', None),
    (r'* LIST () "/" "Inbox" ("CHILDINFO" ("SUBSCRIBED"))', None),
    (r'* LIST (\Subscribed) "/" Lawyers ("OLDNAME" ("Divorce"))', r'* LIST (\Subscribed) "/" <folder>'),
    (r'* LIST () NIL {12}', r'* LIST () NIL <folder>'),
    (r'* LSUB () "/" Lawyers', r'* LSUB () "/" <folder>'),
    (r'* FLAGS (\Answered \Flagged \Deleted \Seen \Draft $Forwarded ProjectX)',
     r'* FLAGS (\Answered \Flagged \Deleted \Seen \Draft <2 keywords>)'),
    (r'* OK [PERMANENTFLAGS (\Seen $Label1 \*)] Flags permitted.',
     r'* OK [PERMANENTFLAGS (\Seen \* <1 keyword>)] Flags permitted.'),
    (r'* 3 FETCH (UID 7 FLAGS (\Seen Invoices))', r'* 3 FETCH (UID 7 FLAGS (\Seen <1 keyword>))'),
    (r'* 12 EXISTS', None),
])
def test_folder_names_and_keywords_show_only_for_inbox_special_use_and_system_flags(line, shown):
    t = Transcript()
    t.received("imap", line.encode())
    assert t.text().split(" imap S ", 1)[1] == (shown or line)


def test_a_real_mailbox_shows_its_special_folders_and_counts_only(lab, lab_inbox):
    import imaplib

    user = lab.users["folders"] if "folders" in lab.users else lab.add_user("folders", "Folders-pw-1")
    with imaplib.IMAP4_SSL(lab.host, lab.ports.imaps, ssl_context=lab.ssl_context()) as imap:
        imap.login(user.address, user.password)
        for folder in ("Clients Acme", "Divorce Lawyers"):
            imap.create(f'"{folder}"')
        imap.append("INBOX", "(\\Seen $ClientAcme)", None,
                    b"From: a@example.test\r\nSubject: private\r\n\r\nsecret body\r\n")
    result = Checker().check(lab_inbox("folders"))
    assert result.ok
    text = unpack(result.transcript)
    for hidden in ("Clients Acme", "Divorce Lawyers", "ClientAcme"):
        assert hidden not in text
    for shown in ('"/" <folder>', '(\\HasNoChildren \\Sent) "/" Sent', '"/" INBOX',
                  "* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft <1 keyword>)",
                  "* 1 EXISTS"):
        assert shown in text, shown


# --- the packed size: bounded by design ---------------------------------------------------------

def incompressible_lines(n: int, width: int = 300) -> list[str]:
    rng = random.Random(13)
    alphabet = string.ascii_letters + string.digits + "!#$%&()*+,-.;<=>?@[]^_{|}~"
    return ["".join(rng.choices(alphabet, k=width)) for _ in range(n)]


def test_a_packed_transcript_fits_its_cap_however_incompressible_the_text():
    assert 2 * MAX_PACKED * 10_000 < 50 * 10**6  # the last and the last failed, 10,000 inboxes
    t = Transcript()
    lines = incompressible_lines(100)
    for line in lines:
        t.received("imap", line.encode())
    assert len(t.text()) > 5 * MAX_PACKED  # capped as text at MAX_BYTES: that packs to ~9 KB
    packed = t.packed()
    assert len(packed) <= MAX_PACKED
    text = unpack(packed)
    kept = text.splitlines()
    assert kept[0].endswith(lines[0]) and kept[-1] == "... truncated"  # the beginning, the end
    left_out = re.fullmatch(r"\u2026 (\d+) lines left out \u2026", kept[len(kept) // 2])
    assert left_out and len(kept) - 1 + int(left_out.group(1)) == len(t.text().splitlines())


def test_pack_leaves_out_only_lines_from_the_middle_and_about_as_few_as_it_must():
    lines = incompressible_lines(30, width=250)  # a line packs to ~200 bytes
    packed = pack("\n".join(lines))
    kept = unpack(packed).splitlines()
    n = int(re.fullmatch(r"\u2026 (\d+) lines left out \u2026", kept[len(kept) // 2]).group(1))
    assert kept[0] == lines[0] and kept[-1] == lines[-1] and len(kept) - 1 + n == len(lines)
    assert MAX_PACKED - 300 < len(packed) <= MAX_PACKED  # one more line would not have fit
    short = "\n".join(lines[:3])
    assert unpack(pack(short)) == short  # what fits is kept whole
