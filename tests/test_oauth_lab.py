"""The lab's OAuth side on its own, with stdlib clients: the authorization server (oidc-provider)
issues, refreshes, rotates, revokes and keeps tokens across a restart; the `oauth` Dovecot and
the Postfix *_oauth ports accept its access tokens (XOAUTH2, OAUTHBEARER) and refuse everything
else with the answers the exporter has to classify."""

from __future__ import annotations

import base64
import http.server
import imaplib
import json
import smtplib
import threading
import time
import urllib.parse
import uuid
from typing import ClassVar

import pytest

from maillab import LabError
from maillab.oauth import OAuthError, oauthbearer, xoauth2

UNAVAILABLE = "[UNAVAILABLE] Temporary authentication failure."
REFUSED_XOAUTH2 = {"status": "401", "schemes": "bearer", "scope": "mail"}
REFUSED_OAUTHBEARER = {"status": "invalid_token"}


def imap_authenticate(lab, mech: str, user: str, token: str, port: int | None = None):
    """AUTHENTICATE as a client does it; returns (ok, error text, [server challenges])."""
    port = port or lab.ports.imaps_oauth
    address = lab.users[user].address
    challenges: list[bytes] = []

    def respond(challenge: bytes) -> bytes:
        if challenge:        # an error challenge (RFC 7628 §3.2.2): finish the exchange
            challenges.append(challenge)
            return b"\x01" if mech == "OAUTHBEARER" else b""
        return xoauth2(address, token) if mech == "XOAUTH2" else oauthbearer(address, token, port=port)

    with imaplib.IMAP4_SSL(lab.host, port, ssl_context=lab.ssl_context(), timeout=10) as c:
        try:
            c.authenticate(mech, respond)
        except imaplib.IMAP4.error as e:
            return False, str(e), challenges
        assert c.select("INBOX", readonly=True)[0] == "OK"
        return True, "", challenges


def refused(lab, mech: str, user: str, token: str) -> None:
    ok, error, challenges = imap_authenticate(lab, mech, user, token)
    assert not ok
    assert "[AUTHENTICATIONFAILED] Authentication failed." in error
    expected = REFUSED_XOAUTH2 if mech == "XOAUTH2" else REFUSED_OAUTHBEARER
    assert [json.loads(c) for c in challenges] == [expected]


def smtp_authenticate(lab, user: str, token: str, port: int | None = None):
    """AUTH XOAUTH2 with the initial response on a STARTTLS port; returns the open client."""
    s = smtplib.SMTP(lab.host, port or lab.ports.submission_oauth, timeout=10)
    s.starttls(context=lab.ssl_context())
    s.ehlo()
    blob = base64.b64encode(xoauth2(lab.users[user].address, token)).decode()
    code, text = s.docmd("AUTH", "XOAUTH2 " + blob)
    return s, code, text


@pytest.mark.parametrize("mech", ["XOAUTH2", "OAUTHBEARER"])
def test_a_fresh_access_token_logs_in_on_imaps_oauth(lab, mech):
    assert imap_authenticate(lab, mech, "alice", lab.oauth.access_token_for("alice")) == (True, "", [])


def test_a_public_client_gets_tokens_with_pkce_alone(lab):
    tokens = lab.oauth.tokens_for("bob", client="exporter-public")
    assert tokens["scope"] == "mail" and tokens["refresh_token"]
    assert imap_authenticate(lab, "XOAUTH2", "bob", tokens["access_token"])[0]


@pytest.mark.parametrize("mech", ["XOAUTH2", "OAUTHBEARER"])
def test_garbage_and_revoked_tokens_get_the_error_challenge_then_authenticationfailed(lab, mech):
    refused(lab, mech, "alice", "not-a-token")
    token = lab.oauth.access_token_for("alice")
    lab.oauth.revoke(token)
    refused(lab, mech, "alice", token)


def test_passwords_still_work_on_the_oauth_port_and_a_token_is_no_password(lab):
    alice = lab.users["alice"]
    token = lab.oauth.access_token_for("alice")
    with imaplib.IMAP4_SSL(lab.host, lab.ports.imaps_oauth, ssl_context=lab.ssl_context()) as c:
        assert c.login(alice.address, alice.password)[0] == "OK"
    with (imaplib.IMAP4_SSL(lab.host, lab.ports.imaps_oauth, ssl_context=lab.ssl_context()) as c,
          pytest.raises(imaplib.IMAP4.error, match=r"AUTHENTICATIONFAILED")):
        c.login(alice.address, token)
    # ... nor a password a token
    refused(lab, "XOAUTH2", "alice", alice.password)


def test_a_token_opens_only_its_own_mailbox(lab):
    token = lab.oauth.access_token_for("alice")
    refused(lab, "XOAUTH2", "bob", token)
    assert imap_authenticate(lab, "XOAUTH2", "alice", token)[0]


def test_a_client_credentials_token_logs_in_as_the_bound_mailbox_only(lab):
    app = lab.oauth.clients["daemon-app"]
    token = lab.oauth.client_credentials_token()
    info = lab.oauth.introspect(token)
    assert info["active"] and "sub" not in info and info["mailbox"] == app.mailbox
    bound = app.mailbox.split("@")[0]
    other = "bob" if bound != "bob" else "alice"
    assert imap_authenticate(lab, "XOAUTH2", bound, token)[0]
    refused(lab, "XOAUTH2", other, token)


def test_a_refresh_token_is_no_bearer_token(lab):
    tokens = lab.oauth.tokens_for("alice")
    assert lab.oauth.introspect(tokens["refresh_token"]) == {"active": False}  # Dovecot's view
    assert lab.oauth.introspect(tokens["refresh_token"], client="exporter")["active"]
    refused(lab, "XOAUTH2", "alice", tokens["refresh_token"])


def test_smtp_xoauth2_on_submission_oauth_delivers_and_a_bad_token_gets_334_then_535(lab):
    subject = f"oauth-lab {uuid.uuid4()}"
    s, code, text = smtp_authenticate(lab, "alice", lab.oauth.access_token_for("alice"))
    with s:
        assert (code, text) == (235, b"2.7.0 Authentication successful")
        s.sendmail(lab.users["alice"].address, [lab.users["bcc"].address],
                   f"Subject: {subject}\r\n\r\nsent with a bearer token\r\n".encode())
    assert lab.wait_for_message("bcc", lambda m: m["Subject"] == subject)
    s, code, text = smtp_authenticate(lab, "alice", "not-a-token")
    with s:
        assert code == 334 and json.loads(base64.b64decode(text)) == REFUSED_XOAUTH2
        assert s.docmd("") == (535, b"5.7.8 Error: authentication failed: (reason unavailable)")


def test_refresh_keeps_scope_mail_and_rotates_the_refresh_token(lab):
    first = lab.oauth.refresh_token_for("alice")
    refreshed = lab.oauth.refresh(first)
    assert refreshed["scope"] == "mail"
    info = lab.oauth.introspect(refreshed["access_token"])
    assert info["active"] and info["scope"] == "mail" and info["mailbox"] == lab.users["alice"].address
    assert refreshed["refresh_token"] != first                  # rotated, as Microsoft does
    with pytest.raises(OAuthError) as reuse:
        lab.oauth.refresh(first)
    assert reuse.value.error == "invalid_grant"
    # a replayed refresh token revokes the whole grant, the rotated one included
    assert not lab.oauth.introspect(refreshed["refresh_token"], client="exporter")["active"]


def test_without_rotation_the_refresh_token_is_reused(lab):
    with lab.oauth.configured(rotate_refresh_tokens=False):
        first = lab.oauth.refresh_token_for("bob")
        assert lab.oauth.refresh(first)["refresh_token"] == first
        assert lab.oauth.refresh(first)["refresh_token"] == first   # and again


def test_short_lived_tokens_expire(lab):
    with lab.oauth.configured(access_token_ttl=1):
        tokens = lab.oauth.tokens_for("alice")
    assert tokens["expires_in"] == 1
    deadline = time.monotonic() + 5
    while lab.oauth.introspect(tokens["access_token"])["active"]:
        assert time.monotonic() < deadline, "a 1 s token still active after 5 s"
        time.sleep(0.1)
    refused(lab, "XOAUTH2", "alice", tokens["access_token"])
    assert lab.oauth.refresh(tokens["refresh_token"])["expires_in"] == 3600  # the default again


def test_an_identity_provider_outage_is_unavailable_and_grants_survive_the_restart(lab):
    tokens = lab.oauth.tokens_for("alice")
    lab.oauth.stop()
    try:
        ok, error, challenges = imap_authenticate(lab, "XOAUTH2", "alice", tokens["access_token"])
        assert not ok and UNAVAILABLE in error and challenges == []
        s, code, text = smtp_authenticate(lab, "alice", tokens["access_token"])
        with s:   # Postfix does not pass Dovecot's temporary failure on
            assert (code, text) == (535, b"5.7.8 Error: authentication failed: (reason unavailable)")
        with pytest.raises(LabError):  # the token endpoint refuses connections
            lab.oauth.refresh(tokens["refresh_token"])
    finally:
        lab.oauth.start()
    assert imap_authenticate(lab, "XOAUTH2", "alice", tokens["access_token"])[0]
    assert lab.oauth.refresh(tokens["refresh_token"])["scope"] == "mail"


class _Listener(http.server.BaseHTTPRequestHandler):
    got: ClassVar[list[str]] = []  # shared by the handler instances: one per request

    def do_GET(self):
        type(self).got.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"signed in")

    def log_message(self, *args):
        pass


def test_authorize_returns_the_redirect_and_follows_it_to_any_loopback_port(lab):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Listener)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        redirect_uri = f"http://127.0.0.1:{server.server_port}/callback"   # RFC 8252 §7.3
        url = lab.oauth.authorization_request("exporter", redirect_uri=redirect_uri, state="s1",
                                              code_challenge="E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM")
        final = lab.oauth.authorize(url, "alice", follow=True)
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(final).query))
        assert final.startswith(redirect_uri + "?") and query["state"] == "s1" and query["code"]
        assert query["iss"] == lab.oauth.issuer
        assert _Listener.got == [urllib.parse.urlsplit(final).path + "?" + urllib.parse.urlsplit(final).query]
        denied = lab.oauth.authorize(url, "alice", approve=False)
        assert dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(denied).query))["error"] == "access_denied"
        with pytest.raises(LabError, match="HTTP 401"):       # the login page checks the password
            lab.oauth.authorize(url, "alice", password="not-alices-password")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_no_token_reaches_a_log(lab):
    tokens = lab.oauth.tokens_for("alice")
    assert imap_authenticate(lab, "XOAUTH2", "alice", tokens["access_token"])[0]
    refused(lab, "XOAUTH2", "alice", tokens["refresh_token"])
    logs = lab.log_tail("oidc", 400) + lab.log_tail("dovecot-oauth", 400) + lab.log_tail("postfix", 400)
    assert "POST /token 200" in logs and "method=XOAUTH2" in logs
    for secret in (tokens["access_token"], tokens["refresh_token"],
                   *(c.client_secret for c in lab.oauth.clients.values() if c.client_secret)):
        assert secret not in logs
