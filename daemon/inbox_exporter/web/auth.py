"""HTTP basic auth against the web config file's bcrypt hashes, and its request rate limit.

bcrypt is slow on purpose (~50-250 ms a check at the usual costs): Prometheus sending the same
credentials every 15 s must not pay it each time. A verdict is cached under a SHA-256 of
(user, hash, password), so a changed password or hash is a new key and nothing secret is kept in
the clear. Only one bcrypt runs at a time (as in exporter-toolkit): guessing costs at most one
core, and the guesses wait as coroutines, holding no thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import bcrypt

# An unknown user is checked against this (a hash of a random string) so that a wrong user
# name takes as long as a wrong password: no user enumeration by timing.
_DECOY = bcrypt.hashpw(b"decoy-password-never-valid", bcrypt.gensalt(rounds=10))
CACHE_SIZE = 1024


def parse_basic(header: str | None) -> tuple[str, bytes] | None:
    """`Basic base64(user:password)` -> (user, password); None if absent or malformed."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user.decode("utf-8", "replace"), password


class BasicAuth:
    def __init__(self) -> None:
        self._cache: OrderedDict[bytes, bool] = OrderedDict()
        self._lock = threading.Lock()
        self._bcrypt_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="http-bcrypt")
        self._one_at_a_time: asyncio.Lock | None = None  # made in the server's loop

    async def allowed(self, users: dict[str, bytes], header: str | None) -> bool:
        creds = parse_basic(header)
        if creds is None:
            return False
        user, password = creds
        stored = users.get(user)
        key = hashlib.sha256(b"\0".join((user.encode(), stored or b"", password))).digest()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        if hit is not None:
            return hit and stored is not None
        if self._one_at_a_time is None:
            self._one_at_a_time = asyncio.Lock()
        async with self._one_at_a_time:
            ok = await asyncio.get_running_loop().run_in_executor(
                self._bcrypt_pool, _verify, password, stored or _DECOY)
        ok = ok and stored is not None
        with self._lock:
            self._cache[key] = ok
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return ok

    def close(self) -> None:
        self._bcrypt_pool.shutdown(wait=False, cancel_futures=True)


def _verify(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)  # constant-time comparison inside
    except ValueError:
        return False  # a malformed hash: validated at load, so only after a bad edit


class RateLimit:
    """A token bucket (exporter-toolkit's `rate_limit`: one token per interval, `burst` of them)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._tokens: float | None = None  # a full bucket at the first request
        self._at = clock()
        self._lock = threading.Lock()

    def allow(self, interval: float, burst: int) -> bool:
        if interval <= 0:
            return True
        with self._lock:
            now, full = self._clock(), float(max(burst, 1))
            tokens = full if self._tokens is None else self._tokens
            self._tokens = min(full, tokens + (now - self._at) / interval)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False
