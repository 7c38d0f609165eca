"""Connection caps, so that the monitor is never the cause of a "too many connections" failure.

Servers count simultaneous connections per account (Gmail: 15; Dovecot: 10 per user+IP by
default; the CRM itself already holds up to 5) or per client IP (Postfix
smtpd_client_connection_count_limit). So, across all checks of this process:
- per account: at most one connection at a time per protocol and server, for each login and
  each mailbox address, even when several configured inboxes share them (an inbox logging in
  as `alice` and another as `alice@example.com` are one account: both names are held);
- per server: at most `per_host` connections at a time, IMAP and SMTP together.
A server is its address, not its name: `imap.example.com` and `smtp.example.com` on one
machine, or `localhost` and `127.0.0.1`, share one cap. Everything is taken at once under one
condition, so there is no lock order to get wrong, and a new cap (reload) applies to the
connections already counted.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable, Iterable

from .probes.transport import resolve

DEFAULT_PER_HOST = 10
ADDRESS_TTL = 300.0  # seconds a server's resolved address is reused for its cap


class Slot:
    def __init__(self, accounts: frozenset, host: str):
        self.accounts, self.host = accounts, host


class ConnectionLimits:
    def __init__(self, per_host: int = DEFAULT_PER_HOST,
                 clock: Callable[[], float] = time.monotonic):
        self._cond = threading.Condition()
        self._busy: set[tuple[str, str, str]] = set()
        self._open: dict[str, int] = {}
        self._per_host = per_host
        self._addresses: dict[str, tuple[str, float]] = {}
        self._clock = clock

    @property
    def per_host(self) -> int:
        return self._per_host

    @per_host.setter
    def per_host(self, value: int) -> None:
        with self._cond:
            self._per_host = value
            self._cond.notify_all()

    def acquire(self, protocol: str, host: str, identities: Iterable[str],
                timeout: float) -> Slot | None:
        """Wait up to `timeout` for a connection to `host` as `identities` (login, address)."""
        server = self._server(host, timeout)
        accounts = frozenset((protocol, server, i.lower()) for i in identities)
        with self._cond:
            ready = self._cond.wait_for(
                lambda: not (accounts & self._busy) and self._open.get(server, 0) < self._per_host,
                timeout=max(0.0, timeout))
            if not ready:
                return None
            self._busy |= accounts
            self._open[server] = self._open.get(server, 0) + 1
        return Slot(accounts, server)

    def release(self, slot: Slot) -> None:
        with self._cond:
            self._busy -= slot.accounts
            left = self._open[slot.host] - 1
            if left:
                self._open[slot.host] = left
            else:
                del self._open[slot.host]
            self._cond.notify_all()

    def _server(self, host: str, timeout: float) -> str:
        """The server's address (cached), or its name when it does not resolve."""
        host = host.lower().rstrip(".")
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            pass
        now = self._clock()
        cached = self._addresses.get(host)
        if cached and cached[1] > now:
            return cached[0]
        try:
            address = resolve(host, 0, max(0.1, min(timeout, 5.0)))[0][4][0]
        except OSError:
            return host  # the step will report the DNS failure
        self._addresses[host] = (address, now + ADDRESS_TTL)
        return address
