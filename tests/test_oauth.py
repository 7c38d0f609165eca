"""OAuth 2.0 inboxes against the lab's real authorization server (oidc-provider) and a Dovecot
and Postfix that validate its tokens by introspection: each grant and mechanism, every failure
reason, token caching and rotation, `oauth login` end to end, and no secret anywhere."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from inbox_exporter.check import Checker
from inbox_exporter.config import Inbox, parse_config
from inbox_exporter.model import Category, Reason, Status, Step
from inbox_exporter.oauth import sasl
from inbox_exporter.oauth.tokens import REFRESH_FRACTION, REFRESH_MARGIN, TokenCache

from .conftest import check_now, wait_until
from .fakeserver import IMAP_GREETING, SMTP_GREETING, FakeServer

ROOT = Path(__file__).parent.parent
CLIENT_SECRET_ENV = "OAUTH_CLIENT_SECRET"
LOGIN_STEPS = (Step.IMAP_LOGIN, Step.SMTP_LOGIN)


def oauth_entry(lab, name: str, user: str = "alice", *, rt_file: Path | None = None,
                client: str = "exporter", **auth) -> dict:
    """A config entry for a lab user on the OAuth endpoints (IMAPS + submission/STARTTLS)."""
    c = lab.oauth.clients[client]
    settings = {"method": "oauth2", "token_url": lab.oauth.token_url,
                "authorization_url": lab.oauth.authorization_url, "client_id": c.client_id,
                "scope": "mail offline_access"}
    if c.client_secret is not None:
        settings["client_secret_env"] = CLIENT_SECRET_ENV
    if rt_file is not None:
        settings["refresh_token_file"] = str(rt_file)
    settings.update(auth)
    return {"name": name, "email": lab.users[user].address,
            "imap": {"host": lab.host, "port": lab.ports.imaps_oauth, "security": "ssl"},
            "smtp": {"host": lab.host, "port": lab.ports.submission_oauth, "security": "starttls"},
            "auth": settings}


def config_text(lab, entries: list[dict]) -> str:
    return yaml.safe_dump({"defaults": {"timeout": "5s", "ca_file": str(lab.ca_file),
                                        "test_email": {"to": lab.users["bcc"].address}},
                           "inboxes": entries})


def oauth_inbox(lab, name: str = "m365", user: str = "alice", *, env: dict | None = None,
                **kwargs) -> Inbox:
    environ = {CLIENT_SECRET_ENV: lab.oauth.clients[kwargs.get("client", "exporter")].client_secret
               or "", **(env or {})}
    return parse_config(config_text(lab, [oauth_entry(lab, name, user, **kwargs)]),
                        "test.yaml", environ).inboxes[0]


def refresh_file(tmp_path: Path, token: str, name: str = "rt") -> Path:
    path = tmp_path / name
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def failures(result) -> dict[Step, tuple[Category, Reason]]:
    return {s.step: (s.diagnosis.category, s.diagnosis.reason) for s in result.failures}


def assert_all_ok(result) -> None:
    assert result.ok, [(s.step.value, s.diagnosis) for s in result.failures]
    assert all(s.status is Status.OK for s in result.steps), result.steps


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_a_refresh_token_inbox_logs_in_and_sends_with_each_mechanism_and_one_token_request(
        lab, tmp_path, mechanism):
    rt = refresh_file(tmp_path, lab.oauth.refresh_token_for("alice"))
    inbox = oauth_inbox(lab, rt_file=rt, mechanism=mechanism)
    tokens = TokenCache()
    checker = Checker(tokens=tokens)
    results = [checker.check(inbox) for _ in range(3)]
    for r in results:
        assert_all_ok(r)
    # the test emails were really delivered by the OAuth submission port
    for r in results:
        lab.wait_for_message("bcc", lambda m, pid=r.probe_id: pid in m.get("Message-ID", ""))
    assert tokens.requests == 1  # cached: no token round trip for the 2nd and 3rd check


def test_an_app_only_client_credentials_inbox_logs_in_as_its_mailbox(lab):
    app = lab.oauth.clients["daemon-app"]
    user = app.mailbox.split("@")[0]
    inbox = oauth_inbox(lab, "app-only", user, client="daemon-app", grant="client_credentials",
                        scope="mail")
    assert_all_ok(Checker().check(inbox))


def test_a_revoked_refresh_token_is_oauth_invalid_grant_and_a_revoked_cached_token_is_rejected(
        lab, tmp_path):
    token = lab.oauth.refresh_token_for("alice")
    inbox = oauth_inbox(lab, rt_file=refresh_file(tmp_path, token))
    checker = Checker(tokens=TokenCache())
    assert_all_ok(checker.check(inbox))
    # Revoking ends the whole grant: the cached access token dies with the refresh token.
    lab.oauth.revoke((tmp_path / "rt").read_text().strip())  # the current (maybe rotated) one
    cached = checker.check(inbox)
    # IMAP is refused the cached token and drops it; SMTP then asks for a new one: no grant.
    assert failures(cached) == {Step.IMAP_LOGIN: (Category.UNAUTHORIZED, Reason.OAUTH_TOKEN_REJECTED),
                                Step.SMTP_LOGIN: (Category.UNAUTHORIZED, Reason.OAUTH_INVALID_GRANT)}
    assert "a cached" in cached.step(Step.IMAP_LOGIN).diagnosis.detail
    after = checker.check(inbox)
    assert failures(after) == {Step.IMAP_LOGIN: (Category.UNAUTHORIZED, Reason.OAUTH_INVALID_GRANT),
                               Step.SMTP_LOGIN: (Category.UNAUTHORIZED, Reason.OAUTH_INVALID_GRANT)}
    assert "oauth login" in after.step(Step.IMAP_LOGIN).diagnosis.hint


def test_a_wrong_client_secret_is_oauth_invalid_client(lab, tmp_path):
    rt = refresh_file(tmp_path, lab.oauth.refresh_token_for("alice"))
    inbox = oauth_inbox(lab, rt_file=rt, env={CLIENT_SECRET_ENV: "not-the-secret"})
    result = Checker().check(inbox)
    assert set(failures(result).values()) == {(Category.UNAUTHORIZED, Reason.OAUTH_INVALID_CLIENT)}
    assert result.step(Step.IMAP_CONNECT).status is Status.OK  # the mail server was fine


def test_a_token_for_another_mailbox_is_rejected_by_the_mail_server(lab, tmp_path):
    rt = refresh_file(tmp_path, lab.oauth.refresh_token_for("alice"))
    inbox = oauth_inbox(lab, "bob-with-alices-token", "bob", rt_file=rt)
    result = Checker().check(inbox)
    assert failures(result) == {s: (Category.UNAUTHORIZED, Reason.OAUTH_TOKEN_REJECTED)
                                for s in LOGIN_STEPS}
    detail = result.step(Step.IMAP_LOGIN).diagnosis.detail
    assert "a freshly issued" in detail and "status=401" in detail, detail


def test_the_token_endpoint_stopped_mid_run_and_back(lab, tmp_path):
    rt = refresh_file(tmp_path, lab.oauth.refresh_token_for("alice"))
    inbox = oauth_inbox(lab, rt_file=rt)
    lab.oauth.stop()
    try:
        down = Checker().check(inbox)  # no cached token: the check needs the endpoint
    finally:
        lab.oauth.start()
    # The step's own category: the identity provider is down, the mailbox may be fine.
    assert failures(down) == {
        Step.IMAP_LOGIN: (Category.IMAP_AUTHENTICATION_ERROR, Reason.OAUTH_TOKEN_ENDPOINT_UNAVAILABLE),
        Step.SMTP_LOGIN: (Category.SMTP_SETTINGS_INCORRECT, Reason.OAUTH_TOKEN_ENDPOINT_UNAVAILABLE)}
    assert "mailbox itself may be fine" in down.step(Step.IMAP_LOGIN).diagnosis.hint
    # the grant survived the restart (file-backed): the next check works
    assert_all_ok(Checker().check(inbox))


def test_a_rotated_refresh_token_is_written_back_atomically_with_mode_0600(lab, tmp_path):
    first = lab.oauth.refresh_token_for("alice")
    rt = refresh_file(tmp_path, first)
    rt.chmod(0o644)
    inbox = oauth_inbox(lab, rt_file=rt)
    assert_all_ok(Checker().check(inbox))
    rotated = rt.read_text().strip()
    assert rotated and rotated != first  # the lab's server rotates, as Microsoft does
    assert stat.S_IMODE(rt.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["rt"]  # no temporary file left behind
    # The old token is used up (a replay would revoke the grant): only the written-back one
    # lets a restarted exporter (a new cache, the config read again) log in.
    again = oauth_inbox(lab, rt_file=rt)
    assert_all_ok(Checker(tokens=TokenCache()).check(again))


def test_tokens_are_refreshed_ahead_of_expiry_and_concurrent_checks_share_one_request(lab, tmp_path):
    rt = refresh_file(tmp_path, lab.oauth.refresh_token_for("alice"))
    inbox = oauth_inbox(lab, rt_file=rt)
    now = [1000.0]
    tokens = TokenCache(clock=lambda: now[0])
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(
        tokens.access_token(inbox.oauth, 10).value)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(got) == 8 and len(set(got)) == 1 and tokens.requests == 1
    lifetime = lab.oauth.introspect(got[0])["exp"] - time.time()
    margin = min(REFRESH_MARGIN, lifetime * REFRESH_FRACTION)
    now[0] += lifetime - margin - 5  # still valid, not yet within the refresh margin
    assert tokens.access_token(inbox.oauth, 10).value == got[0] and tokens.requests == 1
    now[0] += 10  # within the margin: renewed before it expires
    renewed = tokens.access_token(inbox.oauth, 10)
    assert renewed.fresh and renewed.value != got[0] and tokens.requests == 2


def oauth_login(lab, tmp_path: Path, rt: Path, *, approve: bool) -> tuple[int, str, str, dict]:
    """Run `inbox-exporter oauth login` as a user would, and play that user in the browser:
    (exit code, everything it printed on stdout, stderr, its environment)."""
    config = tmp_path / "config.yaml"
    config.write_text(config_text(lab, [oauth_entry(lab, "m365", rt_file=rt)]))
    env = {**os.environ, CLIENT_SECRET_ENV: lab.oauth.clients["exporter"].client_secret}
    proc = subprocess.Popen(
        [sys.executable, "-m", "inbox_exporter", "oauth", "login", "--config.file", str(config),
         "--inbox", "m365", "--timeout", "60s"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:  # bounded: the command exits within its --timeout
            lines.append(line)
            if line.strip().startswith(lab.oauth.authorization_url):
                break
        url = lines[-1].strip() if lines else ""
        assert url.startswith(lab.oauth.authorization_url), "".join(lines)
        assert "code_challenge_method=S256" in url and "prompt=consent" in url
        lab.oauth.authorize(url, "alice", approve=approve, follow=True)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, "".join(lines) + out, err, env


def test_oauth_login_signs_in_once_and_writes_the_refresh_token(lab, tmp_path):
    rt = tmp_path / "login" / "rt"
    rt.parent.mkdir()
    code, out, err, env = oauth_login(lab, tmp_path, rt, approve=True)
    assert code == 0, err
    token = rt.read_text().strip()
    assert token and stat.S_IMODE(rt.stat().st_mode) == 0o600
    assert token not in out + err
    inbox = parse_config((tmp_path / "config.yaml").read_text(), "c.yaml", env).inboxes[0]
    assert_all_ok(Checker().check(inbox))


def test_oauth_login_refused_by_the_user_is_a_one_line_error_and_writes_nothing(lab, tmp_path):
    rt = tmp_path / "rt"
    code, _, err, _ = oauth_login(lab, tmp_path, rt, approve=False)
    assert code == 1
    assert re.fullmatch(r"error: the identity provider refused: access_denied.*\n", err), err
    assert not rt.exists()


# --- the public replies of Gmail and Microsoft 365 to a refused token ----------------------

GMAIL_ERROR = base64.b64encode(json.dumps(
    {"status": "400", "schemes": "Bearer", "scope": "https://mail.google.com/"}).encode()).decode()
PUBLIC_REPLIES = {
    # https://developers.google.com/gmail/imap/xoauth2-protocol#error_response
    "gmail-imap": ("imap", [
        (None, IMAP_GREETING),
        (r"CAPABILITY", "* CAPABILITY IMAP4rev1 AUTH=XOAUTH2 AUTH=OAUTHBEARER SASL-IR\r\n{tag} OK done\r\n"),
        (r"^\S+ AUTHENTICATE XOAUTH2 \S+$", f"+ {GMAIL_ERROR}\r\n"),
        (r"^$", "{tag} NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n")]),
    "gmail-smtp": ("smtp", [
        (None, SMTP_GREETING),
        (r"^EHLO", "250-smtp.gmail.com\r\n250-AUTH LOGIN PLAIN XOAUTH2 OAUTHBEARER\r\n250 8BITMIME\r\n"),
        (r"^AUTH XOAUTH2 \S+$", f"334 {GMAIL_ERROR}\r\n"),
        (r"^$", "535-5.7.8 Username and Password not accepted. For more information, go to\r\n"
                "535 5.7.8  https://support.google.com/mail/?p=BadCredentials\r\n")]),
    # Microsoft 365 answers at once, without an error challenge.
    "m365-imap": ("imap", [
        (None, IMAP_GREETING),
        (r"CAPABILITY", "* CAPABILITY IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR\r\n{tag} OK done\r\n"),
        (r"^\S+ AUTHENTICATE XOAUTH2 \S+$", "{tag} NO AUTHENTICATE failed.\r\n")]),
    # SMTP AUTH off for the mailbox refuses tokens too: not "move to OAuth" (basic_auth_disabled).
    "m365-smtp-auth-disabled": ("smtp", [
        (None, SMTP_GREETING),
        (r"^EHLO", "250-outlook.office365.com\r\n250-AUTH LOGIN XOAUTH2\r\n250 8BITMIME\r\n"),
        (r"^AUTH XOAUTH2 \S+$", "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication "
                                "is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled\r\n")]),
    "m365-smtp": ("smtp", [
        (None, SMTP_GREETING),
        (r"^EHLO", "250-outlook.office365.com\r\n250-AUTH LOGIN XOAUTH2\r\n250 8BITMIME\r\n"),
        (r"^AUTH XOAUTH2 \S+$", "535 5.7.3 Authentication unsuccessful [SN4PR0501CA0056]\r\n")]),
}


@pytest.mark.parametrize("name", sorted(PUBLIC_REPLIES))
def test_the_public_replies_to_a_refused_token_are_oauth_token_rejected(lab, tmp_path, name):
    protocol, script = PUBLIC_REPLIES[name]
    rt = refresh_file(tmp_path, lab.oauth.refresh_token_for("alice"))
    with FakeServer(script) as server:
        other = "smtp" if protocol == "imap" else "imap"
        entry = oauth_entry(lab, "public", rt_file=rt)
        entry[protocol] = {"host": "127.0.0.1", "port": server.port, "security": "none"}
        entry[other] = {"host": "127.0.0.1", "port": 1, "security": "none"}
        entry["allow_plaintext_login"] = True  # the scripted servers speak no TLS
        environ = {CLIENT_SECRET_ENV: lab.oauth.clients["exporter"].client_secret}
        inbox = parse_config(config_text(lab, [entry]), "t.yaml", environ).inboxes[0]
        tokens = TokenCache()
        result = Checker(tokens=tokens).check(inbox)
        Checker(tokens=tokens).check(inbox)
    step = Step.IMAP_LOGIN if protocol == "imap" else Step.SMTP_LOGIN
    d = result.step(step).diagnosis
    assert (d.category, d.reason) == (Category.UNAUTHORIZED, Reason.OAUTH_TOKEN_REJECTED), d
    if name.startswith("gmail"):
        assert "status=400" in d.detail and "scope=https://mail.google.com/" in d.detail
        sent = server.transcripts[0]
        assert sent[-1] == "" or sent[-2] == ""  # answered the error challenge with an empty line
    assert tokens.requests == 2  # the refused token was dropped: the next check asked anew


# --- no secret anywhere --------------------------------------------------------------------

def test_no_token_or_client_secret_appears_in_output_logs_status_metrics_or_alerts(
        lab, tmp_path, caplog):
    from inbox_exporter.daemon import Exporter
    from inbox_exporter.web import WebServer

    from .httpcapture import Capture

    good_rt = refresh_file(tmp_path, lab.oauth.refresh_token_for("alice"), "good")
    bad_rt = refresh_file(tmp_path, lab.oauth.refresh_token_for("alice"), "bad")
    entries = [oauth_entry(lab, "good", rt_file=good_rt),
               oauth_entry(lab, "foreign", "bob", rt_file=bad_rt)]  # refused: a token for alice
    secret = lab.oauth.clients["exporter"].client_secret
    with Capture() as hook, Capture() as am:
        doc = yaml.safe_load(config_text(lab, entries))
        doc["alerting"] = {"failure_threshold": 1, "alertmanager": {"url": am.url},
                           "webhooks": [{"url": hook.url + "/hook"}]}
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(doc))
        caplog.set_level(logging.DEBUG)
        exporter = Exporter(str(config), environ={CLIENT_SECRET_ENV: secret})
        server = WebServer(("127.0.0.1", 0), exporter)
        exporter.start()
        server.start()
        try:
            base = f"http://127.0.0.1:{server.server_address[1]}"
            import urllib.request

            def get(path: str) -> str:
                with urllib.request.urlopen(base + path, timeout=30) as r:
                    return r.read().decode()

            wait_until(lambda: all(s["last_check"] for s in
                                   json.loads(get("/api/v1/status"))["inboxes"]),
                       30, "both inboxes checked")
            hook.wait_for(1)
            am.wait_for(1)
            shown = get("/") + get("/api/v1/status") + get("/metrics")
            held = exporter.tokens.secrets()
        finally:
            exporter.stop(5)
            server.stop()
        payloads = "".join(r["body"] for r in hook.requests + am.requests)
    assert "oauth_token_rejected" in shown + payloads  # the failure is really there
    logs = "\n".join(r.getMessage() + json.dumps(r.__dict__, default=str) for r in caplog.records)
    tokens = set(held) | {good_rt.read_text().strip(), bad_rt.read_text().strip(), secret}
    assert len(tokens) >= 4  # access and refresh tokens, the client secret
    for token in tokens:
        for form in (token, base64.b64encode(token.encode()).decode()):
            assert form not in shown and form not in payloads and form not in logs
    for user in ("alice", "bob"):
        for token in held:
            blob = sasl.initial_response(sasl.XOAUTH2, lab.users[user].address, token, lab.host,
                                         lab.ports.imaps_oauth)
            assert base64.b64encode(blob).decode() not in shown + payloads + logs


def test_the_daemon_exports_token_requests_and_the_login_method(lab, tmp_path):
    from prometheus_client import CollectorRegistry

    from inbox_exporter.daemon import Exporter
    from inbox_exporter.status import inbox_status

    rt = refresh_file(tmp_path, lab.oauth.refresh_token_for("alice"))
    config = tmp_path / "config.yaml"
    config.write_text(config_text(lab, [oauth_entry(lab, "m365", rt_file=rt)]))
    registry = CollectorRegistry()
    exporter = Exporter(str(config), registry=registry,
                        environ={CLIENT_SECRET_ENV: lab.oauth.clients["exporter"].client_secret})
    exporter.start()
    try:
        inbox = exporter.config.inboxes[0]
        for _ in range(2):
            check_now(exporter, inbox.name)
        body = b"".join(exporter.render_metrics()).decode()
    finally:
        exporter.stop(5)
    assert registry.get_sample_value("inbox_exporter_oauth_token_requests_total",
                                     {"result": "ok"}) == 1
    assert registry.get_sample_value("inbox_exporter_oauth_token_requests_total",
                                     {"result": "invalid_grant"}) == 0
    assert re.search(r'^inbox_info\{inbox="m365",.*auth="oauth2".*\} 1$', body, re.M), body
    assert re.search(r'^inbox_check_success\{inbox="m365"\} 1$', body, re.M)
    assert inbox_status(exporter.store.get("m365"), None)["auth"] == "oauth2 (xoauth2, refresh_token)"


def test_no_token_is_in_an_exception_a_failed_oauth_login_raised(lab, tmp_path, monkeypatch):
    import traceback

    from inbox_exporter import check as check_module

    seen = []
    real = check_module.classify
    monkeypatch.setattr(check_module, "classify", lambda step, exc, phase, ctx, secrets: (
        seen.append(exc) or real(step, exc, phase, ctx, secrets)))
    rt = refresh_file(tmp_path, lab.oauth.refresh_token_for("alice"))
    tokens = TokenCache()
    secret = lab.oauth.clients["exporter"].client_secret
    Checker(tokens=tokens).check(oauth_inbox(lab, "refused", "bob", rt_file=rt))  # token refused
    Checker(tokens=tokens).check(oauth_inbox(lab, "bad-client", rt_file=rt,
                                             env={CLIENT_SECRET_ENV: secret + "x"}))
    assert len(seen) == 4
    held = [*tokens.secrets(), rt.read_text().strip(), secret]
    for exc in seen:
        text = "".join(traceback.format_exception(exc)) + repr(exc)
        for token in held:
            assert token not in text and base64.b64encode(token.encode()).decode() not in text


def test_a_hanging_token_endpoint_is_asked_once_not_by_every_check(lab, tmp_path):
    """An identity provider that black-holes requests must not hold the check workers: after
    one timed-out request the endpoint is not asked again for a while (checks fail at once),
    then one request probes it."""
    rt = refresh_file(tmp_path, lab.oauth.refresh_token_for("alice"))
    entry = {**oauth_entry(lab, "m365", rt_file=rt), "timeout": "2s"}
    environ = {CLIENT_SECRET_ENV: lab.oauth.clients["exporter"].client_secret}
    inbox = parse_config(config_text(lab, [entry]), "t.yaml", environ).inboxes[0]
    offset = [0.0]
    tokens = TokenCache(clock=lambda: time.monotonic() + offset[0])
    checker = Checker(tokens=tokens)
    with lab.blackhole(port=lab.ports.oidc):
        first = checker.check(inbox)
        t0 = time.monotonic()
        second = checker.check(inbox)
        fast = time.monotonic() - t0
    for result in (first, second):
        assert {r for _, r in failures(result).values()} == {Reason.OAUTH_TOKEN_ENDPOINT_UNAVAILABLE}
    assert tokens.requests == 1  # the first check's IMAP leg; its SMTP leg and the next failed at once
    assert fast < 1.0 and "not asked again" in second.step(Step.IMAP_LOGIN).diagnosis.detail
    offset[0] += 31  # the back-off is over: one request probes the endpoint, which is back
    assert_all_ok(checker.check(inbox))
    assert tokens.requests == 2
