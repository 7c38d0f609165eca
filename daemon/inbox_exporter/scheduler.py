"""One APScheduler job per inbox; a reload is a diff of jobs.

- Each job runs at its inbox's interval with max_instances=1 and coalescing: a slow check is
  never stacked on itself, missed runs collapse into one.
- First runs are spread over the first interval by a stable per-inbox offset (a hash of the
  name, like Prometheus' scrape offsets), so a thousand inboxes never connect at once and
  an inbox keeps its slot across restarts and reloads.
- Credential failures (unauthorized, app_password_required) double the interval up to
  `auth_failure_max_interval`, so the monitor never locks an account; a success or a reload
  of that inbox brings it back to its interval. The doubling starts once the failures reach
  the alerting threshold, so backing off never delays the alert.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from .check import Checker
from .config import Config, Inbox
from .metrics import ExporterMetrics
from .model import CheckResult
from .store import CREDENTIAL_CATEGORIES, Store

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 32
DEFAULT_AUTH_FAILURE_MAX_INTERVAL = 3600.0


def start_offset(name: str, interval: float) -> float:
    """A stable offset in [0, interval) for this inbox's first run."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * interval


class Scheduler:
    def __init__(self, store: Store, checker: Checker, metrics: ExporterMetrics,
                 workers: int = DEFAULT_WORKERS,
                 auth_failure_max_interval: float = DEFAULT_AUTH_FAILURE_MAX_INTERVAL,
                 on_error: Callable[[BaseException], None] | None = None,
                 backoff_after: int = 2,
                 on_sent: Callable[[Inbox, CheckResult], None] | None = None):
        self.store, self.checker, self.metrics = store, checker, metrics
        self.auth_failure_max_interval = auth_failure_max_interval
        # Backing off starts once an alert could fire (failure_threshold failed checks), so a
        # rotated password is reported within failure_threshold x interval: a couple of
        # failed logins, far below any lockout policy.
        self.backoff_after = backoff_after
        self._on_error = on_error
        self._on_sent = on_sent  # a test email went out: the delivery step takes it from here
        self._sched = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=workers)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=timezone.utc)
        self._sched.add_listener(self._on_event,
                                 EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED | EVENT_JOB_ERROR)
        self._inboxes: dict[str, Inbox] = {}
        self._anchor: dict[str, tuple[float, float]] = {}  # name -> (first run, interval)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._idle = threading.Condition(self._lock)
        self.last_tick = time.monotonic()

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._sched.start()
        # A heartbeat job: /-/healthy checks the scheduler is alive and ticking.
        self._sched.add_job(self._tick, IntervalTrigger(seconds=5), id="__heartbeat__",
                            next_run_time=datetime.now(timezone.utc))

    def stop(self, grace: float) -> bool:
        """Stop scheduling; wait up to `grace` seconds for checks in flight. True if all ended."""
        self._sched.pause()
        with self._idle:
            done = self._idle.wait_for(lambda: self._in_flight == 0, timeout=grace)
        self._sched.shutdown(wait=done)
        return done

    def _tick(self) -> None:
        self.last_tick = time.monotonic()

    # --- configuration ------------------------------------------------------------------

    def apply(self, config: Config) -> None:
        """Start added inboxes, stop removed ones, restart changed ones."""
        wanted = {i.name: i for i in config.inboxes}
        self.store.sync(wanted.values())
        with self._lock:
            current = dict(self._inboxes)
            self._inboxes = wanted
        # Paused, the scheduler thread does not wake up for each of thousands of changes.
        self._sched.pause()
        try:
            for name in current.keys() - wanted.keys():
                self._remove(name)
            for name, inbox in wanted.items():
                if current.get(name) != inbox:
                    if name in current:
                        self._remove(name)
                    self._add(inbox, delay=start_offset(name, inbox.interval))
        finally:
            self._sched.resume()
        self.metrics.inboxes.set(len(wanted))
        log.info("inboxes scheduled", extra={"inboxes": len(wanted),
                                             "added": len(wanted.keys() - current.keys()),
                                             "removed": len(current.keys() - wanted.keys())})

    def _add(self, inbox: Inbox, delay: float, interval: float | None = None) -> None:
        interval = interval or inbox.interval
        first = time.time() + delay
        self._anchor[inbox.name] = (first, interval)
        start = datetime.fromtimestamp(first, timezone.utc)
        self._sched.add_job(self._run, IntervalTrigger(seconds=interval, start_date=start),
                            args=(inbox,), id=inbox.name, name=inbox.name,
                            replace_existing=True)
        self.store.set_next_run(inbox.name, first)

    def _remove(self, name: str) -> None:
        self._anchor.pop(name, None)
        try:
            self._sched.remove_job(name)
        except Exception:  # noqa: BLE001 - JobLookupError: already gone
            pass

    def inboxes(self) -> dict[str, Inbox]:
        with self._lock:
            return dict(self._inboxes)

    # --- running checks -----------------------------------------------------------------

    def run_now(self, inbox: Inbox) -> CheckResult:
        """An on-demand check (/probe): same checker and caps; recorded like a scheduled one."""
        return self._check(inbox)

    def _run(self, inbox: Inbox) -> None:
        first, interval = self._anchor.get(inbox.name, (time.time(), inbox.interval))
        now = time.time()
        scheduled = first + max(0, int((now - first) // interval)) * interval
        self.metrics.lag.observe(max(0.0, now - scheduled))
        self._check(inbox)

    def _check(self, inbox: Inbox) -> CheckResult:
        with self._lock:
            self._in_flight += 1
        self.metrics.in_flight.inc()
        try:
            result = self.checker.check(inbox)
            self.metrics.observe(result, inbox.provider)
            state = self.store.get(inbox.name)
            failures = 0 if result.ok else (state.consecutive_failures if state else 0) + 1
            effective = self._next_interval(inbox, state.effective_interval if state else None,
                                            result, failures)
            self.store.record(result, inbox, effective)
            if self._on_sent and inbox.delivery is not None and result.sent_at is not None:
                self._on_sent(inbox, result)
            if (state.effective_interval if state else None) != effective:
                self._backoff(inbox, effective)
            return result
        finally:
            self.metrics.in_flight.dec()
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _next_interval(self, inbox: Inbox, current: float | None, result: CheckResult,
                       failures: int) -> float | None:
        if not any(s.diagnosis.category in CREDENTIAL_CATEGORIES for s in result.failures):
            return None
        if failures < self.backoff_after:
            return None  # keep the pace until the alert has had its checks
        doubled = 2 * (current or inbox.interval)
        return min(max(doubled, inbox.interval), max(self.auth_failure_max_interval, inbox.interval))

    def _backoff(self, inbox: Inbox, effective: float | None) -> None:
        with self._lock:
            if self._inboxes.get(inbox.name) != inbox:
                return  # removed or changed meanwhile
        interval = effective or inbox.interval
        if effective:
            log.warning("credential failure: backing off", extra={
                "inbox": inbox.name, "interval_seconds": interval})
        self._add(inbox, delay=interval, interval=interval)

    def next_run(self, name: str) -> float | None:
        job = self._sched.get_job(name)
        if job is None or job.next_run_time is None:
            return None
        return job.next_run_time.timestamp()

    def _on_event(self, event) -> None:
        if event.job_id == "__heartbeat__":
            return
        if event.code == EVENT_JOB_MAX_INSTANCES:
            self.metrics.skipped.inc()
            log.warning("check skipped: the previous one is still running",
                        extra={"inbox": event.job_id})
        elif event.code == EVENT_JOB_MISSED:
            self.metrics.skipped.inc()
        elif event.code == EVENT_JOB_ERROR:
            log.error("check crashed", extra={"inbox": event.job_id},
                      exc_info=(type(event.exception), event.exception, None))
            if self._on_error:
                self._on_error(event.exception)

