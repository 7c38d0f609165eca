"""The SMTP chain: smtp_connect, smtp_login, test_email."""

from __future__ import annotations

import functools
import smtplib
import socket
import ssl
import time
from collections.abc import Callable
from email.header import Header
from email.utils import formatdate
from typing import TYPE_CHECKING

from .. import errors
from ..config import Inbox
from ..model import Phase, Protocol
from ..oauth.tokens import TokenCache
from ..transcript import Tap
from .base import CLOSE_TIMEOUT, Probe
from .transport import ascii_host

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

PROBE_HEADER = "X-Inbox-Exporter-Probe"
# Preferred first; CRAM-MD5 and friends are obsolete and XOAUTH2 needs a token, not a password.
MECHANISMS = ("PLAIN", "LOGIN")


@functools.lru_cache(maxsize=1)
def ehlo_name() -> str:
    """Our EHLO name, looked up once: getfqdn() may do a slow reverse DNS lookup."""
    return socket.getfqdn()


class _SMTP(smtplib.SMTP):
    """smtplib on a socket we opened ourselves; built without a host so nothing connects early."""

    _host: str  # smtplib's: the name starttls() checks the certificate against

    def __init__(self, open_fn: Callable[[], socket.socket], timeout: float, tap: Tap | None = None):
        self._open_fn, self._tap = open_fn, tap
        super().__init__(local_hostname=ehlo_name(), timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return self._open_fn()

    # The transcript's view of the conversation (the tap redacts logins and the body itself).
    def send(self, s: ReadableBuffer | str) -> None:
        if self._tap is not None:
            self._tap.sent(s.encode("utf-8") if isinstance(s, str) else s)
        super().send(s)

    def getreply(self) -> tuple[int, bytes]:
        code, message = super().getreply()
        if self._tap is not None:
            lines = message.split(b"\n") if message else [b""]
            for i, line in enumerate(lines):
                sep = b"-" if i < len(lines) - 1 else b" "
                self._tap.received(f"{code}".encode() + sep + line)
        return code, message

    def auth(self, mechanism: str, authobject: Callable[..., str | None], *,
             initial_response_ok: bool = True) -> tuple[int, bytes]:
        # smtplib encodes every SASL response as ASCII: a non-ASCII user or password would be
        # a UnicodeEncodeError. PLAIN (RFC 4616) and XOAUTH2 carry UTF-8; LOGIN has no
        # standard, and servers (Dovecot, Exchange) read UTF-8 there too.
        def utf8(*challenge: bytes | None) -> str:
            return _Utf8(authobject(*challenge))

        return super().auth(mechanism, utf8, initial_response_ok=initial_response_ok)


class _Utf8(str):
    """A SASL response that smtplib's `.encode("ascii")` turns into UTF-8 bytes."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return str.encode(self, "utf-8", errors)


def ascii_address(address: str, role: str) -> str:
    """An address any SMTP server takes: an IDN domain in A-labels (RFC 5890). A non-ASCII
    local part has no ASCII form: it needs SMTPUTF8 (RFC 6531)."""
    local, _, domain = address.rpartition("@")
    if not local.isascii():
        raise errors.SmtpUtf8Unsupported(
            f"the {role} address {address} has a non-ASCII local part and the server does not "
            f"offer SMTPUTF8 (RFC 6531)")
    return f"{local}@{ascii_host(domain)}"


def probe_message(inbox: Inbox, probe_id: str, date: str | None = None,
                  sender: str | None = None, recipient: str | None = None) -> bytes:
    """The test email: findable later by its Message-ID or our header, both carrying the id.

    Written out directly: the email package's generator costs milliseconds of CPU per check,
    several times what the rest of the SMTP chain does. `sender` and `recipient` are the
    envelope's forms of the addresses; non-ASCII ones only go out with SMTPUTF8, where
    headers are UTF-8 (RFC 6532). The Message-ID stays ASCII (the delivery step searches it).
    """
    sender, recipient = sender or inbox.email, recipient or inbox.test_email_to
    domain = ascii_host(inbox.email.rpartition("@")[2])
    subject = inbox.test_email_subject
    if not subject.isascii():
        subject = Header(subject, "utf-8").encode()
    headers = (
        f"From: {sender}",
        f"To: {recipient}",
        f"Subject: {subject}",
        f"Date: {date or formatdate(localtime=False, usegmt=True)}",
        f"Message-ID: <inbox-exporter.{probe_id}@{domain}>",
        f"{PROBE_HEADER}: {probe_id}",
        "Auto-Submitted: auto-generated",  # RFC 3834: no vacation replies to a monitor
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Transfer-Encoding: 7bit",
    )
    body = (f"This is an automated test email sent by inbox-exporter to verify that the inbox "
            f"{inbox.name} can send mail. It can be deleted.", "", f"Probe id: {probe_id}")
    return ("\r\n".join(headers) + "\r\n\r\n" + "\r\n".join(body) + "\r\n").encode("utf-8")


class SmtpProbe(Probe):
    protocol = Protocol.SMTP

    def __init__(self, inbox: Inbox, probe_id: str, tokens: TokenCache | None = None):
        super().__init__(inbox, inbox.smtp, tokens)
        self.probe_id = probe_id
        self.smtp: _SMTP | None = None
        self.accepted_at: float | None = None  # when the server took the test email

    def connect(self, timeout: float) -> None:
        ep = self.endpoint
        smtp = self.smtp = _SMTP(self.opener(timeout), timeout, self.tap)
        smtp._host = ascii_host(ep.host)  # starttls() checks the certificate against this name
        with self.handshake():
            code, greeting = smtp.connect(ep.host, ep.port)
        if code == -1:  # smtplib's word for "no three-digit code"
            raise errors.UnexpectedReply(f"not an SMTP greeting: {greeting!r}")
        if code != 220:
            raise smtplib.SMTPConnectError(code, greeting)
        if ep.security == "ssl":
            assert isinstance(smtp.sock, ssl.SSLSocket)  # implicit TLS: the opener wrapped it
            self.secured(smtp.sock)
        self.conn.phase = Phase.COMMAND
        self._ehlo()
        if ep.security == "starttls":
            self.conn.phase = Phase.STARTTLS
            if not smtp.has_extn("starttls"):
                raise errors.StartTLSUnavailable("the server does not offer STARTTLS on this port")
            with self.handshake():
                smtp.starttls(context=self.tls)
            assert isinstance(smtp.sock, ssl.SSLSocket)  # starttls() wrapped it
            self.secured(smtp.sock)
            self.conn.phase = Phase.COMMAND
            self._ehlo()

    def _ehlo(self) -> None:
        assert self.smtp is not None
        code, reply = self.smtp.ehlo()
        if code != 250:
            raise smtplib.SMTPHeloError(code, reply)

    def login(self, timeout: float) -> None:
        smtp = self._ready(timeout)
        if not smtp.has_extn("auth"):
            if not self.encrypted:
                raise errors.PlaintextLoginRefused(
                    "the server offers no AUTH on this unencrypted connection")
            raise errors.AuthUnavailable("the server advertises no AUTH mechanism")
        offered = smtp.esmtp_features["auth"].upper().split()
        if self.inbox.oauth is not None:
            return self._oauth_login(smtp, set(offered), timeout)
        mechanism = next((m for m in MECHANISMS if m in offered), None)
        if mechanism is None:
            raise errors.AuthUnavailable(f"no usable AUTH mechanism among {' '.join(offered)}")
        # One AUTH with one mechanism: smtplib's login() would retry every mechanism and turn
        # one wrong password into several failed logins (and faster account lockouts).
        assert self.inbox.password is not None
        smtp.user, smtp.password = self.inbox.username, self.inbox.password.get_secret_value()
        try:
            smtp.auth(mechanism, getattr(smtp, f"auth_{mechanism.lower()}"))
        finally:
            smtp.password = ""

    def _oauth_login(self, smtp: _SMTP, offered: set[str], timeout: float) -> None:
        exchange, token, left = self.oauth_exchange(offered, timeout)
        assert smtp.sock is not None
        smtp.sock.settimeout(left)

        def respond(challenge: bytes | None = None) -> str:
            # smtplib sends the initial response with AUTH (RFC 4954), then one line per 334.
            data = exchange.first() if challenge is None else exchange.respond(challenge)
            return data.decode("utf-8")  # the user= part may be an internationalized address

        try:
            smtp.auth(exchange.mechanism, respond, initial_response_ok=True)
        except smtplib.SMTPAuthenticationError as e:
            error = e.smtp_error  # bytes: smtplib's reply as read
            text = error.decode("utf-8", "replace") if isinstance(error, bytes) else error
            reply = f"{e.smtp_code} {text}"
            raise self.oauth_refused(exchange, token, reply) from e

    def send_test_email(self, timeout: float) -> None:
        smtp = self._ready(timeout)
        sender, recipient = self.inbox.email, self.inbox.test_email_to
        assert recipient is not None
        options: list[str] = []
        if not (sender.isascii() and recipient.isascii()):
            if smtp.has_extn("smtputf8"):
                options.append("SMTPUTF8")  # MAIL FROM:<...> SMTPUTF8: UTF-8 envelope and headers
            else:
                sender = ascii_address(sender, "sender")
                recipient = ascii_address(recipient, "recipient")
        smtp.sendmail(sender, [recipient],
                      probe_message(self.inbox, self.probe_id, sender=sender, recipient=recipient),
                      mail_options=options)
        self.accepted_at = time.time()

    def close(self) -> None:
        """QUIT when possible; always close the socket."""
        if self.smtp is not None:
            try:
                if self.smtp.sock is not None:
                    self.smtp.sock.settimeout(CLOSE_TIMEOUT)
                    self.smtp.quit()
            except Exception:  # noqa: BLE001 - the server may be gone already
                pass
            self.smtp.close()
        if self.conn.sock is not None:
            self.conn.sock.close()

    def _ready(self, timeout: float) -> _SMTP:
        assert self.smtp is not None and self.smtp.sock is not None
        self.smtp.sock.settimeout(timeout)
        return self.smtp
