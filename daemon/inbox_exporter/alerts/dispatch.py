"""Delivery off the check path: per sink, a bounded queue and one worker thread.

A sink that is down never slows or stops the checks: `submit` never blocks (a full queue drops
the alert and counts it), each send is bounded by a timeout, transient errors are retried a
few times with exponential backoff, and permanent ones (HTTP 4xx but 408/429) are not.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable

from prometheus_client import Counter

from .transitions import Alert

log = logging.getLogger(__name__)

QUEUE_SIZE = 1000
ATTEMPTS = 4
BACKOFF = 1.0  # seconds before the first retry; doubles each time


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

    def close(self) -> None:
        pass


class Dispatcher:
    def __init__(self, sinks: Iterable[Sink], sent: Counter, backoff: float = BACKOFF,
                 attempts: int = ATTEMPTS, queue_size: int = QUEUE_SIZE):
        self.sinks = list(sinks)
        self._sent = sent
        self._backoff, self._attempts = backoff, attempts
        self._stop = threading.Event()
        self._queues = {s.name: queue.Queue(maxsize=queue_size) for s in self.sinks}
        self._threads = [threading.Thread(target=self._work, args=(s,), name=f"alerts-{s.name}",
                                          daemon=True) for s in self.sinks]
        for t in self._threads:
            t.start()

    def submit(self, alerts: Iterable[Alert]) -> None:
        for alert in alerts:
            for sink in self.sinks:
                try:
                    self._queues[sink.name].put_nowait(alert)
                except queue.Full:
                    self._sent.labels(sink.name, "dropped").inc()
                    log.error("alert queue full: alert dropped",
                              extra={"sink": sink.name, "inbox": alert.inbox})

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=timeout)
        for sink in self.sinks:
            sink.close()

    def _work(self, sink: Sink) -> None:
        q = self._queues[sink.name]
        while not self._stop.is_set():
            try:
                alert = q.get(timeout=sink.tick_interval or 0.5)
            except queue.Empty:
                if sink.tick_interval:
                    self._guarded(sink, sink.tick, "resend")
                continue
            self._deliver(sink, alert)

    def _deliver(self, sink: Sink, alert: Alert) -> None:
        for attempt in range(self._attempts):
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
            if self._stop.wait(self._backoff * 2 ** attempt):
                break
        self._fail(sink, alert, error)

    def _fail(self, sink: Sink, alert: Alert, error: Exception) -> None:
        self._sent.labels(sink.name, "failure").inc()
        log.error("alert not delivered", extra={"sink": sink.name, "inbox": alert.inbox,
                                                 "status": alert.status, "error": str(error)})

    def _guarded(self, sink: Sink, fn, what: str) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            log.warning("alert sink error", extra={"sink": sink.name, "during": what,
                                                   "error": str(e)})
