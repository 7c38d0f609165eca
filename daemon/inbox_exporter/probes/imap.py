"""The IMAP chain: imap_connect, imap_login, imap_validate. Read-only: EXAMINE, never SELECT."""

from __future__ import annotations

import base64
import imaplib
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from .. import errors
from ..config import Inbox
from ..model import Phase, Protocol
from ..oauth import sasl
from ..oauth.tokens import TokenCache
from ..transcript import Tap
from .base import CLOSE_TIMEOUT, Probe
from .transport import ascii_host

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer


class _IMAP4(imaplib.IMAP4):
    """imaplib on a socket we opened ourselves (so DNS, TCP and TLS are timed and classified)."""

    def __init__(self, open_fn: Callable[[], socket.socket], host: str, port: int,
                 tap: Tap | None = None):
        self._open_fn, self._tap = open_fn, tap
        super().__init__(host, port)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        return self._open_fn()

    # The transcript's view of the conversation (the tap redacts logins itself).
    def send(self, data: ReadableBuffer) -> None:
        if self._tap is not None:
            self._tap.sent(data)
        super().send(data)

    def _get_line(self) -> bytes:
        line = super()._get_line()  # type: ignore[misc]  # imaplib's, not in typeshed
        if self._tap is not None:
            self._tap.received(line)
        return line

    def read(self, size: int) -> bytes:
        data = super().read(size)
        if self._tap is not None:
            self._tap.literal(len(data))  # a literal: message contents, never shown
        return data


class _Client(IMAPClient):
    def __init__(self, open_fn: Callable[[], socket.socket], host: str, port: int, use_ssl: bool,
                 timeout: float, tap: Tap | None = None):
        self._open_fn, self._tap = open_fn, tap
        super().__init__(host, port, ssl=use_ssl, timeout=timeout)
        # IMAPClient turns imaplib's debug output on (level 5) for a logger we silence anyway:
        # formatting every line costs CPU on each check.
        self._imap.debug = 0

    # IMAPClient's one seam where the connection is created
    def _create_IMAP4(self) -> _IMAP4:  # noqa: N802 - IMAPClient's name
        return _IMAP4(self._open_fn, self.host, self.port, self._tap)


class _Continuations:
    """imaplib's hook for AUTHENTICATE continuations; it must be a bound method (imaplib tells
    a literal from a callback by its type)."""

    def __init__(self, exchange: sasl.Exchange):
        self.exchange = exchange

    def process(self, data: bytes) -> bytes:
        return base64.b64encode(self.exchange.respond(base64.b64decode(data)))


class ImapProbe(Probe):
    protocol = Protocol.IMAP

    def __init__(self, inbox: Inbox, tokens: TokenCache | None = None):
        super().__init__(inbox, inbox.imap, tokens)
        self.client: _Client | None = None

    def connect(self, timeout: float) -> None:
        ep = self.endpoint
        with self.handshake():
            try:
                # The name STARTTLS checks the certificate against: an IDN in A-labels.
                self.client = _Client(self.opener(timeout), ascii_host(ep.host), ep.port,
                                      ep.security == "ssl", timeout, self.tap)
            except imaplib.IMAP4.error as e:
                if "unexpected response" in str(e):
                    raise errors.UnexpectedReply(f"not an IMAP greeting: {e}") from e
                raise
        if ep.security == "ssl":
            self.secured(self.client.socket())
        elif ep.security == "starttls":
            self.conn.phase = Phase.STARTTLS
            if not self.client.has_capability("STARTTLS"):
                raise errors.StartTLSUnavailable("the server does not offer STARTTLS on this port")
            with self.handshake():
                self.client.starttls(self.tls)
            self.secured(self.client.socket())
        self.conn.phase = Phase.COMMAND

    def login(self, timeout: float) -> None:
        client = self._ready(timeout)
        caps = client.capabilities()
        if self.inbox.oauth is not None:
            return self._oauth_login(client, caps, timeout)
        username = self.inbox.username
        assert self.inbox.password is not None
        password = self.inbox.password.get_secret_value()
        if b"LOGINDISABLED" in caps:
            # RFC 3501 6.2.3: the client MUST NOT send LOGIN then; don't leak the password.
            if not self.encrypted:
                raise errors.PlaintextLoginRefused(
                    "the server advertises LOGINDISABLED: no password over an unencrypted connection")
            if b"AUTH=PLAIN" not in caps:
                raise errors.AuthUnavailable("LOGINDISABLED and no AUTH=PLAIN offered")
            client.plain_login(username, password)
        elif not (username + password).isascii() and b"AUTH=PLAIN" in caps:
            # LOGIN's arguments are ASCII in imaplib; SASL PLAIN carries UTF-8 (RFC 4616).
            client.plain_login(username, password)
        else:
            client.login(username, password)

    def _oauth_login(self, client: _Client, caps: tuple[bytes, ...], timeout: float) -> None:
        offered = {c.decode()[5:] for c in caps if c.startswith(b"AUTH=")}
        exchange, token, left = self.oauth_exchange(offered, timeout)
        imap = client._imap
        client.socket().settimeout(left)
        args = [exchange.mechanism]
        if b"SASL-IR" in caps:  # RFC 4959: the token goes with the command, one round trip less
            args.append(base64.b64encode(exchange.first()).decode())
        imap.literal = _Continuations(exchange).process
        typ, data = imap._simple_command("AUTHENTICATE", *args)
        if typ != "OK":
            reply = " ".join(d.decode("utf-8", "replace") for d in data if isinstance(d, bytes))
            raise self.oauth_refused(exchange, token, f"{typ} {reply}".strip())
        imap.state = "AUTH"

    def validate(self, timeout: float) -> None:
        client = self._ready(timeout)
        caps = client.capabilities()
        if b"IMAP4REV1" not in caps and b"IMAP4REV2" not in caps:
            shown = " ".join(c.decode() for c in caps)
            raise errors.CapabilityMissing(f"IMAP4rev1 is not in CAPABILITY ({shown})")
        try:
            client.select_folder("INBOX", readonly=True)  # EXAMINE: changes no flag
        except IMAPClientError as e:
            raise errors.MailboxUnavailable(f"EXAMINE INBOX failed: {e}") from e
        try:
            # "%" (top level) proves listing works without walking a tree of thousands.
            folders = client.list_folders(pattern="%")
        except IMAPClientError as e:
            raise errors.MailboxUnavailable(f"LIST failed: {e}") from e
        if not folders:
            raise errors.MailboxUnavailable("LIST returned no folders")

    def close(self) -> None:
        """LOGOUT when possible; always close the socket."""
        if self.client is not None:
            try:
                self.client.socket().settimeout(CLOSE_TIMEOUT)
                self.client.logout()
            except Exception:  # noqa: BLE001 - the server may be gone already
                pass
            try:
                self.client.shutdown()
            except Exception:  # noqa: BLE001 - closing: the socket may be broken already
                pass
        if self.conn.sock is not None:
            self.conn.sock.close()

    def _ready(self, timeout: float) -> _Client:
        assert self.client is not None
        self.client.socket().settimeout(timeout)
        return self.client
