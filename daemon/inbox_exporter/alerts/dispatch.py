"""Delivery off the check path: per sink, a bounded queue and one worker thread.

A sink that is down never slows or stops the checks: `submit` never blocks (a full queue drops
the alert and counts it), each send is bounded by a timeout, transient errors are retried a
few times with exponential backoff, and permanent ones (HTTP 4xx but 408/429) are not.

A reload (`update`) keeps each sink's queue and worker by the sink's name: what waits there
(a "resolved" among it, or an alert between two retries) is delivered by the reloaded sink. A
sink that left the config is stopped and closed; what still waited for it is dropped, counted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable

from prometheus_client import Counter

from .transitions import Alert

log = logging.getLogger(__name__)

QUEUE_SIZE = 1000
ATTEMPTS = 4
BACKOFF = 1.0  # seconds before the first retry; doubles each time
_WAKE = object()  # put on a queue to wake its worker (stop)


class SinkError(Exception):
    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


class Sink:
    name = "sink"
    tick_interval: float | None = None  # sinks that re-send (Alertmanager) set this

    def send(self, alert: Alert) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        """Called every `tick_interval` seconds from the worker thread."""

    @property
    def destination(self) -> object:
        """Where the alerts go: a reloaded sink with another destination gets the firing
        alerts handed over (the new receiver knows nothing of them)."""
        return None

    def adopt(self, previous: Sink) -> None:
        """Take over what the sink it replaces (same name and destination) keeps in memory."""

    def close(self) -> None:
        pass


class _Worker:
    """One sink's queue and thread. The sink object may be replaced (a reload); the queue stays."""

    def __init__(self, sink: Sink, owner: Dispatcher, queue_size: int):
        self.sink = sink
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._owner = owner
        self._stop = threading.Event()
        self._retired: list[Sink] = []  # replaced sinks, closed by this thread between sends
        self._closed: weakref.WeakSet[Sink] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"alerts-{sink.name}", daemon=True)
        self.thread.start()

    def replace(self, sink: Sink) -> None:
        with self._lock:
            old, self.sink = self.sink, sink
            sink.adopt(old)
            self._retired.append(old)
        self._wake()

    def stop(self) -> None:
        self._stop.set()
        self._wake()

    def _wake(self) -> None:
        try:
            self.queue.put_nowait(_WAKE)
        except queue.Full:
            pass  # busy: it looks again after the alert at hand

    def close_retired(self) -> None:
        with self._lock:
            retired, self._retired = self._retired, []
        for sink in retired:
            self._close(sink)

    def close_all(self) -> None:
        """Close the current and every retired sink, each once (the worker or `stop` may)."""
        self.close_retired()
        self._close(self.sink)

    def _close(self, sink: Sink) -> None:
        with self._lock:
            if sink in self._closed:
                return
            self._closed.add(sink)
        try:
            sink.close()
        except Exception as e:  # noqa: BLE001 - closing must not kill the worker
            log.warning("alert sink error", extra={"sink": sink.name, "during": "close",
                                                   "error": str(e)})

    def _run(self) -> None:
        last_tick = time.monotonic()
        while not self._stop.is_set():
            self.close_retired()
            interval = self.sink.tick_interval
            # Tick on time even while alerts keep arriving: re-sending must not wait for a
            # quiet queue.
            wait = None if not interval else max(0.0, last_tick + interval - time.monotonic())
            try:
                alert = self.queue.get(timeout=wait)
            except queue.Empty:
                alert = None
            if alert is not None and alert is not _WAKE:
                self._owner._deliver(self, alert)
            interval = self.sink.tick_interval
            if interval and time.monotonic() - last_tick >= interval and not self._stop.is_set():
                last_tick = time.monotonic()
                self._owner._guarded(self.sink, self.sink.tick, "resend")
        left = 0
        while True:
            try:
                if self.queue.get_nowait() is not _WAKE:
                    left += 1
            except queue.Empty:
                break
        if left:
            self._owner._sent.labels(self.sink.name, "dropped").inc(left)
            log.error("alert sink stopped: alerts dropped", extra={"sink": self.sink.name,
                                                                   "count": left})
        self.close_all()

    def stopping(self, seconds: float) -> bool:
        """Wait between retries; True if the worker is being stopped."""
        return self._stop.wait(seconds)


class Dispatcher:
    def __init__(self, sinks: Iterable[Sink], sent: Counter, backoff: float = BACKOFF,
                 attempts: int = ATTEMPTS, queue_size: int = QUEUE_SIZE):
        self._sent = sent
        self._backoff, self._attempts, self._queue_size = backoff, attempts, queue_size
        self._lock = threading.Lock()
        self._workers: dict[str, _Worker] = {s.name: _Worker(s, self, queue_size) for s in sinks}

    @property
    def sinks(self) -> list[Sink]:
        return [w.sink for w in self._workers.values()]

    def update(self, sinks: Iterable[Sink]) -> list[Sink]:
        """Adopt the sinks of a reloaded config; returns the sinks that start afresh (a new
        name, or a new destination), to which the firing alerts must be handed over."""
        wanted = {s.name: s for s in sinks}
        fresh: list[Sink] = []
        with self._lock:
            for name in [n for n in self._workers if n not in wanted]:
                worker = self._workers.pop(name)
                worker.stop()  # its thread closes the sink once the alert at hand is done
                log.info("alert sink removed", extra={"sink": name})
            for name, sink in wanted.items():
                current = self._workers.get(name)
                if current is None:
                    self._workers[name] = _Worker(sink, self, self._queue_size)
                    fresh.append(sink)
                elif current.sink is not sink:
                    if current.sink.destination != sink.destination:
                        fresh.append(sink)
                    current.replace(sink)
        return fresh

    def submit(self, alerts: Iterable[Alert], only: Iterable[Sink] | None = None) -> None:
        targets = None if only is None else {id(s) for s in only}
        with self._lock:
            workers = [w for w in self._workers.values() if targets is None or id(w.sink) in targets]
        for alert in alerts:
            for worker in workers:
                try:
                    worker.queue.put_nowait(alert)
                except queue.Full:
                    self._sent.labels(worker.sink.name, "dropped").inc()
                    log.error("alert queue full: alert dropped",
                              extra={"sink": worker.sink.name, "inbox": alert.inbox})

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            w.stop()
        deadline = time.monotonic() + timeout
        for w in workers:
            w.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in workers:
            w.close_all()  # a worker stuck in a send must not keep its sink open

    def _deliver(self, worker: _Worker, alert: Alert) -> None:
        error: Exception | None = None
        for attempt in range(self._attempts):
            sink = worker.sink  # a retry after a reload goes through the reloaded sink
            try:
                sink.send(alert)
                self._sent.labels(sink.name, "success").inc()
                return
            except SinkError as e:
                if e.permanent:
                    self._fail(sink, alert, e)
                    return
                error = e
            except Exception as e:  # noqa: BLE001 - a sink's bug must not kill its worker
                error = e
            if attempt + 1 < self._attempts and worker.stopping(self._backoff * 2 ** attempt):
                break
        assert error is not None
        self._fail(worker.sink, alert, error)

    def _fail(self, sink: Sink, alert: Alert, error: Exception) -> None:
        self._sent.labels(sink.name, "failure").inc()
        log.error("alert not delivered", extra={"sink": sink.name, "inbox": alert.inbox,
                                                 "status": alert.status, "error": str(error)})

    def _guarded(self, sink: Sink, fn: Callable[[], object], what: str) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a broken sink must not stop the others
            log.warning("alert sink error", extra={"sink": sink.name, "during": what,
                                                   "error": str(e)})
