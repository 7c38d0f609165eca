"""One APScheduler job per inbox; a reload is a diff of jobs.

- Each job runs at its inbox's interval with max_instances=1 and coalescing: a slow check is
  never stacked on itself, missed runs collapse into one.
- First runs are spread over the first interval by a stable per-inbox offset (a hash of the
  name, like Prometheus' scrape offsets), so a thousand inboxes never connect at once and
  an inbox keeps its slot across restarts and reloads.
- Credential failures (unauthorized, app_password_required) and rate limits double the
  interval up to `auth_failure_max_interval`, so the monitor never locks an account nor keeps
  hitting a limit; a success, or a reload that changes that inbox, brings it back to its
  interval.
- The test email goes out at most every `test_email.interval`; the checks in between verify
  the SMTP connect and login and show the step as skipped. The doubling starts once the failures reach
  the alerting threshold, so backing off never delays the alert.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from .check import Checker
from .config import Config, Inbox
from .metrics import ExporterMetrics
from .model import CheckResult
from .runner import Runner
from .store import BACKOFF_REASONS, CREDENTIAL_CATEGORIES, Store

log = logging.getLogger(__name__)

DEFAULT_AUTH_FAILURE_MAX_INTERVAL = 3600.0


def start_offset(name: str, interval: float) -> float:
    """A stable offset in [0, interval) for this inbox's first run."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * interval


class Scheduler:
    """When each inbox is checked. The checks themselves run on the runner: a job here only
    queues the check's two legs and returns, so APScheduler's own threads never wait for a
    server, and a hanging server delays nothing but its own checks."""

    def __init__(self, store: Store, checker: Checker, metrics: ExporterMetrics, runner: Runner,
                 auth_failure_max_interval: float = DEFAULT_AUTH_FAILURE_MAX_INTERVAL,
                 on_error: Callable[[BaseException], None] | None = None,
                 backoff_after: int = 2,
                 on_sent: Callable[[Inbox, CheckResult], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.store, self.checker, self.metrics, self.runner = store, checker, metrics, runner
        self.auth_failure_max_interval = auth_failure_max_interval
        # Backing off starts once an alert could fire (failure_threshold failed checks), so a
        # rotated password is reported within failure_threshold x interval: a couple of
        # failed logins, far below any lockout policy.
        self.backoff_after = backoff_after
        self._on_error = on_error
        self._on_sent = on_sent  # a test email went out: the delivery step takes it from here
        self._clock = clock
        self._sched = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=2)},  # jobs only enqueue
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC)
        self._sched.add_listener(self._on_event, EVENT_JOB_MISSED | EVENT_JOB_ERROR)
        self._inboxes: dict[str, Inbox] = {}
        self._anchor: dict[str, tuple[float, float]] = {}  # name -> (first run, interval)
        # One lock for the job table: a reload and a backoff never interleave (a backoff must
        # not put back the job of an inbox a reload has just replaced).
        self._lock = threading.RLock()
        self._busy: set[str] = set()  # inboxes with a check queued or running

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._sched.start()

    def stop(self, grace: float) -> bool:
        """Stop scheduling; wait up to `grace` seconds for checks in flight. True if all ended."""
        self._sched.pause()
        done = self.runner.stop(grace)
        self._sched.shutdown(wait=False)
        return done

    def alive(self) -> bool:
        """Liveness: the scheduler's thread runs and the runner's dispatcher ticks. Never a
        question of capacity: a busy exporter is alive (saturation is in the metrics)."""
        thread = getattr(self._sched, "_thread", None)
        return self._sched.running and thread is not None and thread.is_alive() and self.runner.alive()

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
        start = datetime.fromtimestamp(first, UTC)
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

    def submit_on_demand(self, inbox: Inbox, on_done: Callable[[CheckResult], None]) -> bool:
        """An on-demand check (see ondemand.py for when one may start): queued like a scheduled
        one, within the same caps, workers and test-email budget. `on_done(result)` runs after
        the result is recorded. False when a check of the inbox is already queued or running."""
        return self._submit(inbox, time.time(), on_done=on_done, on_demand=True)

    def _run(self, inbox: Inbox) -> None:
        first, interval = self._anchor.get(inbox.name, (time.time(), inbox.interval))
        now = time.time()
        scheduled = first + max(0, int((now - first) // interval)) * interval
        if not self._submit(inbox, scheduled):
            self.metrics.skipped.inc()
            log.warning("check skipped: the previous one is still queued or running",
                        extra={"inbox": inbox.name})

    def hold_test_email(self, inbox: Inbox, now: float, on_demand: bool = False) -> str | None:
        """Why this check sends no test email (None: it does): at most one per
        test_email.interval, so a monitor stays far below the providers' sending limits."""
        state = self.store.get(inbox.name)
        last = state.last_test_email_at if state else None
        # A scheduled check starts on its grid, but the mail it sent last time went out up to a
        # deadline after its own start: without that much slack, a send due now would slip a
        # whole interval. An on-demand check gets none: never two mails inside the interval.
        slack = 0.0 if on_demand else min(inbox.interval / 2, inbox.deadline)
        if last is None or now - last >= inbox.test_email_interval - slack:
            return None
        sent = datetime.fromtimestamp(last, UTC).strftime("%H:%M:%S UTC")
        return (f"not due: last sent at {sent}; sent at most every "
                f"{inbox.test_email_interval:g}s (test_email.interval)")

    def _submit(self, inbox: Inbox, scheduled: float,
                on_done: Callable[[CheckResult], None] | None = None,
                on_demand: bool = False) -> bool:
        with self._lock:
            if inbox.name in self._busy:
                return False  # max one check per inbox: a slow one is never stacked
            self._busy.add(inbox.name)
        self.metrics.in_flight.inc()
        submitted = time.time()
        started: list[bool] = []

        def on_start(waited: float) -> None:
            if not started:  # the first leg to start: the check's lateness
                started.append(True)
                self.metrics.lag.observe(max(0.0, submitted - scheduled) + waited)

        def on_result(result: CheckResult) -> None:
            try:
                self._record(inbox, result)
            except Exception as e:
                log.exception("recording a check crashed", extra={"inbox": inbox.name})
                if self._on_error:
                    self._on_error(e)
            finally:
                self.metrics.in_flight.dec()
                with self._lock:
                    self._busy.discard(inbox.name)
                if on_done is not None:
                    on_done(result)

        self.checker.check_async(self.runner, inbox, on_result,
                                 hold_test_email=self.hold_test_email(
                                     inbox, submitted, on_demand),
                                 on_start=on_start)
        return True

    def _record(self, inbox: Inbox, result: CheckResult) -> None:
        self.metrics.observe(result, inbox.provider)
        state = self.store.get(inbox.name)
        failures = 0 if result.ok else (state.consecutive_failures if state else 0) + 1
        effective = self._next_interval(inbox, state.effective_interval if state else None,
                                        result, failures)
        self.store.record(result, inbox, effective)
        if self._on_sent and result.sent_at is not None:
            self._on_sent(inbox, result)
        if (state.effective_interval if state else None) != effective:
            self._backoff(inbox, effective)

    def _next_interval(self, inbox: Inbox, current: float | None, result: CheckResult,
                       failures: int) -> float | None:
        if not any(s.diagnosis.category in CREDENTIAL_CATEGORIES
                   or s.diagnosis.reason in BACKOFF_REASONS
                   for s in result.failures if s.diagnosis):
            return None
        if failures < self.backoff_after:
            return None  # keep the pace until the alert has had its checks
        doubled = 2 * (current or inbox.interval)
        return min(max(doubled, inbox.interval), max(self.auth_failure_max_interval, inbox.interval))

    def _backoff(self, inbox: Inbox, effective: float | None) -> None:
        with self._lock:
            if self._inboxes.get(inbox.name) != inbox:
                return  # removed or changed meanwhile: the reload scheduled the new one
            interval = effective or inbox.interval
            self._add(inbox, delay=interval, interval=interval)
        if effective:
            log.warning("credential failure or rate limit: backing off", extra={
                "inbox": inbox.name, "interval_seconds": interval})

    def next_run(self, name: str) -> float | None:
        job = self._sched.get_job(name)
        if job is None or job.next_run_time is None:
            return None
        return job.next_run_time.timestamp()

    def _on_event(self, event: JobExecutionEvent) -> None:
        if event.code == EVENT_JOB_MISSED:
            self.metrics.skipped.inc()
        elif event.code == EVENT_JOB_ERROR:
            log.error("scheduling a check crashed", extra={"inbox": event.job_id},
                      exc_info=(type(event.exception), event.exception, None))
            if self._on_error:
                self._on_error(event.exception)
