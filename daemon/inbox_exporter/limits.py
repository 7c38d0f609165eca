"""Connection caps, so that the monitor is never the cause of a "too many connections" failure.

Servers count simultaneous connections per account (Gmail: 15; Dovecot: 10 per user+IP by
default; the CRM itself already holds up to 5) or per client IP (Postfix
smtpd_client_connection_count_limit). So, across all checks of this process:
- per account (protocol, host, login): at most one connection at a time, even when several
  configured inboxes share the account;
- per host: at most `per_host` connections at a time.
Locks are always taken account first, then host, and held one of each per thread: no deadlock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_PER_HOST = 10


class ConnectionLimits:
    def __init__(self, per_host: int = DEFAULT_PER_HOST):
        self._lock = threading.Lock()
        self._accounts: dict[tuple[str, str, str], threading.Lock] = {}
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._per_host = per_host

    @property
    def per_host(self) -> int:
        return self._per_host

    @per_host.setter
    def per_host(self, value: int) -> None:
        """A new cap (reload): new semaphores; holders of the old ones release those."""
        with self._lock:
            if value != self._per_host:
                self._per_host = value
                self._hosts = {}

    @contextmanager
    def slot(self, protocol: str, host: str, username: str, timeout: float) -> Iterator[bool]:
        """Yields True holding both caps, or False if they could not be had within `timeout`."""
        host = host.lower().rstrip(".")
        with self._lock:
            account = self._accounts.setdefault((protocol, host, username.lower()), threading.Lock())
            per_host = self._hosts.setdefault(host, threading.BoundedSemaphore(self._per_host))
        deadline = time.monotonic() + max(0.0, timeout)
        if not account.acquire(timeout=max(0.0, timeout)):
            yield False
            return
        try:
            if not per_host.acquire(timeout=max(0.0, deadline - time.monotonic())):
                yield False
                return
            try:
                yield True
            finally:
                per_host.release()
        finally:
            account.release()

