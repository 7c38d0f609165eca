#!/usr/bin/env python3
"""Self-check of the mail lab: start a lab in a temp dir and verify every
promise of maillab with plain stdlib clients (imaplib, smtplib, ssl, socket).

    python lab/selfcheck.py [--keep] [--workdir DIR]

Prints one line per check (ok/FAIL + time) and exits non-zero on any failure.
Needs root (Dovecot/Postfix/iptables), like the lab itself.
"""
from __future__ import annotations

import argparse
import base64
import imaplib
import json
import os
import secrets
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
from email.message import EmailMessage
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from maillab import APP_PASSWORD_REASON, LabError, MailLab
from maillab.oauth import OAuthError, oauthbearer, xoauth2

TIMEOUT = 5.0
results: list[tuple[str, bool, float, str]] = []


def check(name: str):
    """Decorator-ish runner: record ok/FAIL with timing; never raises."""
    def run(fn):
        t = time.monotonic()
        try:
            detail = fn() or ""
            ok = True
        except Exception as e:  # noqa: BLE001 - report everything
            ok = False
            detail = f"{type(e).__name__}: {e}"
            if os.environ.get("SELFCHECK_TRACE"):
                detail += "\n" + traceback.format_exc()
        dt = time.monotonic() - t
        results.append((name, ok, dt, detail))
        status = "ok  " if ok else "FAIL"
        line = f"{status} {name} ({dt * 1000:.0f} ms)"
        if detail:
            line += f" - {detail}"
        print(line, flush=True)
        return ok
    return run


def expect(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


# ------------------------------------------------------------------ clients
class IMAP4From(imaplib.IMAP4):
    """IMAP4 with a chosen source address (e.g. 127.0.0.2)."""

    def __init__(self, host, port, source, timeout=TIMEOUT):
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self._source, 0))


def imaps(lab: MailLab, port: int, ctx: ssl.SSLContext | None = None) -> imaplib.IMAP4_SSL:
    return imaplib.IMAP4_SSL(lab.host, port, ssl_context=ctx or lab.ssl_context(),
                             timeout=TIMEOUT)


def imap_login_error(conn: imaplib.IMAP4, user: str, password: str) -> str:
    try:
        conn.login(user, password)
    except imaplib.IMAP4.error as e:
        arg = e.args[0] if e.args else e
        return arg.decode() if isinstance(arg, bytes) else str(arg)
    finally:
        try:
            conn.logout()
        except Exception:  # noqa: BLE001 - server may have closed already
            pass
    raise AssertionError(f"login as {user} unexpectedly succeeded")


def submission(lab: MailLab, port: int | None = None) -> smtplib.SMTP:
    s = smtplib.SMTP(lab.host, port or lab.ports.submission, timeout=TIMEOUT)
    s.ehlo("selfcheck.example")
    s.starttls(context=lab.ssl_context())
    s.ehlo("selfcheck.example")
    return s


def smtp_auth_plain(s: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    """One AUTH PLAIN exchange (smtplib.login() would try every mechanism,
    i.e. two failed AUTHs for one wrong password)."""
    import base64
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return s.docmd("AUTH", "PLAIN " + token)


def tls_verify_code(port: int, server_hostname: str, ctx: ssl.SSLContext,
                    starttls: str | None = None) -> int | None:
    """Handshake against 127.0.0.1:port checking `server_hostname`; return
    the certificate verify code (None if verification succeeded)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    try:
        f = sock.makefile("rb")
        if starttls == "imap":
            f.readline()
            sock.sendall(b"a1 STARTTLS\r\n")
            line = f.readline()
            expect(line.startswith(b"a1 OK"), f"STARTTLS refused: {line!r}")
        elif starttls == "smtp":
            expect(f.readline().startswith(b"220"), "no SMTP greeting")
            sock.sendall(b"EHLO selfcheck.example\r\n")
            while True:
                line = f.readline()
                if line[3:4] != b"-":
                    break
            sock.sendall(b"STARTTLS\r\n")
            line = f.readline()
            expect(line.startswith(b"220"), f"STARTTLS refused: {line!r}")
        try:
            tls = ctx.wrap_socket(sock, server_hostname=server_hostname)
        except ssl.SSLCertVerificationError as e:
            return e.verify_code
        tls.close()
        return None
    finally:
        sock.close()


def lab_processes(lab: MailLab) -> list[str]:
    """Processes that belong to the lab: by config path on the command line
    (pgrep -f) and by the MAILLAB_LAB environment marker."""
    found = []
    # Dovecot masters carry the config path, Dovecot children the instance
    # name "dovecot-maillab-<id>-<instance>" (Dovecot blanks its environ)
    for pattern in (str(lab.workdir), f"maillab-{lab.id}-"):
        r = subprocess.run(["pgrep", "-a", "-f", pattern], capture_output=True, text=True)
        found += [line for line in r.stdout.splitlines() if "selfcheck" not in line]
    needle = f"MAILLAB_LAB={lab.id}".encode()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                env = Path(f"/proc/{entry.name}/environ").read_bytes().split(b"\0")
                cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if needle in env:
                found.append(f"{entry.name} {cmd.decode(errors='replace')}")
    return found


def defunct_children_of(pids: set[int]) -> list[str]:
    r = subprocess.run(["ps", "-eo", "pid=,ppid=,stat=,comm="], capture_output=True, text=True)
    out = []
    for line in r.stdout.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4 and "Z" in parts[2] and int(parts[1]) in pids:
            out.append(line.strip())
    return out


# ------------------------------------------------------------------ checks
def run_checks(lab: MailLab, workroot: Path) -> None:
    P = lab.ports  # noqa: N806 - the lab's ports, read like a table by every check below
    alice, bob, bcc = lab.users["alice"], lab.users["bob"], lab.users["bcc"]
    appuser, netuser = lab.users["appuser"], lab.users["netuser"]
    good_ctx = lab.ssl_context()

    @check("ports: all distinct, all accept on 127.0.0.1")
    def _():
        ports = P.as_dict()
        expect(len(set(ports.values())) == len(ports), "duplicate ports")
        closed = []
        for name, port in ports.items():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                closed.append(name)
        expect(not closed, f"not accepting: {closed}")
        return f"{len(ports)} ports"

    @check("imaps: alice login + EXAMINE INBOX, lab CA trusted")
    def _():
        c = imaps(lab, P.imaps)
        c.login(alice.address, alice.password)
        typ, data = c.select("INBOX", readonly=True)
        expect(typ == "OK", f"EXAMINE: {typ} {data}")
        typ, boxes = c.list()
        c.logout()
        return f"{len(boxes)} folders"

    @check("imaps: good certificate verifies for 'localhost' and '127.0.0.1'")
    def _():
        for name in ("localhost", "127.0.0.1"):
            code = tls_verify_code(P.imaps, name, good_ctx)
            expect(code is None, f"verify code {code} for {name}")

    @check("imap: STARTTLS offered, then login + EXAMINE")
    def _():
        c = imaplib.IMAP4(lab.host, P.imap, timeout=TIMEOUT)
        expect("STARTTLS" in c.capabilities, f"capabilities {c.capabilities}")
        c.starttls(ssl_context=good_ctx)
        c.login(alice.address, alice.password)
        typ, _ = c.select("INBOX", readonly=True)
        c.logout()
        expect(typ == "OK", "EXAMINE failed")

    @check("imap from 127.0.0.1: plaintext LOGIN works without STARTTLS (Dovecot: secured)")
    def _():
        c = imaplib.IMAP4(lab.host, P.imap, timeout=TIMEOUT)
        expect("LOGINDISABLED" not in c.capabilities, f"capabilities {c.capabilities}")
        c.login(alice.address, alice.password)
        c.logout()

    @check("imap from 127.0.0.2: LOGINDISABLED, LOGIN -> [PRIVACYREQUIRED]")
    def _():
        c = IMAP4From(lab.host, P.imap, "127.0.0.2")
        caps = c.capabilities
        expect("LOGINDISABLED" in caps, f"capabilities {caps}")
        err = imap_login_error(c, alice.address, alice.password)
        expect("PRIVACYREQUIRED" in err, err)
        # and after STARTTLS from 127.0.0.2 the login works
        c = IMAP4From(lab.host, P.imap, "127.0.0.2")
        c.starttls(ssl_context=good_ctx)
        c.login(alice.address, alice.password)
        c.logout()
        return err

    expected_codes = {"selfsigned": 18, "expired": 10, "wronghost": 62}
    for kind, code in expected_codes.items():
        @check(f"bad cert {kind}: verify_code {code} on imaps, imap+STARTTLS, smtps, submission+STARTTLS")
        def _(kind=kind, code=code):
            got = {
                "imaps": tls_verify_code(getattr(P, f"imaps_{kind}"), "localhost", good_ctx),
                "imap": tls_verify_code(getattr(P, f"imap_{kind}"), "localhost", good_ctx, "imap"),
                "smtps": tls_verify_code(getattr(P, f"smtps_{kind}"), "localhost", good_ctx),
                "submission": tls_verify_code(getattr(P, f"submission_{kind}"), "localhost",
                                              good_ctx, "smtp"),
            }
            expect(all(v == code for v in got.values()), f"codes {got}")
            # the stdlib clients fail the same way
            try:
                imaplib.IMAP4_SSL("localhost" if kind == "wronghost" else lab.host,
                                  getattr(P, f"imaps_{kind}"), ssl_context=good_ctx,
                                  timeout=TIMEOUT)
                raise AssertionError("imaplib accepted the certificate")
            except ssl.SSLCertVerificationError as e:
                expect(e.verify_code == code, f"imaplib verify_code {e.verify_code}")
            return str(got)

    @check("bad cert wronghost checked by IP 127.0.0.1: verify_code 64 (IP mismatch)")
    def _():
        got = tls_verify_code(P.imaps_wronghost, "127.0.0.1", good_ctx)
        expect(got == 64, f"got {got}")

    @check("appuser IMAP: NO [ALERT] <app password text>")
    def _():
        err = imap_login_error(imaps(lab, P.imaps), appuser.address, appuser.password)
        expect("[ALERT]" in err and APP_PASSWORD_REASON in err, err)
        return err

    @check("appuser SMTP AUTH: 535 with the app password text")
    def _():
        s = submission(lab)
        code, msg = smtp_auth_plain(s, appuser.address, appuser.password)
        s.quit()
        expect(code == 535 and APP_PASSWORD_REASON.encode() in msg, f"{code} {msg!r}")
        # smtplib.login() surfaces it as SMTPAuthenticationError
        s = submission(lab)
        try:
            s.login(appuser.address, appuser.password)
            raise AssertionError("login succeeded")
        except smtplib.SMTPAuthenticationError as e:
            expect(e.smtp_code == 535 and APP_PASSWORD_REASON.encode() in e.smtp_error,
                   f"{e.smtp_code} {e.smtp_error!r}")
        finally:
            s.close()
        return f"{code} {msg.decode()}"

    @check("netuser (allow_nets=10.0.0.0/8) from 127.0.0.1: [AUTHENTICATIONFAILED], SMTP 535")
    def _():
        err = imap_login_error(imaps(lab, P.imaps), netuser.address, netuser.password)
        expect("AUTHENTICATIONFAILED" in err, err)
        s = submission(lab)
        code, msg = smtp_auth_plain(s, netuser.address, netuser.password)
        s.quit()
        expect(code == 535, f"{code} {msg!r}")
        return err

    @check("limit instance: 2nd concurrent alice session -> NO [LIMIT]")
    def _():
        first = imaps(lab, P.imaps_limited)
        first.login(alice.address, alice.password)
        first.select("INBOX", readonly=True)
        err = imap_login_error(imaps(lab, P.imaps_limited), alice.address, alice.password)
        expect("[LIMIT]" in err or "[UNAVAILABLE]" in err, err)
        typ, _ = first.noop()
        expect(typ == "OK", "first session broken")
        # bob is not affected by alice's session
        other = imaps(lab, P.imaps_limited)
        other.login(bob.address, bob.password)
        other.logout()
        first.logout()
        # once the first session is gone, alice can log in again
        deadline = time.monotonic() + 5
        while True:
            c = imaps(lab, P.imaps_limited)
            try:
                c.login(alice.address, alice.password)
                c.logout()
                break
            except imaplib.IMAP4.error:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        return err

    subject = f"selfcheck {secrets.token_hex(4)}"

    @check("submission: STARTTLS + AUTH alice, send to bcc@example.test -> bcc Maildir")
    def _():
        msg = EmailMessage()
        msg["From"] = alice.address
        msg["To"] = bcc.address
        msg["Subject"] = subject
        msg.set_content("hello from the selfcheck\n")
        t = time.monotonic()
        s = submission(lab)
        s.login(alice.address, alice.password)
        refused = s.send_message(msg)
        s.quit()
        expect(not refused, f"refused {refused}")
        got = lab.wait_for_message("bcc", lambda m: m["Subject"] == subject, timeout=10)
        expect(got["From"] == alice.address, f"From {got['From']}")
        return f"delivered in {(time.monotonic() - t) * 1000:.0f} ms"

    @check("bcc reads the message over IMAP")
    def _():
        c = imaps(lab, P.imaps)
        c.login(bcc.address, bcc.password)
        c.select("INBOX", readonly=True)
        typ, data = c.search(None, "SUBJECT", f'"{subject}"')
        c.logout()
        expect(typ == "OK" and data[0].split(), f"search {typ} {data}")

    @check("smtps (implicit TLS): AUTH + send")
    def _():
        s = smtplib.SMTP_SSL(lab.host, P.smtps, context=good_ctx, timeout=TIMEOUT)
        s.login(bob.address, bob.password)
        s.sendmail(bob.address, [bcc.address], f"Subject: {subject} smtps\r\n\r\nx\r\n")
        s.quit()
        lab.wait_for_message("bcc", lambda m: m["Subject"] == f"{subject} smtps", timeout=10)

    @check("RCPT nobody@example.test -> 550 5.1.1 User unknown")
    def _():
        s = submission(lab)
        s.login(alice.address, alice.password)
        s.mail(alice.address)
        code, msg = s.rcpt(f"nobody@{lab.domain}")
        s.quit()
        expect(code == 550 and msg.startswith(b"5.1.1 <nobody@example.test>: Recipient address "
                                              b"rejected: User unknown"), f"{code} {msg!r}")
        return f"{code} {msg.decode()}"

    @check("RCPT without AUTH -> rejected (554 5.7.1)")
    def _():
        s = submission(lab)
        s.mail(alice.address)
        code, msg = s.rcpt(bcc.address)
        s.quit()
        expect(code == 554, f"{code} {msg!r}")
        return f"{code} {msg.decode()}"

    @check("submission_client_rejected: AUTH ok, RCPT -> 554 5.7.1 Client host rejected")
    def _():
        s = submission(lab, P.submission_client_rejected)
        code, _ = s.login(alice.address, alice.password)
        expect(code == 235, f"AUTH {code}")
        s.mail(alice.address)
        code, msg = s.rcpt(bcc.address)
        s.quit()
        expect(code == 554 and b"5.7.1" in msg and b"Client host rejected: Access denied" in msg,
               f"{code} {msg!r}")
        return f"{code} {msg.decode()}"

    @check("auth failure penalty: wrong LOGIN then correct LOGIN from 127.0.0.1 (IMAP)")
    def _():
        timings = []
        for i in range(3):
            c = imaps(lab, P.imaps)
            t = time.monotonic()
            err = imap_login_error(c, alice.address, f"wrong-{i}-{secrets.token_hex(3)}")
            t_fail = time.monotonic() - t
            expect("AUTHENTICATIONFAILED" in err, err)
            c = imaps(lab, P.imaps)
            t = time.monotonic()
            c.login(alice.address, alice.password)
            t_ok = time.monotonic() - t
            c.logout()
            timings.append((t_fail, t_ok))
        worst = max(max(a, b) for a, b in timings)
        expect(worst < 0.5, f"slow: {timings}")
        return "fail/ok ms: " + ", ".join(f"{a * 1000:.0f}/{b * 1000:.0f}" for a, b in timings)

    @check("auth failure penalty: wrong AUTH then correct AUTH (SMTP)")
    def _():
        s = submission(lab)
        t = time.monotonic()
        code, _ = smtp_auth_plain(s, alice.address, "wrong-" + secrets.token_hex(3))
        t_fail = time.monotonic() - t
        s.quit()
        expect(code == 535, f"code {code}")
        s = submission(lab)
        t = time.monotonic()
        code, _ = smtp_auth_plain(s, alice.address, alice.password)
        t_ok = time.monotonic() - t
        s.quit()
        expect(code == 235, f"code {code}")
        expect(max(t_fail, t_ok) < 0.5, f"slow {t_fail:.3f}/{t_ok:.3f}")
        return f"fail/ok ms: {t_fail * 1000:.0f}/{t_ok * 1000:.0f}"

    @check("set_password: next IMAP login and SMTP AUTH use the new password (no restart)")
    def _():
        old = lab.users["bob"].password
        c = imaps(lab, P.imaps)           # a lookup in this same second
        c.login(bob.address, old)
        c.logout()
        new = lab.set_password("bob", secrets.token_urlsafe(12)).password
        c = imaps(lab, P.imaps)
        c.login(bob.address, new)
        c.logout()
        err = imap_login_error(imaps(lab, P.imaps), bob.address, old)
        expect("AUTHENTICATIONFAILED" in err, err)
        s = submission(lab)
        code, _ = smtp_auth_plain(s, bob.address, new)
        s.quit()
        expect(code == 235, f"SMTP AUTH with new password: {code}")

    @check("add_user: IMAP login, SMTP AUTH and delivery to the new user at once")
    def _():
        name = "carol" + secrets.token_hex(2)
        # make smtpd processes busy with the old map first
        s = submission(lab)
        s.quit()
        u = lab.add_user(name, secrets.token_urlsafe(12))
        c = imaps(lab, P.imaps)
        c.login(u.address, u.password)
        c.logout()
        s = submission(lab)
        s.login(u.address, u.password)
        s.sendmail(u.address, [u.address], f"Subject: hi {name}\r\n\r\nx\r\n")
        s.quit()
        lab.wait_for_message(name, lambda m: m["Subject"] == f"hi {name}", timeout=10)
        return u.address

    @check("messages(): parses Maildir (new+cur, all folders)")
    def _():
        msgs = lab.messages("bcc")
        expect(any(m["Subject"] == subject for m in msgs), "sent message missing")
        return f"{len(msgs)} message(s) for bcc"

    @check("blackhole(): connect times out; rule removed afterwards")
    def _():
        with lab.blackhole() as port:
            rules = subprocess.run(["iptables", "-S", "INPUT"], capture_output=True,
                                   text=True).stdout
            expect(f"--dport {port}" in rules, "rule not installed")
            t = time.monotonic()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
                raise AssertionError("connect succeeded")
            except TimeoutError:
                waited = time.monotonic() - t
            except ConnectionRefusedError:
                raise AssertionError("connection refused (expected a timeout)") from None
        rules = subprocess.run(["iptables", "-S", "INPUT"], capture_output=True, text=True).stdout
        expect(f"--dport {port}" not in rules, "rule left behind")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        except ConnectionRefusedError:
            pass
        return f"timeout after {waited:.2f}s on port {port}"

    @check("log_tail(): every dovecot instance, postfix, oidc")
    def _():
        for which in ("dovecot", "dovecot-limited", "dovecot-selfsigned", "dovecot-expired",
                      "dovecot-wronghost", "dovecot-oauth", "postfix", "oidc"):
            expect(lab.log_tail(which, 5).strip() != "", f"{which} log empty")
        try:
            lab.log_tail("nope")
            raise AssertionError("unknown log accepted")
        except LabError:
            pass

    @check("second lab in another workdir runs at the same time")
    def _():
        other = MailLab(workroot / "second")
        other.start()
        try:
            mine, theirs = set(P.as_dict().values()), set(other.ports.as_dict().values())
            expect(not mine & theirs, f"shared ports {mine & theirs}")
            expect(other.run_dir != lab.run_dir, "shared run dir")
            for each in (lab, other):
                c = imaps(each, each.ports.imaps)
                c.login(each.users["alice"].address, each.users["alice"].password)
                c.logout()
            # each lab trusts only its own CA
            code = tls_verify_code(other.ports.imaps, "localhost", good_ctx)
            expect(code == 20, f"other lab's cert with our CA: verify code {code}")
        finally:
            other.stop()
        left = lab_processes(other)
        expect(not left, f"second lab left {left}")
        return f"start {other.timings['start']:.2f}s stop {other.timings['stop']:.2f}s"

    @check("same workdir twice -> LabError")
    def _():
        try:
            MailLab(lab.workdir).start()
            raise AssertionError("second start in the same workdir succeeded")
        except LabError as e:
            return str(e)


# ------------------------------------------------------------------ OAuth
XOAUTH2_REFUSED = {"status": "401", "schemes": "bearer", "scope": "mail"}
OAUTHBEARER_REFUSED = {"status": "invalid_token"}
SMTP_535 = (535, b"5.7.8 Error: authentication failed: (reason unavailable)")


def imap_sasl(lab: MailLab, port: int, mech: str, address: str, token: str,
              starttls: bool = False) -> tuple[list[bytes], bytes]:
    """AUTHENTICATE with the initial response (SASL-IR) on a raw connection, answering an
    error challenge as RFC 7628 says.  Returns (challenges, tagged reply line)."""
    blob = xoauth2(address, token) if mech == "XOAUTH2" else oauthbearer(address, token, port=port)
    sock = socket.create_connection((lab.host, port), timeout=TIMEOUT)
    try:
        if starttls:
            plain = sock.makefile("rb")
            plain.readline()                                  # greeting
            sock.sendall(b"s STARTTLS\r\n")
            expect(plain.readline().startswith(b"s OK"), "STARTTLS refused")
        sock = lab.ssl_context().wrap_socket(sock, server_hostname="127.0.0.1")
        f = sock.makefile("rb")
        if not starttls:
            f.readline()                                      # greeting
        sock.sendall(f"a AUTHENTICATE {mech} {base64.b64encode(blob).decode()}\r\n".encode())
        challenges = []
        for _ in range(3):
            line = f.readline()
            if line.startswith(b"+ "):
                challenges.append(base64.b64decode(line[2:].strip()))
                sock.sendall(b"AQ==\r\n" if mech == "OAUTHBEARER" else b"\r\n")
                continue
            return challenges, line.strip()
        raise AssertionError("no tagged reply")
    finally:
        sock.close()


def smtp_xoauth2(lab: MailLab, port: int, address: str, token: str) -> tuple[smtplib.SMTP, list]:
    """AUTH XOAUTH2 on a submission (STARTTLS) or smtps port; the client and the replies
    (a 334 challenge is answered with an empty line)."""
    if port == lab.ports.smtps_oauth:
        s = smtplib.SMTP_SSL(lab.host, port, context=lab.ssl_context(), timeout=TIMEOUT)
        s.ehlo("selfcheck.example")
    else:
        s = submission(lab, port)
    replies = [s.docmd("AUTH", "XOAUTH2 " + base64.b64encode(xoauth2(address, token)).decode())]
    if replies[0][0] == 334:
        replies.append(s.docmd(""))
    return s, replies


def run_oauth_checks(lab: MailLab) -> dict[str, str]:
    P, oauth = lab.ports, lab.oauth  # noqa: N806 - the lab's ports, as in run_checks
    alice, bob, bcc = lab.users["alice"], lab.users["bob"], lab.users["bcc"]
    state: dict[str, str] = {}

    def refused(mech: str, address: str, token: str) -> None:
        challenges, reply = imap_sasl(lab, P.imaps_oauth, mech, address, token)
        want = XOAUTH2_REFUSED if mech == "XOAUTH2" else OAUTHBEARER_REFUSED
        expect([json.loads(c) for c in challenges] == [want], f"challenges {challenges}")
        expect(reply == b"a NO [AUTHENTICATIONFAILED] Authentication failed.", f"{reply!r}")

    @check("oauth: discovery document, clients, code+PKCE flow gives refresh and access tokens")
    def _():
        import urllib.request
        with urllib.request.urlopen(oauth.discovery_url, timeout=TIMEOUT) as r:
            doc = json.load(r)
        expect(doc["issuer"] == oauth.issuer and doc["token_endpoint"] == oauth.token_url,
               "discovery")
        expect(doc["introspection_endpoint"] == oauth.introspection_url, "introspection url")
        expect(oauth.clients["exporter-public"].client_secret is None, "public client secret")
        tokens = oauth.tokens_for("alice")
        expect(tokens["scope"] == "mail" and tokens["refresh_token"], f"{sorted(tokens)}")
        state.update(access=tokens["access_token"], refresh=tokens["refresh_token"])
        return f"issuer {oauth.issuer}"

    @check("oauth: XOAUTH2 + OAUTHBEARER on imaps_oauth and imap_oauth (STARTTLS)")
    def _():
        for port, starttls in ((P.imaps_oauth, False), (P.imap_oauth, True)):
            for mech in ("XOAUTH2", "OAUTHBEARER"):
                challenges, reply = imap_sasl(lab, port, mech, alice.address, state["access"],
                                              starttls)
                expect(not challenges and reply.startswith(b"a OK"), f"{mech}: {reply!r}")

    @check("oauth: bad token -> '+ <base64 JSON>' then NO [AUTHENTICATIONFAILED]")
    def _():
        refused("XOAUTH2", alice.address, "garbage")
        refused("OAUTHBEARER", alice.address, "garbage")

    @check("oauth: refused as bearer: refresh token, password, alice's token for bob")
    def _():
        refused("XOAUTH2", alice.address, state["refresh"])
        refused("XOAUTH2", alice.address, alice.password)
        refused("XOAUTH2", bob.address, state["access"])

    @check("oauth port: password LOGIN works, a token as password does not")
    def _():
        c = imaps(lab, P.imaps_oauth)
        c.login(alice.address, alice.password)
        c.logout()
        err = imap_login_error(imaps(lab, P.imaps_oauth), alice.address, state["access"])
        expect("[AUTHENTICATIONFAILED]" in err, err)

    @check("oauth: client_credentials token (no sub) opens the bound mailbox only")
    def _():
        app = oauth.clients["daemon-app"]
        token = oauth.client_credentials_token()
        info = oauth.introspect(token)
        expect("sub" not in info and info["mailbox"] == app.mailbox, f"{info}")
        _, reply = imap_sasl(lab, P.imaps_oauth, "XOAUTH2", app.mailbox, token)
        expect(reply.startswith(b"a OK"), f"{reply!r}")
        other = bob.address if app.mailbox != bob.address else alice.address
        refused("XOAUTH2", other, token)
        return app.mailbox

    @check("oauth SMTP: XOAUTH2 235 on submission_oauth and smtps_oauth, delivered; bad: 334, 535")
    def _():
        subject = f"selfcheck oauth {secrets.token_hex(4)}"
        for port in (P.submission_oauth, P.smtps_oauth):
            s, replies = smtp_xoauth2(lab, port, alice.address, state["access"])
            expect(replies == [(235, b"2.7.0 Authentication successful")], f"{replies}")
            s.sendmail(alice.address, [bcc.address], f"Subject: {subject}\r\n\r\nx\r\n".encode())
            s.quit()
        lab.wait_for_message("bcc", lambda m: m["Subject"] == subject)
        s, replies = smtp_xoauth2(lab, P.submission_oauth, alice.address, "garbage")
        s.quit()
        expect(replies[0][0] == 334 and json.loads(base64.b64decode(replies[0][1])) == XOAUTH2_REFUSED
               and replies[1] == SMTP_535, f"{replies}")

    @check("oauth: refresh keeps scope mail and rotates; a replayed refresh token -> invalid_grant")
    def _():
        refreshed = oauth.refresh(state["refresh"])
        info = oauth.introspect(refreshed["access_token"])
        expect(info["scope"] == "mail" and info["mailbox"] == alice.address, f"{info}")
        expect(refreshed["refresh_token"] != state["refresh"], "not rotated")
        try:
            oauth.refresh(state["refresh"])
            raise AssertionError("old refresh token accepted")
        except OAuthError as e:
            expect(e.error == "invalid_grant", e.error)

    @check("oauth: revoking an access token ends it; revoking a refresh token ends its grant")
    def _():
        tokens = oauth.tokens_for("bob")
        oauth.revoke(tokens["access_token"])
        refused("XOAUTH2", bob.address, tokens["access_token"])
        again = oauth.refresh(tokens["refresh_token"])
        oauth.revoke(again["refresh_token"])
        expect(not oauth.introspect(again["access_token"])["active"], "grant survived")

    @check("oauth: token with 1 s TTL expires (introspection inactive, login refused)")
    def _():
        with oauth.configured(access_token_ttl=1):
            token = oauth.access_token_for("alice")
        deadline = time.monotonic() + 5
        while oauth.introspect(token)["active"]:
            expect(time.monotonic() < deadline, "still active after 5 s")
            time.sleep(0.05)
        refused("XOAUTH2", alice.address, token)

    @check("oauth: IdP stopped -> IMAP NO [UNAVAILABLE], SMTP 535; restarted: grants kept")
    def _():
        tokens = oauth.tokens_for("alice")
        oauth.stop()
        try:
            challenges, reply = imap_sasl(lab, P.imaps_oauth, "XOAUTH2", alice.address,
                                          tokens["access_token"])
            expect(not challenges and reply.startswith(
                b"a NO [UNAVAILABLE] Temporary authentication failure."), f"{reply!r}")
            s, replies = smtp_xoauth2(lab, P.submission_oauth, alice.address, tokens["access_token"])
            s.quit()
            expect(replies == [SMTP_535], f"{replies}")
        finally:
            oauth.start()
        refreshed = oauth.refresh(tokens["refresh_token"])
        challenges, reply = imap_sasl(lab, P.imaps_oauth, "XOAUTH2", alice.address,
                                      refreshed["access_token"])
        expect(reply.startswith(b"a OK"), f"{reply!r}")
        state["refresh"] = refreshed["refresh_token"]   # the restart check uses it

    @check("oauth: no token or client secret in the oidc, dovecot-oauth, postfix logs")
    def _():
        logs = "".join(lab.log_tail(w, 2000) for w in ("oidc", "dovecot-oauth", "postfix"))
        secrets_ = [state["refresh"], *(c.client_secret for c in oauth.clients.values()
                                         if c.client_secret)]
        expect(not [x for x in secrets_ if x in logs], "a secret is logged")
    return state


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--workdir", help="parent dir for the labs (default: a new temp dir)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("FAIL the mail lab needs root")
        return 2
    workroot = Path(args.workdir or tempfile.mkdtemp(prefix="maillab-selfcheck-"))
    workroot.mkdir(parents=True, exist_ok=True)
    lab = MailLab(workroot / "lab")
    print(f"workdir {lab.workdir}", flush=True)
    started = check("start()")(lambda: f"{lab.start().timings['start']:.2f}s "
                                        f"(tls {lab.timings.get('tls', 0):.2f}s)")
    if started:
        check("start() again is a no-op")(lambda: expect(lab.start() is lab and lab.running, "?"))
        oauth_state: dict[str, str] = {}
        try:
            run_checks(lab, workroot)
            oauth_state = run_oauth_checks(lab)
        finally:
            master_pids = {i.pid for i in lab._dovecots.values() if i.pid} | {os.getpid()}
            check("stop()")(lambda: lab.stop() or f"{lab.timings['stop']:.2f}s")

            @check("after stop(): no lab process (pgrep by config path, env marker), no zombie")
            def _():
                left = lab_processes(lab)
                expect(not left, f"left behind: {left}")
                zombies = defunct_children_of(master_pids)
                expect(not zombies, f"zombies: {zombies}")
                r = subprocess.run(["iptables", "-S", "INPUT"], capture_output=True, text=True)
                expect(f"maillab-{lab.id}" not in r.stdout, "iptables rule left")
                busy = [n for n, p in lab.ports.as_dict().items()
                        if subprocess.run(["ss", "-Htln", f"sport = :{p}"], capture_output=True,
                                          text=True).stdout.strip()]
                expect(not busy, f"still listening: {busy}")

            check("stop() again is a no-op")(lambda: lab.stop())

            @check("restart keeps ports, users, CA and OAuth grants")
            def _():
                before = (lab.ports.as_dict(), lab.ca_file.read_bytes())
                lab.start()
                try:
                    expect(lab.ports.as_dict() == before[0], "ports changed")
                    expect(lab.ca_file.read_bytes() == before[1], "CA changed")
                    c = imaps(lab, lab.ports.imaps)
                    c.login(lab.users["bob"].address, lab.users["bob"].password)
                    c.select("INBOX", readonly=True)
                    c.logout()
                    expect(any(m["Subject"] for m in lab.messages("bcc")), "mail lost")
                    if oauth_state.get("refresh"):   # the OAuth server's file store
                        expect(lab.oauth.refresh(oauth_state["refresh"])["scope"] == "mail",
                               "refresh token lost")
                finally:
                    lab.stop()
                expect(not lab_processes(lab), "left behind after restart+stop")
                return f"start {lab.timings['start']:.2f}s stop {lab.timings['stop']:.2f}s"
    else:
        lab.stop()
    failed = [r for r in results if not r[1]]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    if not args.keep and not failed and not args.workdir:
        shutil.rmtree(workroot, ignore_errors=True)
    elif failed:
        print(f"logs kept in {lab.workdir / 'logs'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
