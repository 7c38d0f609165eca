"""The alerting pipeline of the exporter: check results -> transitions -> sinks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from prometheus_client import Counter

from ..config import Alerting
from ..model import CheckResult
from ..store import InboxState
from . import sentry
from .alertmanager import AlertmanagerSink
from .dispatch import Dispatcher, Sink
from .transitions import Transitions
from .webhook import WebhookSink

log = logging.getLogger(__name__)


def build_sinks(cfg: Alerting) -> list[Sink]:
    sinks: list[Sink] = []
    if cfg.sentry_dsn is not None:
        sinks.append(sentry.SentrySink())
    if cfg.alertmanager_url:
        sinks.append(AlertmanagerSink(cfg.alertmanager_url, cfg.resend_interval,
                                      cfg.runbook_url, cfg.status_page_url))
    for i, (url, headers) in enumerate(cfg.webhooks):
        sinks.append(WebhookSink(url, {k: v.get_secret_value() for k, v in headers},
                                 cfg.runbook_url, cfg.status_page_url, index=i))
    return sinks


class AlertPipeline:
    def __init__(self, cfg: Alerting, sent: Counter, secrets: Callable[[], Iterable[str]]):
        self._sent, self._secrets = sent, secrets
        self.transitions = Transitions(cfg.failure_threshold, cfg.recovery_threshold)
        self._cfg: Alerting | None = None
        self._dispatcher: Dispatcher | None = None
        self.configure(cfg)

    def configure(self, cfg: Alerting) -> None:
        """Adopt a (re)loaded alerting section; sinks are rebuilt only when it changed."""
        self.transitions.failure_threshold = cfg.failure_threshold
        self.transitions.recovery_threshold = cfg.recovery_threshold
        if cfg == self._cfg:
            return
        if cfg.sentry_dsn is not None:
            sentry.init(cfg.sentry_dsn.get_secret_value(), cfg.sentry_environment, self._secrets)
        old, self._dispatcher = self._dispatcher, Dispatcher(build_sinks(cfg), self._sent)
        self._cfg = cfg
        if old is not None:
            old.stop()
        # Alertmanager forgets what it is no longer told: hand the firing alerts over.
        self._dispatcher.submit(self.transitions.firing())
        log.info("alerting configured", extra={"sinks": ",".join(s.name for s in self._dispatcher.sinks)
                                               or "none"})

    def on_record(self, previous: InboxState | None, state: InboxState) -> None:
        """Store listener: runs on the check's thread, so it must never block."""
        if state.last is not None:
            self.observe(state.last, state.inbox.provider)

    def observe(self, result: CheckResult, provider: str) -> None:
        alerts = self.transitions.observe(result, provider)
        if alerts and self._dispatcher is not None:
            self._dispatcher.submit(alerts)

    def forget(self, names: Iterable[str]) -> None:
        now = time.time()
        for name in names:
            alerts = self.transitions.forget(name, now)
            if alerts and self._dispatcher is not None:
                self._dispatcher.submit(alerts)

    def stop(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.stop()
