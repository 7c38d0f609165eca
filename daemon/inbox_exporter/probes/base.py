"""What the IMAP and SMTP probes share: the connection, the TLS context and the certificate."""

from __future__ import annotations

import functools
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from .. import errors
from ..config import Inbox
from ..deadline import WATCHDOG, Watchdog
from ..model import CertificateInfo, Protocol
from ..oauth import sasl
from ..oauth.tokens import AccessToken, TokenCache
from ..providers import Endpoint
from ..transcript import Tap, Transcript
from .transport import (
    Connection,
    certificate_info,
    context_for,
    handshake_failure,
    open_socket,
    tls_facts,
    untrusted_certificate,
)

CLOSE_TIMEOUT = 2.0  # for LOGOUT / QUIT after the steps

T = TypeVar("T")


class Probe:
    protocol: Protocol

    def __init__(self, inbox: Inbox, endpoint: Endpoint, tokens: TokenCache | None = None):
        self.inbox, self.endpoint, self.tokens = inbox, endpoint, tokens
        self.conn = Connection()
        self.certificate: CertificateInfo | None = None
        self.encrypted = False
        self.tls = context_for(inbox.ca_file, inbox.allow_insecure_certificate)
        self.transcript: Transcript | None = None  # set by the check that records one

    @property
    def tap(self) -> Tap | None:
        """Where the protocol library's lines go (None: nothing recorded)."""
        return None if self.transcript is None else Tap(self.transcript, self.protocol.value)

    def fact(self, text: str) -> None:
        """A fact line of this connection's transcript (nothing when none is recorded)."""
        if self.transcript is not None:
            self.transcript.fact(self.protocol.value, text)

    def opener(self, timeout: float) -> Callable[[], socket.socket]:
        """The function the protocol library calls to get its socket (implicit TLS included)."""
        ep = self.endpoint
        tls = self.tls if ep.security == "ssl" else None
        return functools.partial(open_socket, self.conn, ep.host, ep.port, timeout,
                                 self.inbox.source_address, tls, self.fact)

    @contextmanager
    def handshake(self) -> Iterator[None]:
        """Around anything that may do a TLS handshake: a failed one is told in the transcript
        (with the certificate the server presented) and an unverifiable certificate recorded."""
        try:
            yield
        except Exception as e:
            for fact in handshake_failure(e) or ():
                self.fact(fact)
            if isinstance(e, ssl.SSLCertVerificationError):
                self.certificate = untrusted_certificate(self.protocol)
            raise

    def secured(self, sock: ssl.SSLSocket) -> None:
        """After a successful handshake: from now on this is the socket, and its certificate."""
        self.conn.sock = sock
        self.encrypted = True
        self.certificate = certificate_info(sock, self.protocol)
        if self.transcript is not None:
            for fact in tls_facts(sock):
                self.fact(fact)

    def close(self) -> None:
        """LOGOUT / QUIT when possible; always close the socket. Each protocol's own."""
        raise NotImplementedError

    # --- OAuth 2.0 logins (auth.method: oauth2) ------------------------------------------------

    def oauth_exchange(self, offered: set[str], timeout: float) -> tuple[sasl.Exchange, AccessToken, float]:
        """The SASL exchange for this inbox's token, and the time left of `timeout` after the
        token request (which counts against the login step)."""
        oauth = self.inbox.oauth
        assert oauth is not None
        mechanism = sasl.MECHANISMS[oauth.mechanism]
        if mechanism not in offered:
            shown = " ".join(sorted(offered)) or "none"
            raise errors.AuthUnavailable(f"the server does not offer {mechanism} (offered: {shown})")
        if self.tokens is None:
            raise RuntimeError("an OAuth inbox needs a TokenCache")
        t0 = time.monotonic()
        token = self.tokens.access_token(oauth, timeout)
        if self.transcript is not None:
            self.transcript.secret(token.value)
        left = timeout - (time.monotonic() - t0)
        if left <= 0:
            raise errors.OAuthEndpointUnavailable(
                f"the token request used the login step's whole budget ({timeout:g}s)")
        exchange = sasl.Exchange(mechanism, self.inbox.username, token.value,
                                 self.endpoint.host, self.endpoint.port)
        return exchange, token, left

    def oauth_refused(self, exchange: sasl.Exchange, token: AccessToken,
                      reply: str) -> errors.OAuthLoginRefused:
        """The server said no to the token: forget it (the next check asks for a new one)."""
        assert self.inbox.oauth is not None and self.tokens is not None
        self.tokens.invalidate(self.inbox.oauth, token.value)
        issued = "a freshly issued" if token.fresh else "a cached"
        why = f" ({exchange.error})" if exchange.error else ""
        return errors.OAuthLoginRefused(f"{reply}{why} [{issued} {exchange.mechanism} token]")


def converse(probe: Probe, body: Callable[[], T], watchdog: Watchdog = WATCHDOG) -> T:
    """Talk to a server on `probe`'s connection (the caller holds the connection slot) and
    always close it afterwards; LOGOUT / QUIT is bounded by the watchdog, since a server may
    trickle its reply. The one way the checks, the delivery polls and the sweep end a
    connection."""
    try:
        return body()
    finally:
        with watchdog.guard(CLOSE_TIMEOUT, probe.conn.abort):
            probe.close()
