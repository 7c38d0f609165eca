"""`inbox-exporter oauth login`: the one-time sign-in that yields an inbox's refresh token.

The authorization-code flow with PKCE (RFC 7636) and a loopback redirect (RFC 8252 7.3): we
print the URL to open, listen once on 127.0.0.1 (a port of the system's choosing) for the
browser's redirect, exchange the code (authlib), and write the refresh token to the inbox's
`refresh_token_file` (0600). The token is never printed.
"""

from __future__ import annotations

import http.server
import secrets
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import httpx2 as httpx
from authlib.common.security import generate_token
from authlib.integrations.base_client import OAuthError
from authlib.integrations.httpx_client import OAuth2Client

from ..config import Inbox
from ..probes.transport import context_for
from .tokens import write_secret_file

CALLBACK_PATH = "/callback"
_PAGE = (b"<!doctype html><meta charset=utf-8><title>inbox-exporter</title>"
         b"<p>%s</p><p>You can close this tab.</p>")


class LoginError(Exception):
    """The sign-in did not produce a refresh token; the message says why, in one line."""


class _Callback:
    """The one redirect we wait for: its query parameters, once."""

    def __init__(self) -> None:
        self.params: dict[str, str] | None = None
        self.done = threading.Event()


def _server(callback: _Callback, host: str) -> http.server.HTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's name
            parts = urlsplit(self.path)
            if parts.path != CALLBACK_PATH or callback.done.is_set():
                self.send_error(404)
                return
            callback.params = {k: v[0] for k, v in parse_qs(parts.query).items()}
            ok = "code" in callback.params
            body = _PAGE % (b"Signed in: inbox-exporter is fetching the refresh token."
                            if ok else b"The sign-in failed: see the terminal.")
            self.send_response(200 if ok else 400)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            callback.done.set()

        def log_message(self, format: str, *args: object) -> None:  # the URL holds the code
            pass

    server = http.server.HTTPServer((host, 0), Handler)
    server.timeout = 0.5  # handle_request() returns to check the deadline
    return server


def login(inbox: Inbox, *, say: Callable[[str], None] = print, timeout: float = 300.0,
          host: str = "127.0.0.1") -> str:
    """Run the flow for `inbox`; returns the path the refresh token was written to."""
    oauth = inbox.oauth
    if oauth is None:
        raise LoginError(f"inbox {inbox.name} does not use auth.method: oauth2")
    if oauth.grant != "refresh_token":
        raise LoginError(f"inbox {inbox.name} uses grant: {oauth.grant}: it needs no sign-in")
    if not oauth.refresh_token_file:
        raise LoginError(f"inbox {inbox.name}: set auth.refresh_token_file (where the refresh "
                         "token is written) instead of refresh_token_env")
    if not oauth.authorization_url:
        raise LoginError(f"inbox {inbox.name}: set auth.authorization_url (the identity "
                         "provider's authorization endpoint)")
    callback = _Callback()
    server = _server(callback, host)
    redirect_uri = f"http://{host}:{server.server_address[1]}{CALLBACK_PATH}"
    secret = oauth.client_secret.get_secret_value() if oauth.client_secret else None
    client = OAuth2Client(client_id=oauth.client_id, client_secret=secret, scope=oauth.scope,
                          redirect_uri=redirect_uri, code_challenge_method="S256",
                          token_endpoint_auth_method="client_secret_basic" if secret else "none",
                          timeout=httpx.Timeout(30.0), verify=context_for(oauth.ca_file, False))
    try:
        params = dict(oauth.authorize_params)
        if "offline_access" in (oauth.scope or "").split():
            # OpenID Connect issues a refresh token for offline_access only after consent;
            # a preset's own prompt (Microsoft: select_account) wins.
            params.setdefault("prompt", "consent")
        verifier = generate_token(48)
        url, state = client.create_authorization_url(
            oauth.authorization_url, state=secrets.token_urlsafe(24), code_verifier=verifier,
            login_hint=inbox.username, **params)
        say(f"Open this URL in a browser and sign in as {inbox.username}:\n\n  {url}\n\n"
            f"Waiting up to {timeout:g}s for the redirect to {redirect_uri} ...")
        deadline = time.monotonic() + timeout
        while not callback.done.is_set():  # bounded: by the deadline
            if time.monotonic() >= deadline:
                raise LoginError(f"no sign-in within {timeout:g}s")
            server.handle_request()
        got = callback.params or {}
        if got.get("state") != state:
            raise LoginError("the redirect's state does not match: not the sign-in we started")
        if "error" in got:
            raise LoginError(f"the identity provider refused: {got['error']}"
                             + (f": {got['error_description']}" if got.get("error_description") else ""))
        try:
            token = client.fetch_token(oauth.token_url, grant_type="authorization_code",
                                       code=got.get("code", ""), code_verifier=verifier,
                                       redirect_uri=redirect_uri)
        except OAuthError as e:
            raise LoginError(f"the token endpoint refused the code: {e.error}"
                             + (f": {e.description}" if e.description else "")) from None
        except httpx.HTTPError as e:
            raise LoginError(f"the token endpoint failed: {type(e).__name__}") from None
        refresh = token.get("refresh_token")
        if not refresh:
            raise LoginError("the identity provider issued no refresh token: add offline_access "
                             "to auth.scope (Microsoft, OpenID Connect providers)")
        try:
            write_secret_file(oauth.refresh_token_file, refresh)
        except OSError as e:
            raise LoginError(f"cannot write {oauth.refresh_token_file}: {e.strerror}") from None
        say(f"Refresh token written to {oauth.refresh_token_file} (mode 0600). "
            "Reload the exporter (SIGHUP) to use it.")
        return oauth.refresh_token_file
    finally:
        server.server_close()
        client.close()
