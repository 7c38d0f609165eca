"""On-demand checks (`POST /probe?inbox=NAME`): when one may start, and why not.

A check logs into a real mailbox: triggered in a loop it is a lockout. So an on-demand check
runs at most once per inbox per `web.probe_min_interval`, never while the inbox backs off after a
credential failure or a rate limit (that backoff is what keeps the account from being locked),
never beside a check of the same inbox already queued or running, and through the same runner,
caps and test-email budget as the scheduled ones (the scheduler's `submit_on_demand`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from .model import CheckResult
from .scheduler import Scheduler
from .store import Store

DEFAULT_MIN_INTERVAL = 60.0


@dataclass(frozen=True)
class Refusal:
    status: int  # HTTP status: 404, 409 or 429
    message: str  # one line; never echoes the request
    retry_after: float | None = None  # seconds


@dataclass(frozen=True)
class Started:
    timeout: float  # the longest the check can take: its deadline and its wait for a slot


class OnDemand:
    def __init__(self, scheduler: Scheduler, store: Store,
                 min_interval: float = DEFAULT_MIN_INTERVAL,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.scheduler, self.store = scheduler, store
        self.min_interval = min_interval
        self._clock, self._wall = clock, wall
        self._last: dict[str, float] = {}  # inbox -> when its last on-demand check started
        self._lock = threading.Lock()

    def start(self, name: str, on_done: Callable[[CheckResult], None]) -> Refusal | Started:
        inbox = self.scheduler.inboxes().get(name)
        if inbox is None:
            return Refusal(404, "no such inbox on this exporter")
        state = self.store.get(name)
        if state is not None and state.effective_interval is not None:
            return self._backing_off(name, state.last)
        with self._lock:
            now = self._clock()
            last = self._last.get(name)
            if last is not None and now - last < self.min_interval:
                wait = self.min_interval - (now - last)
                return Refusal(429, f"checked on demand {now - last:.0f}s ago: at most one "
                               f"on-demand check per {self.min_interval:g}s "
                               "(web.probe_min_interval)", wait)
            if not self.scheduler.submit_on_demand(inbox, on_done):
                return Refusal(409, "a check of this inbox is queued or running; its result "
                               "will be in /metrics and on the status page", 5.0)
            self._last[name] = now
            for gone in self._last.keys() - self.scheduler.inboxes().keys():
                del self._last[gone]  # removed by a reload: the table stays bounded
        return Started(timeout=inbox.deadline + inbox.interval + 5)

    def _backing_off(self, name: str, last: CheckResult | None) -> Refusal:
        reasons = sorted({s.diagnosis.reason.value for s in (last.failures if last else ())
                          if s.diagnosis is not None})
        next_run = self.scheduler.next_run(name)
        until, wait = "", None
        if next_run is not None:
            wait = max(1.0, next_run - self._wall())
            until = " until " + datetime.fromtimestamp(next_run, UTC).strftime(
                "%Y-%m-%d %H:%M:%S UTC")
        why = ", ".join(reasons) or "a credential failure"
        return Refusal(429, f"the inbox is backing off after {why}{until}: an on-demand check "
                       "now could lock the account", wait)
