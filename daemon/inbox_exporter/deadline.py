"""Time limits: the check's overall deadline, and a watchdog that enforces a step's end.

A socket timeout bounds each read, not a step: a server that trickles one byte every few
seconds would keep a step alive forever. The watchdog shuts the step's socket down when its
time is up, which makes the blocked read fail at once. One thread serves every check.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Deadline:
    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.at = clock() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - self._clock())

    def expired(self) -> bool:
        return self._clock() >= self.at


class Watchdog:
    """Calls `on_expiry` for guards still open at their end time; one daemon thread, lazily."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cancelled: set[int] = set()
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    @contextmanager
    def guard(self, seconds: float, on_expiry: Callable[[], None]) -> Iterator[None]:
        with self._cond:
            key = next(self._ids)
            heapq.heappush(self._heap, (time.monotonic() + seconds, key, on_expiry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="step-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._cancelled.add(key)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                at, key, fn = self._heap[0]
                delay = at - time.monotonic()
                if key in self._cancelled:
                    heapq.heappop(self._heap)
                    self._cancelled.discard(key)
                    continue
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
            try:
                fn()
            except Exception:  # noqa: BLE001 - shutting down a dead socket may fail; nothing to do
                pass


WATCHDOG = Watchdog()
