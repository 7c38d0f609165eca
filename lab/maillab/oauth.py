"""The lab's OAuth 2.0 authorization server and a stdlib client for it.

A real `oidc-provider` (npm, see oidc/package.json) under the machine's node, on
http://127.0.0.1:<port>.  Dovecot's `oauth` instance validates its access tokens by
RFC 7662 introspection.  The Python side writes the server's config, starts and stops it,
and drives the authorization-code flow (dev login and consent pages) over plain HTTP, so
tests get refresh and access tokens without a browser.  See ../README.md ("OAuth").
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import http.cookiejar
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from .errors import LabError
from .util import (
    ENV_MARKER,
    is_alive,
    log_excerpt,
    new_lines_matching,
    terminate_tree,
    wait_until,
    write_file,
)

OIDC_DIR = Path(__file__).resolve().parent / "oidc"
SERVER_SCRIPT = OIDC_DIR / "server.mjs"
# The audience of the mail access tokens (an RFC 8707 resource indicator); clients need
# not send it: it is every request's default resource.
RESOURCE = "urn:maillab:mail"
SCOPE = "mail"
USER_SCOPE = "mail offline_access"
# Registered for both user clients.  Any port is accepted on them (RFC 8252 §7.3, built into
# oidc-provider for application_type "native"): http://127.0.0.1:53123/callback is fine.
REDIRECT_URIS = ("http://127.0.0.1/callback", "http://localhost/callback",
                 "http://127.0.0.1/", "http://localhost/")
DEFAULT_REDIRECT_URI = "http://127.0.0.1/callback"
# The client Dovecot uses to call the introspection endpoint (sees access tokens only).
RESOURCE_SERVER_CLIENT = "dovecot"
_HTTP_TIMEOUT = 10.0
_MAX_FLOW_STEPS = 12     # GETs/POSTs of one authorization: redirects, login, consent


class OAuthError(LabError):
    """An OAuth endpoint answered with an error (RFC 6749 §5.2 JSON, or an error redirect)."""

    def __init__(self, status: int, error: str, description: str = ""):
        super().__init__(f"OAuth error {error!r} (HTTP {status}): {description}")
        self.status = status
        self.error = error
        self.description = description


@dataclass(frozen=True)
class OAuthClient:
    client_id: str
    client_secret: str | None          # None: a public client (token_endpoint_auth_method none)
    grant_types: tuple[str, ...]
    redirect_uris: tuple[str, ...] = ()
    mailbox: str | None = None         # client_credentials clients: the mailbox their tokens open

    @property
    def public(self) -> bool:
        return self.client_secret is None

    def metadata(self) -> dict:
        """oidc-provider client metadata."""
        m = {"client_id": self.client_id,
             "grant_types": list(self.grant_types),
             "redirect_uris": list(self.redirect_uris),
             "response_types": ["code"] if "authorization_code" in self.grant_types else [],
             # a secret client may use client_secret_post as well: oidc-provider accepts
             # both for a client registered with either
             "token_endpoint_auth_method": "none" if self.public else "client_secret_basic"}
        if self.redirect_uris:
            # "native": loopback redirect URIs with any port (RFC 8252 §7.3)
            m["application_type"] = "native"
        if self.client_secret is not None:
            m["client_secret"] = self.client_secret
        if self.mailbox is not None:
            m["mailbox"] = self.mailbox
        return m


def node_binary() -> str | None:
    return shutil.which("node", path="/usr/local/bin:/usr/bin:/bin")


def check_installed() -> str:
    """LabError unless node and the pinned npm modules are there; the node binary."""
    node = node_binary()
    if node is None:
        raise LabError("node is not installed (the lab's OAuth server needs nodejs); run scripts/setup")
    if not (OIDC_DIR / "node_modules" / "oidc-provider" / "package.json").exists():
        raise LabError(f"the npm modules of {OIDC_DIR} are missing "
                       f"(npm ci there); run scripts/setup")
    return node


def xoauth2(address: str, token: str) -> bytes:
    """The XOAUTH2 client response (Google/Microsoft), before base64."""
    return f"user={address}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer(address: str, token: str, host: str = "127.0.0.1", port: int = 0) -> bytes:
    """The OAUTHBEARER client response (RFC 7628 §3.1), before base64."""
    return f"n,a={address},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01".encode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge)."""
    verifier = secrets.token_urlsafe(48)
    return verifier, _b64url(hashlib.sha256(verifier.encode()).digest())


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:  # the caller reads Location
        return None


class _Settings(TypedDict):
    """What the server re-reads on every request (settings.json)."""

    accounts: dict[str, str]  # address -> password
    access_token_ttl: int
    rotate_refresh_tokens: bool


class OAuthServer:
    """oidc-provider for one lab: `lab.oauth`.  URLs exist once the lab allocated its port."""

    def __init__(self, *, lab_id: str, workdir: Path, log_dir: Path, accounts: dict[str, str],
                 daemon_mailbox: str):
        self.lab_id = lab_id
        self.base = workdir / "oidc"
        self.data_dir = self.base / "data"
        self.config_path = self.base / "config.json"
        self.settings_path = self.base / "settings.json"
        self.log_path = log_dir / "oidc.log"
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log_offset = 0
        self._fresh = True                      # first start of this object: empty store
        self._cookie_keys = [secrets.token_urlsafe(24), secrets.token_urlsafe(24)]
        self._settings: _Settings = {"accounts": dict(accounts), "access_token_ttl": 3600,
                                     "rotate_refresh_tokens": True}
        user_grants = ("authorization_code", "refresh_token")
        self.clients: dict[str, OAuthClient] = {
            "exporter": OAuthClient("exporter", secrets.token_urlsafe(24), user_grants, REDIRECT_URIS),
            "exporter-public": OAuthClient("exporter-public", None, user_grants, REDIRECT_URIS),
            "daemon-app": OAuthClient("daemon-app", secrets.token_urlsafe(24), ("client_credentials",),
                                      mailbox=daemon_mailbox),
            RESOURCE_SERVER_CLIENT: OAuthClient(RESOURCE_SERVER_CLIENT, secrets.token_urlsafe(24), ()),
        }

    # ------------------------------------------------------------ URLs
    @property
    def issuer(self) -> str:
        if self.port is None:
            raise LabError("the OAuth server has no port before the lab's first start()")
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return self.issuer + "/token"

    @property
    def authorization_url(self) -> str:
        return self.issuer + "/auth"

    @property
    def introspection_url(self) -> str:
        return self.issuer + "/token/introspection"

    @property
    def revocation_url(self) -> str:
        return self.issuer + "/token/revocation"

    @property
    def discovery_url(self) -> str:
        return self.issuer + "/.well-known/openid-configuration"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __repr__(self) -> str:
        where = self.issuer if self.port else "no port yet"
        return f"<OAuthServer {where} {'running' if self.running else 'stopped'}>"

    # ------------------------------------------------------------ settings
    @property
    def access_token_ttl(self) -> int:
        return self._settings["access_token_ttl"]

    @property
    def rotate_refresh_tokens(self) -> bool:
        return self._settings["rotate_refresh_tokens"]

    def configure(self, *, access_token_ttl: int | None = None,
                  rotate_refresh_tokens: bool | None = None) -> dict:
        """Change settings for the next tokens (no restart: the server re-reads them on
        every request).  Returns the previous values, for configure(**old)."""
        old = {"access_token_ttl": self.access_token_ttl,
               "rotate_refresh_tokens": self.rotate_refresh_tokens}
        if access_token_ttl is not None:
            if int(access_token_ttl) < 1:
                raise LabError("access_token_ttl must be at least 1 second")
            self._settings["access_token_ttl"] = int(access_token_ttl)
        if rotate_refresh_tokens is not None:
            self._settings["rotate_refresh_tokens"] = bool(rotate_refresh_tokens)
        self._write_settings()
        return old

    @contextlib.contextmanager
    def configured(self, **settings: Any) -> Iterator[OAuthServer]:
        """with lab.oauth.configured(access_token_ttl=5): ...  (restored on exit)"""
        old = self.configure(**settings)
        try:
            yield self
        finally:
            self.configure(**old)

    def set_accounts(self, accounts: dict[str, str]) -> None:
        """The accounts the login page accepts: address -> password (the lab's users)."""
        self._settings["accounts"] = dict(accounts)
        self._write_settings()

    def _write_settings(self) -> None:
        if self.base.is_dir():
            write_file(self.settings_path, json.dumps(self._settings, indent=1) + "\n", 0o600)

    def dovecot_conf(self) -> str:
        """Dovecot's oauth2 passdb args file (RFC 7662 introspection with this server)."""
        rs = self.clients[RESOURCE_SERVER_CLIENT]
        # Dovecot's http client sends the URL's user:password as HTTP Basic auth
        url = f"http://{rs.client_id}:{rs.client_secret}@127.0.0.1:{self.port}/token/introspection"
        return "\n".join([
            f"# Generated by maillab (lab {self.lab_id}): tokens of {self.issuer}",
            "# are checked by RFC 7662 introspection on every login (no tokeninfo, no cache).",
            f"introspection_url = {url}",
            "introspection_mode = post",
            "force_introspection = yes",
            "# the token's extra claim naming the mailbox (user tokens: the account;",
            "# client_credentials tokens: the client's bound mailbox).  A token whose",
            "# mailbox differs from the SASL user name is refused.",
            "username_attribute = mailbox",
            "active_attribute = active",
            "active_value = true",
            f"scope = {SCOPE}",
            "# an unreachable server fails the login (NO [UNAVAILABLE]) instead of hanging",
            "timeout_msecs = 3000",
            "",
        ])

    # ------------------------------------------------------------ run
    def write_config(self, port: int) -> None:
        check_installed()
        self.port = port
        if self._fresh:
            # a new lab object in an old workdir does not inherit its grants; a restart
            # of the same object (outage tests) keeps them
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self._fresh = False
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o700)
        config = {"port": port, "issuer": self.issuer, "resource": RESOURCE, "scope": SCOPE,
                  "data_dir": str(self.data_dir), "settings_file": str(self.settings_path),
                  "cookie_keys": self._cookie_keys,
                  "resource_server_client": RESOURCE_SERVER_CLIENT,
                  "clients": [c.metadata() for c in self.clients.values()]}
        write_file(self.config_path, json.dumps(config, indent=1) + "\n", 0o600)
        self._write_settings()

    def launch(self) -> None:
        """Spawn node (returns at once; see ready())."""
        if self.running:
            return
        if self.port is None:
            raise LabError("OAuth server: write_config() first")
        node = check_installed()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "TZ": os.environ.get("TZ", "UTC"),
               "NODE_ENV": "production", ENV_MARKER: self.lab_id}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [node, str(SERVER_SCRIPT), str(self.config_path)], cwd=OIDC_DIR,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, close_fds=True,
                start_new_session=True)   # no Ctrl-C from our terminal, like the mail servers

    def ready(self) -> bool:
        """The discovery document is served."""
        try:
            with urllib.request.urlopen(self.discovery_url, timeout=1.0) as r:
                return r.status == 200
        except OSError:
            return False

    def died(self) -> str | None:
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return f"the OAuth server (node) exited with code {self.proc.returncode}\n" + self.log_excerpt()
        fatal = new_lines_matching(self.log_path, self._log_offset, (" fatal: ",))
        if fatal:
            return f"the OAuth server logged: {fatal}\n" + self.log_excerpt()
        return None

    def log_excerpt(self, lines: int = 30) -> str:
        return log_excerpt(self.log_path, self._log_offset, lines)

    def start(self, timeout: float = 15.0) -> OAuthServer:
        """Start again after stop() (same port, same clients; every grant and refresh token
        kept in the file store), and wait until it serves."""
        if self.port is None or not self.config_path.exists():
            raise LabError("the OAuth server starts with the lab (lab.start()); "
                           "lab.oauth.start() restarts it after lab.oauth.stop()")
        self.launch()
        if not wait_until(self.ready, time.monotonic() + timeout, 0.02, abort=self.died):
            raise LabError(f"the OAuth server did not answer within {timeout}s\n" + self.log_excerpt())
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop node (an identity-provider outage); start() brings it back."""
        if self.proc is None:
            return
        left = terminate_tree([self.proc.pid], popens=[self.proc], timeout=timeout)
        if left or is_alive(self.proc.pid):
            raise LabError(f"the OAuth server (pid {self.proc.pid}) did not exit")
        self.proc = None

    # ------------------------------------------------------------ HTTP
    def _open(self, opener: urllib.request.OpenerDirector, url: str, data: dict | None = None,
              headers: dict | None = None) -> tuple[int, dict, bytes]:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(url, data=body, headers=headers or {})
        try:
            with opener.open(req, timeout=_HTTP_TIMEOUT) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:      # 3xx (not followed) and 4xx/5xx
            with e:
                return e.code, dict(e.headers), e.read()
        except OSError as e:
            raise LabError(f"{url.split('?')[0]}: {e}") from None

    def _post_as(self, client: OAuthClient, url: str, form: dict) -> tuple[int, dict]:
        """POST with client authentication: client_secret_basic (RFC 6749 §2.3.1), or
        client_id in the body for a public client."""
        headers = {"Accept": "application/json"}
        form = dict(form)
        if client.public:
            form["client_id"] = client.client_id
        else:
            q = urllib.parse.quote
            cred = f"{q(client.client_id, safe='')}:{q(client.client_secret or '', safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
        status, _, body = self._open(urllib.request.build_opener(_NoRedirect), url, form, headers)
        try:
            doc = json.loads(body) if body else {}
        except ValueError:
            doc = {"error": "invalid_response", "error_description": body[:200].decode("utf-8", "replace")}
        if status >= 400 or "error" in doc:
            raise OAuthError(status, doc.get("error", "unknown"), doc.get("error_description", ""))
        return status, doc

    def _client(self, name: str) -> OAuthClient:
        try:
            return self.clients[name]
        except KeyError:
            raise LabError(f"no OAuth client {name!r}; choose from {sorted(self.clients)}") from None

    # ------------------------------------------------------------ flows
    def authorization_request(self, client: str = "exporter", *, scope: str = USER_SCOPE,
                              redirect_uri: str = DEFAULT_REDIRECT_URI, state: str | None = None,
                              code_challenge: str | None = None) -> str:
        """An authorization URL as an app would build it (response_type=code, PKCE S256)."""
        params = {"response_type": "code", "client_id": self._client(client).client_id,
                  "redirect_uri": redirect_uri, "scope": scope,
                  "state": state or secrets.token_urlsafe(16)}
        if code_challenge is not None:
            params.update(code_challenge=code_challenge, code_challenge_method="S256")
        return self.authorization_url + "?" + urllib.parse.urlencode(params)

    def authorize(self, authorization_url: str, user_local: str, *, approve: bool = True,
                  follow: bool = False, password: str | None = None) -> str:
        """Play the user in a browser: open `authorization_url` (as an app printed it), log
        in as `user_local` on the login page (with the lab password unless `password` is
        given), consent (or cancel, approve=False), and return the redirect to the app
        (…/callback?code=…&state=…&iss=…, or ?error=access_denied…) without following it,
        or, with follow=True, also GET it (the app's loopback listener receives the code;
        LabError if nothing listens there).  A wrong password: LabError (HTTP 401)."""
        address = self._address(user_local)
        if password is None:
            password = self._settings["accounts"][address]
        if not authorization_url.startswith(self.issuer + "/"):
            raise LabError(f"not an authorization URL of {self.issuer}: {authorization_url[:80]}")
        opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), _NoRedirect)
        url, form = authorization_url, None
        for _step in range(_MAX_FLOW_STEPS):
            status, headers, body = self._open(opener, url, form)
            form = None
            if status in (301, 302, 303, 307, 308):
                target = urllib.parse.urljoin(url, headers.get("Location", ""))
                if not target.startswith(self.issuer + "/"):
                    if follow:
                        self._follow(target)
                    return target
                url = target
                continue
            page = body.decode("utf-8", "replace")
            if status != 200:
                raise LabError(f"authorization: HTTP {status} at {url.split('?')[0]}: "
                               + _page_text(page))
            prompt = re.search(r'name="prompt" value="(\w+)"', page)
            action = re.search(r'<form[^>]*action="([^"]+)"', page)
            if not prompt or not action:
                raise LabError(f"authorization: unexpected page at {url.split('?')[0]}: "
                               + _page_text(page))
            if not approve:
                cancel = re.search(r'href="([^"]*/abort)"', page)
                if not cancel:
                    raise LabError("authorization: no cancel link on the page")
                url = urllib.parse.urljoin(url, cancel.group(1))
                continue
            url = urllib.parse.urljoin(url, action.group(1))
            if prompt.group(1) == "login":
                form = {"prompt": "login", "login": address, "password": password}
            else:
                form = {"prompt": "consent"}
        raise LabError(f"authorization as {address} did not finish in {_MAX_FLOW_STEPS} steps "
                       f"(is {address} one of the lab's accounts?)\n" + self.log_excerpt(10))

    @staticmethod
    def _follow(url: str) -> None:
        try:
            with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT) as r:
                r.read()
        except urllib.error.HTTPError as e:
            e.close()                       # the app answered: it got the redirect
        except OSError as e:
            raise LabError(f"following the redirect to {url.split('?')[0]}: {e}") from None

    def tokens_for(self, user_local: str, client: str = "exporter", scope: str = USER_SCOPE,
                   redirect_uri: str = DEFAULT_REDIRECT_URI) -> dict:
        """The token response (access_token, refresh_token, expires_in, scope, ...) of a
        full authorization-code + PKCE flow for the user, as `client`."""
        c = self._client(client)
        verifier, challenge = pkce_pair()
        state = secrets.token_urlsafe(16)
        url = self.authorization_request(client, scope=scope, redirect_uri=redirect_uri,
                                         state=state, code_challenge=challenge)
        final = self.authorize(url, user_local)
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(final).query))
        if "error" in query:
            raise OAuthError(400, query["error"], query.get("error_description", ""))
        if query.get("state") != state or "code" not in query:
            raise LabError(f"authorization redirect without code/state: {final.split('?')[0]}")
        _, doc = self._post_as(c, self.token_url, {
            "grant_type": "authorization_code", "code": query["code"],
            "redirect_uri": redirect_uri, "code_verifier": verifier})
        return doc

    def refresh_token_for(self, user_local: str, client: str = "exporter",
                          scope: str = USER_SCOPE) -> str:
        doc = self.tokens_for(user_local, client, scope)
        if "refresh_token" not in doc:
            raise LabError(f"no refresh token for scope {scope!r} (ask for offline_access)")
        return doc["refresh_token"]

    def access_token_for(self, user_local: str, client: str = "exporter",
                         scope: str = USER_SCOPE) -> str:
        """A fresh access token for the user (from the code exchange of a full flow)."""
        return self.tokens_for(user_local, client, scope)["access_token"]

    def refresh(self, refresh_token: str, client: str = "exporter", scope: str | None = None) -> dict:
        """refresh_token grant: the token response.  With rotation on (default), it holds a
        new refresh_token and the one sent is used up (sending it again: invalid_grant,
        and oidc-provider then revokes the whole grant)."""
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if scope is not None:
            form["scope"] = scope
        return self._post_as(self._client(client), self.token_url, form)[1]

    def client_credentials_token(self, client: str = "daemon-app", scope: str = SCOPE) -> str:
        """An app-only access token (no sub); its `mailbox` claim is the client's mailbox."""
        return self._post_as(self._client(client), self.token_url,
                             {"grant_type": "client_credentials", "scope": scope})[1]["access_token"]

    def introspect(self, token: str, client: str = RESOURCE_SERVER_CLIENT) -> dict:
        """RFC 7662 introspection.  As "dovecot" (default) it answers exactly what Dovecot
        gets: refresh tokens are inactive there.  As "exporter", refresh tokens show too."""
        return self._post_as(self._client(client), self.introspection_url, {"token": token})[1]

    def revoke(self, token: str, client: str | None = None, token_type_hint: str | None = None) -> None:
        """RFC 7009 revocation as the token's client (found by introspection if not given).
        oidc-provider 8: revoking a refresh token revokes its whole grant (every access and
        refresh token of that authorization); revoking an access token ends that token only."""
        if client is None:
            info = self.introspect(token, client="exporter")
            if not info.get("active"):
                return                        # unknown or already dead: nothing to revoke
            owner = [n for n, c in self.clients.items() if c.client_id == info.get("client_id")]
            if not owner:
                raise LabError(f"token of unknown client {info.get('client_id')!r}")
            client = owner[0]
        form = {"token": token}
        if token_type_hint:
            form["token_type_hint"] = token_type_hint
        self._post_as(self._client(client), self.revocation_url, form)

    def _address(self, user_local: str) -> str:
        for a in self._settings["accounts"]:
            if user_local in (a, a.split("@", 1)[0]):
                return a
        raise LabError(f"no lab account {user_local!r}")


def _page_text(page: str, limit: int = 300) -> str:
    """The visible text of an error page, shortened (for LabError messages)."""
    text = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", page, flags=re.S)
    text = re.sub(r"<[^>]+>", " ", text)
    return re.sub(r"\s+", " ", text).strip()[:limit]
