"""Running connections without letting one server starve the others.

Everything the daemon does on a mail server is a `Job`: one connection (an IMAP chain, an SMTP
chain) within the connection caps. Jobs wait in a queue per server ("lane"), not on a thread:
a worker is taken only when the job's slot is free (the server below its cap, the account not
in use), and it is held only while the job talks to the server. So a server that hangs or
black-holes every connection ties up at most its own cap of workers
(`checks.max_connections_per_host`), and everything queued behind it costs a list entry, not a
thread. A job that could not start before it is no longer useful (its inbox's next run is due)
ends as "not run", counted and reported, never silently dropped.

blackbox_exporter gets the same isolation from a goroutine per probe; this is the bounded
Python equivalent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .limits import ConnectionLimits, Slot

log = logging.getLogger(__name__)

TICK = 0.5  # the dispatcher wakes at least this often (expiry, liveness)


@dataclass(eq=False)
class Job:
    protocol: str  # imap | smtp: part of the account key
    host: str
    identities: frozenset[str]
    run: Callable[[], None]  # talks to the server while the slot is held; must not raise
    expire: Callable[[str], None]  # called instead of run when the job never got a slot
    expires_at: float  # monotonic: not started by then -> expire()
    queued_at: float = 0.0
    on_start: Callable[[float], None] = lambda waited: None  # seconds spent waiting
    abort: Callable[[], None] = lambda: None  # cut the connection (shutdown after the grace)
    server: str = field(default="", init=False)
    accounts: frozenset = field(default=frozenset(), init=False)


class Runner:
    """Per-server queues in front of one bounded worker pool."""

    def __init__(self, limits: ConnectionLimits, workers: int,
                 clock: Callable[[], float] = time.monotonic):
        self.limits, self._clock = limits, clock
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="check")
        self._lock = threading.Condition()
        self._lanes: dict[str, deque[Job]] = {}
        self._running = 0
        self._active: set[Job] = set()
        self._waiting = 0
        self._stopped = False
        self.last_tick = self._clock()
        self._thread = threading.Thread(target=self._loop, name="runner", daemon=True)
        self._thread.start()

    # --- what callers see ------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        job.server = self.limits.server_key(job.host)
        job.accounts = self.limits.accounts(job.protocol, job.host, job.identities)
        job.queued_at = self._clock()
        with self._lock:
            if self._stopped:
                stopped = True
            else:
                stopped = False
                self._lanes.setdefault(job.server, deque()).append(job)
                self._waiting += 1
                self._dispatch(job.server)
        if stopped:
            job.expire("not run: the exporter is shutting down")

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    def alive(self) -> bool:
        return self._thread.is_alive() and self._clock() - self.last_tick < 10 * TICK + 5

    def stop(self, grace: float) -> bool:
        """Drop the queued jobs (expired as "shutting down"); wait up to `grace` for the
        running ones. True if none is left running."""
        with self._lock:
            self._stopped = True
            dropped = [j for lane in self._lanes.values() for j in lane]
            self._lanes.clear()
            self._waiting = 0
            self._lock.notify_all()
        for job in dropped:
            job.expire("not run: the exporter is shutting down")
        with self._lock:
            done = self._lock.wait_for(lambda: self._running == 0, timeout=grace)
            left = list(self._active)
        if not done:
            # The grace period is over: cut what still talks (a hanging server would otherwise
            # keep the process alive until its step timeouts), then give them a moment to end.
            for job in left:
                job.abort()
            with self._lock:
                self._lock.wait_for(lambda: self._running == 0, timeout=2.0)
        self._thread.join(timeout=2)
        self._pool.shutdown(wait=done, cancel_futures=True)
        return done

    # --- dispatching ------------------------------------------------------------------------

    def _dispatch(self, server: str) -> None:
        """Start every queued job of `server` whose slot is free (lock held). Jobs blocked on a
        busy account do not hold up the others in the lane."""
        lane = self._lanes.get(server)
        if not lane:
            return
        started = []
        for job in lane:
            if not self.limits.has_room(server):
                break  # the server is at its cap: nothing else of this lane can start
            slot = self.limits.try_take(job.accounts, server)
            if slot is None:
                continue  # its account is busy: the next job may still start
            started.append((job, slot))
        for job, slot in started:
            lane.remove(job)
            self._waiting -= 1
            self._running += 1
            self._active.add(job)
            self._pool.submit(self._work, job, slot)
        if not lane:
            del self._lanes[server]

    def _work(self, job: Job, slot: Slot) -> None:
        try:
            job.on_start(self._clock() - job.queued_at)
            job.run()
        except Exception:  # our bug: logged, the worker and the slot survive
            log.exception("connection job crashed", extra={"host": job.host})
        finally:
            self.limits.release(slot)
            with self._lock:
                self._running -= 1
                self._active.discard(job)
                if not self._stopped:
                    self._dispatch(job.server)
                self._lock.notify_all()

    def _loop(self) -> None:
        """Expire jobs that waited too long; retry lanes (a reload may have raised a cap)."""
        while True:
            expired: list[Job] = []
            with self._lock:
                if self._stopped:
                    return
                now = self._clock()
                self.last_tick = now
                for server in list(self._lanes):
                    lane = self._lanes[server]
                    for job in [j for j in lane if j.expires_at <= now]:
                        lane.remove(job)
                        self._waiting -= 1
                        expired.append(job)
                    self._dispatch(server)
                self._lock.wait(TICK)
            for job in expired:
                try:
                    job.expire("not run: no connection slot was free before the next run was due: "
                               "the server is at checks.max_connections_per_host or the account "
                               "is in use (a slow or hanging server, or shared accounts)")
                except Exception:
                    log.exception("expiring a job crashed", extra={"host": job.host})
