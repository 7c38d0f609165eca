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

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count against the deadline."""
        t0 = self._clock()
        try:
            yield
        finally:
            self.at += self._clock() - t0


class Watchdog:
    """Calls `on_expiry` (which must be quick) for guards still open at their end time; one
    daemon thread, started lazily.

    Cheap on the hot path: opening or closing a guard never wakes the thread (unless it was
    idle); while guards are open it polls every `resolution` seconds, so a step may overrun
    its budget by that much. Waking it for every guard cost more CPU than a check's parsing.
    """

    def __init__(self, resolution: float = 0.1) -> None:
        self.resolution = resolution
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._open: set[int] = set()
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    @contextmanager
    def guard(self, seconds: float, on_expiry: Callable[[], None]) -> Iterator[None]:
        at = time.monotonic() + seconds
        with self._cond:
            key = next(self._ids)
            idle = not self._heap
            heapq.heappush(self._heap, (at, key, on_expiry))
            self._open.add(key)
            if self._thread is None:
                self._stopped = False
                self._thread = threading.Thread(target=self._run, name="step-watchdog", daemon=True)
                self._thread.start()
            elif idle:
                self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._open.discard(key)

    def stop(self) -> None:
        """End the thread (at shutdown); a later guard starts a new one."""
        with self._cond:
            thread, self._thread, self._stopped = self._thread, None, True
            self._cond.notify()
        if thread is not None:
            thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, key, fn = heapq.heappop(self._heap)
                    if key in self._open:
                        self._open.discard(key)
                        # Under the lock: the guard cannot close (and its owner move on to
                        # the next step on the same connection) while this runs.
                        try:
                            fn()
                        except Exception:  # noqa: BLE001 - a dead socket may refuse shutdown
                            pass
                if not self._heap:
                    self._cond.wait()
                else:
                    self._cond.wait(min(max(self._heap[0][0] - now, 0.0), self.resolution))


WATCHDOG = Watchdog()
