"""Connection caps, so that the monitor is never the cause of a "too many connections" failure.

Servers count simultaneous connections per account (Gmail: 15; Dovecot: 10 per user+IP by
default; the CRM itself already holds up to 5) or per client IP (Postfix
smtpd_client_connection_count_limit). So, across all checks of this process:
- per account: at most one connection at a time per protocol and server, for each login and
  each mailbox address, even when several configured inboxes share them (an inbox logging in
  as `alice` and another as `alice@example.com` are one account: both names are held);
- per server: at most `per_host` connections at a time, IMAP and SMTP together.
A server is its address, not its name: `imap.example.com` and `smtp.example.com` on one
machine, or `localhost` and `127.0.0.1`, share one cap (a name counts as itself until its
address is known: it is looked up in the background, never on a caller's time). An account is
a login on a server name. Everything is taken at once under one condition, so there is no lock
order to get wrong, and a new cap (reload) applies to the connections already counted.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable, Iterable

from .probes.transport import resolve

DEFAULT_PER_HOST = 10
ADDRESS_TTL = 300.0  # seconds a server's resolved address is reused for its cap
MAX_LOOKUPS = 8  # background lookups of server addresses at once


class Slot:
    def __init__(self, accounts: frozenset, server: str):
        self.accounts, self.server = accounts, server


class ConnectionLimits:
    def __init__(self, per_host: int = DEFAULT_PER_HOST,
                 clock: Callable[[], float] = time.monotonic):
        self._cond = threading.Condition()
        self._busy: set[tuple[str, str, str]] = set()
        self._open: dict[str, int] = {}
        self._per_host = per_host
        self._addresses: dict[str, tuple[str, float]] = {}
        self._resolving: set[str] = set()
        self._clock = clock

    @property
    def per_host(self) -> int:
        return self._per_host

    @per_host.setter
    def per_host(self, value: int) -> None:
        with self._cond:
            self._per_host = value
            self._cond.notify_all()

    @staticmethod
    def accounts(protocol: str, host: str, identities: Iterable[str]) -> frozenset:
        """An account is a login on a server (by its name): the same login on two servers is
        two accounts; one mailbox under two logins is one."""
        host = host.lower().rstrip(".")
        return frozenset((protocol, host, i.lower()) for i in identities)

    def try_acquire(self, protocol: str, host: str, identities: Iterable[str]) -> Slot | None:
        """A slot now, or None (never waits)."""
        return self.try_take(self.accounts(protocol, host, identities), self.server_key(host))

    def try_take(self, accounts: frozenset, server: str) -> Slot | None:
        """try_acquire with the keys made once (the runner retries a queued job often)."""
        with self._cond:
            return self._take(accounts, server)

    def acquire(self, protocol: str, host: str, identities: Iterable[str],
                timeout: float) -> Slot | None:
        """Wait up to `timeout` for a slot: for callers that own their thread (the `check`
        command, tests). The daemon queues jobs in the runner instead of waiting here."""
        server = self.server_key(host)
        accounts = self.accounts(protocol, host, identities)
        with self._cond:
            ready = self._cond.wait_for(lambda: self._free(accounts, server),
                                        timeout=max(0.0, timeout))
            return self._take(accounts, server) if ready else None

    def has_room(self, server: str) -> bool:
        with self._cond:
            return self._open.get(server, 0) < self._per_host

    def _free(self, accounts: frozenset, server: str) -> bool:
        return not (accounts & self._busy) and self._open.get(server, 0) < self._per_host

    def _take(self, accounts: frozenset, server: str) -> Slot | None:
        if not self._free(accounts, server):
            return None
        self._busy |= accounts
        self._open[server] = self._open.get(server, 0) + 1
        return Slot(accounts, server)

    def release(self, slot: Slot) -> None:
        with self._cond:
            self._busy -= slot.accounts
            left = self._open[slot.server] - 1
            if left:
                self._open[slot.server] = left
            else:
                del self._open[slot.server]
            self._cond.notify_all()

    def server_key(self, host: str) -> str:
        """The server's address when known (cached), else its name; never waits for DNS: an
        unknown name is looked up in the background for the next time."""
        host = host.lower().rstrip(".")
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            pass
        now = self._clock()
        with self._cond:
            cached = self._addresses.get(host)
            if cached and cached[1] > now:
                return cached[0]
            # bounded: a resolver that hangs costs at most MAX_LOOKUPS waiting threads
            start = host not in self._resolving and len(self._resolving) < MAX_LOOKUPS
            if start:
                self._resolving.add(host)
        if start:
            threading.Thread(target=self._lookup, args=(host,), name="cap-dns", daemon=True).start()
        return cached[0] if cached else host

    def _lookup(self, host: str) -> None:
        try:
            address = resolve(host, 0, 5.0)[0][4][0]
        except OSError:
            address = None  # the step reports the DNS failure; the name stays the key
        with self._cond:
            self._resolving.discard(host)
            if address:
                self._addresses[host] = (address, self._clock() + ADDRESS_TTL)
