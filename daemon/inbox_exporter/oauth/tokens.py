"""Access tokens: fetched from the token endpoint (authlib), cached per account, refreshed ahead
of expiry, and rotated refresh tokens written back.

One identity-provider round trip per token lifetime, not per check: a check takes the cached
token while it has more than a quarter of its life (at most REFRESH_MARGIN) left. Concurrent
checks of one account share one request. Token requests are bounded by the caller's budget
(the login step's timeout, within the check's deadline), and every failure becomes one of the
`errors.OAuth*` exceptions the classifier knows. Nothing here revokes a token.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx2 as httpx  # authlib's preferred client (its httpx fallback is deprecated)
from authlib.integrations.base_client import OAuthError
from authlib.integrations.httpx_client import OAuth2Client

from .. import errors
from ..config import OAuth2
from ..probes.transport import context_for

log = logging.getLogger(__name__)

# A hanging identity provider must not tie up the check workers: after a token request failed
# with the endpoint unavailable, requests to that endpoint fail at once for this long (one
# caller then probes it), and a check waits for another check's request of the same account at
# most LOCK_WAIT seconds.
ENDPOINT_BACKOFF = 30.0
LOCK_WAIT = 3.0
REFRESH_MARGIN = 300.0  # refresh at most this long before expiry...
REFRESH_FRACTION = 0.25  # ...or when a quarter of the lifetime is left, if that is sooner
DEFAULT_LIFETIME = 3600.0  # when the server does not say (expires_in is RECOMMENDED only)

# How a token request ended: a closed set (a metric label).
OUTCOMES = ("ok", "invalid_grant", "invalid_client", "unavailable")
_OUTCOME = {errors.OAuthInvalidGrant: "invalid_grant", errors.OAuthInvalidClient: "invalid_client",
            errors.OAuthEndpointUnavailable: "unavailable"}

# Token endpoint error codes (RFC 6749 5.2) -> our exception. The client registration's
# problems (wrong secret, grant or scope not allowed) are all the client's.
_ERRORS: dict[str, type[errors.OAuthTokenError]] = {
    "invalid_grant": errors.OAuthInvalidGrant,
    "invalid_client": errors.OAuthInvalidClient,
    "unauthorized_client": errors.OAuthInvalidClient,
    "unsupported_grant_type": errors.OAuthInvalidClient,
    "invalid_scope": errors.OAuthInvalidClient,
}


@dataclass(frozen=True)
class AccessToken:
    value: str
    fresh: bool  # fetched for this caller (not from the cache)


@dataclass
class _Endpoint:
    """A token endpoint's recent failure: while `open_until` is ahead, nobody asks it."""

    open_until: float = 0.0
    probing: bool = False
    error: str = ""


@dataclass
class _Account:
    lock: threading.Lock = field(default_factory=threading.Lock)
    access_token: str | None = None
    renew_at: float = 0.0  # monotonic
    configured_refresh: str | None = None  # the refresh token the config gave when last seen
    refresh_token: str | None = None  # the one to use (rotated ones replace it)
    warned_unwritable: bool = False


class TokenCache:
    """Access tokens per account (token endpoint, client, grant, scope, refresh token source).

    `transport` is the test seam (an httpx transport); `clock` drives expiry in tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 transport: httpx.BaseTransport | None = None,
                 on_request: Callable[[str], None] = lambda outcome: None):
        self._clock = clock
        self._transport = transport
        self._on_request = on_request  # one call per round trip, with its OUTCOMES value
        self._accounts: dict[tuple[str, ...], _Account] = {}
        self._endpoints: dict[str, _Endpoint] = {}
        self._guard = threading.Lock()
        self.requests = 0  # token endpoint round trips, for the benchmark and tests

    def _account(self, oauth: OAuth2) -> _Account:
        with self._guard:
            account = self._accounts.get(oauth.account_key)
            if account is None:
                account = self._accounts[oauth.account_key] = _Account()
            return account

    def access_token(self, oauth: OAuth2, timeout: float) -> AccessToken:
        """A valid access token, from the cache or fetched within `timeout` seconds."""
        account = self._account(oauth)
        t0 = self._clock()
        wait = max(0.0, min(timeout, LOCK_WAIT))
        if not account.lock.acquire(timeout=wait):
            raise errors.OAuthEndpointUnavailable(
                f"another check's token request for this account took longer than {wait:g}s")
        try:
            if account.access_token and self._clock() < account.renew_at:
                return AccessToken(account.access_token, fresh=False)
            left = timeout - (self._clock() - t0)
            if left <= 0:
                raise errors.OAuthEndpointUnavailable("no time left for the token request")
            self._admit(oauth.token_url)
            token = self._fetch(oauth, account, left)
            lifetime = _lifetime(token)
            account.access_token = token["access_token"]
            account.renew_at = t0 + lifetime - min(REFRESH_MARGIN, lifetime * REFRESH_FRACTION)
            self._rotated(oauth, account, token.get("refresh_token"))
            return AccessToken(account.access_token, fresh=True)
        finally:
            account.lock.release()

    def invalidate(self, oauth: OAuth2, value: str) -> None:
        """The mail server refused this token: the next check asks for a new one."""
        account = self._account(oauth)
        with account.lock:
            if account.access_token == value:
                account.access_token, account.renew_at = None, 0.0

    def secrets(self) -> list[str]:
        """Every token we hold, for redaction (Sentry, logs)."""
        with self._guard:
            accounts = list(self._accounts.values())
        return [t for a in accounts for t in (a.access_token, a.refresh_token) if t]

    def forget(self, keep: set[tuple[str, ...]]) -> None:
        """After a reload: drop the accounts no inbox uses any more."""
        with self._guard:
            for key in set(self._accounts) - keep:
                del self._accounts[key]

    # --- the token endpoint ------------------------------------------------------------------

    def _refresh_token(self, oauth: OAuth2, account: _Account) -> str:
        configured = oauth.refresh_token.get_secret_value() if oauth.refresh_token else None
        if configured != account.configured_refresh:
            # First use, or the operator put a new token in place (re-login, reload).
            account.configured_refresh = account.refresh_token = configured
        if not account.refresh_token:
            raise errors.OAuthInvalidGrant(
                "no refresh token: run `inbox-exporter oauth login` for this inbox")
        return account.refresh_token

    def _admit(self, url: str) -> None:
        """Fail at once while the endpoint is known to be down; let one caller probe it."""
        with self._guard:
            ep = self._endpoints.setdefault(url, _Endpoint())
            if not ep.open_until:
                return
            if self._clock() < ep.open_until or ep.probing:
                raise errors.OAuthEndpointUnavailable(
                    f"{ep.error} (not asked again until {ENDPOINT_BACKOFF:g}s after the failure)")
            ep.probing = True

    def _settle(self, url: str, error: errors.OAuthTokenError | None) -> None:
        with self._guard:
            ep = self._endpoints.setdefault(url, _Endpoint())
            ep.probing = False
            if isinstance(error, errors.OAuthEndpointUnavailable):
                ep.open_until, ep.error = self._clock() + ENDPOINT_BACKOFF, str(error)
            else:  # it answered (a token, or a verdict on the grant or client): it is up
                ep.open_until, ep.error = 0.0, ""

    def _fetch(self, oauth: OAuth2, account: _Account, timeout: float) -> dict:
        self.requests += 1
        try:
            token = self._request(oauth, account, timeout)
        except errors.OAuthTokenError as e:
            self._settle(oauth.token_url, e)
            self._on_request(_OUTCOME.get(type(e), "unavailable"))
            raise
        except BaseException:  # our bug: never leave the endpoint "probing" for ever
            self._settle(oauth.token_url, None)
            raise
        self._settle(oauth.token_url, None)
        self._on_request("ok")
        return token

    def _request(self, oauth: OAuth2, account: _Account, timeout: float) -> dict:
        secret = oauth.client_secret.get_secret_value() if oauth.client_secret else None
        refresh = self._refresh_token(oauth, account) if oauth.grant == "refresh_token" else None
        try:
            client = OAuth2Client(
                client_id=oauth.client_id, client_secret=secret, scope=oauth.scope,
                token_endpoint_auth_method="client_secret_basic" if secret else "none",
                timeout=httpx.Timeout(timeout), verify=context_for(oauth.ca_file, False),
                transport=self._transport)
        except (OSError, ssl.SSLError) as e:
            raise errors.OAuthEndpointUnavailable(f"cannot use ca_file: {e}") from e
        try:
            with client:
                if refresh is not None:
                    token = client.refresh_token(oauth.token_url, refresh_token=refresh)
                else:
                    token = client.fetch_token(oauth.token_url, grant_type="client_credentials")
        except OAuthError as e:
            kind = _ERRORS.get(e.error, errors.OAuthEndpointUnavailable)
            text = f"token endpoint: {e.error}" + (f": {e.description}" if e.description else "")
            raise kind(text) from e
        except httpx.HTTPStatusError as e:
            raise errors.OAuthEndpointUnavailable(
                f"token endpoint answered HTTP {e.response.status_code}") from e
        except httpx.TimeoutException as e:
            raise errors.OAuthEndpointUnavailable(
                f"token endpoint did not answer within {timeout:g}s") from e
        except httpx.HTTPError as e:
            raise errors.OAuthEndpointUnavailable(f"token endpoint unreachable: {e}") from e
        except ValueError as e:  # not JSON: a proxy's or gateway's page
            raise errors.OAuthEndpointUnavailable(f"token endpoint: {e}") from e
        if not isinstance(token.get("access_token"), str) or not token["access_token"]:
            raise errors.OAuthEndpointUnavailable("token endpoint answered without an access_token")
        return dict(token)

    def _rotated(self, oauth: OAuth2, account: _Account, new: object) -> None:
        """The server issued a new refresh token (Microsoft does, oidc-provider may): use it
        from now on, and write it back where the old one came from when we can."""
        if not isinstance(new, str) or not new or new == account.refresh_token:
            return
        account.refresh_token = new
        path = oauth.refresh_token_file
        if path is None:
            return
        try:
            write_secret_file(path, new)
        except OSError as e:
            if not account.warned_unwritable:
                account.warned_unwritable = True
                log.warning("rotated refresh token kept in memory only: the file is not writable",
                            extra={"file": path, "error": e.strerror or type(e).__name__})
            return
        # The Inbox in hand still holds the old token (`configured_refresh`): it stays the
        # reference, so only an operator's different token (after a reload) replaces ours.


def _lifetime(token: dict) -> float:
    try:
        value = float(token.get("expires_in", DEFAULT_LIFETIME))
    except (TypeError, ValueError):
        value = DEFAULT_LIFETIME
    return max(value, 1.0)


def write_secret_file(path: str, value: str) -> None:
    """Atomically replace `path` with `value`, readable by its owner only (0600)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".refresh-token.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(value + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
