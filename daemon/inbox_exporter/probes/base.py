"""What the IMAP and SMTP probes share: the connection, the TLS context and the certificate."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..config import Inbox
from ..model import CertificateInfo, Protocol
from ..providers import Endpoint
from .transport import Connection, certificate_info, context_for, open_socket, untrusted_certificate


CLOSE_TIMEOUT = 2.0  # for LOGOUT / QUIT after the steps


class Probe:
    protocol: Protocol

    def __init__(self, inbox: Inbox, endpoint: Endpoint):
        self.inbox, self.endpoint = inbox, endpoint
        self.conn = Connection()
        self.certificate: CertificateInfo | None = None
        self.encrypted = False
        self.tls = context_for(inbox.ca_file, inbox.allow_insecure_certificate)

    def opener(self, timeout: float) -> Callable[[], socket.socket]:
        """The function the protocol library calls to get its socket (implicit TLS included)."""
        ep = self.endpoint
        tls = self.tls if ep.security == "ssl" else None
        return lambda: open_socket(self.conn, ep.host, ep.port, timeout, self.inbox.source_address, tls)

    @contextmanager
    def handshake(self) -> Iterator[None]:
        """Around anything that may do a TLS handshake: an unverifiable certificate is recorded."""
        try:
            yield
        except ssl.SSLCertVerificationError:
            self.certificate = untrusted_certificate(self.protocol)
            raise

    def secured(self, sock: ssl.SSLSocket) -> None:
        """After a successful handshake: from now on this is the socket, and its certificate."""
        self.conn.sock = sock
        self.encrypted = True
        self.certificate = certificate_info(sock, self.protocol)
