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


def build_sinks(cfg: Alerting, sentry_sink: Sink | None = None) -> list[Sink]:
    sinks: list[Sink] = []
    if sentry_sink is not None:
        sinks.append(sentry_sink)
    if cfg.alertmanager_url:
        sinks.append(AlertmanagerSink(cfg.alertmanager_url, cfg.resend_interval,
                                      cfg.runbook_url, cfg.status_page_url,
                                      headers={k: v.get_secret_value()
                                               for k, v in cfg.alertmanager_headers}))
    for i, (url, headers) in enumerate(cfg.webhooks):
        sinks.append(WebhookSink(url, {k: v.get_secret_value() for k, v in headers},
                                 cfg.runbook_url, cfg.status_page_url, index=i))
    return sinks


class AlertPipeline:
    def __init__(self, cfg: Alerting, sent: Counter, secrets: Callable[[], Iterable[str]]):
        self._sent, self._secrets = sent, secrets
        self.transitions = Transitions(cfg.failure_threshold, cfg.recovery_threshold)
        self._cfg: Alerting | None = None
        self._dispatcher = Dispatcher([], sent)
        self._sentry: tuple[tuple[str, str], sentry.SentrySink] | None = None  # (DSN, env), sink
        self.configure(cfg)

    def configure(self, cfg: Alerting) -> None:
        """Adopt a (re)loaded alerting section.

        The transitions (what fires, hence what will resolve) and every sink's queue survive:
        a kept sink delivers what waited for it, through its reloaded settings. A removed sink
        is stopped and closed. Only a sink that is new, or now points elsewhere, gets the
        firing alerts handed over (the others have them already: no duplicate pages).
        """
        self.transitions.failure_threshold = cfg.failure_threshold
        self.transitions.recovery_threshold = cfg.recovery_threshold
        if cfg == self._cfg:
            return
        fresh = self._dispatcher.update(build_sinks(cfg, self._sentry_sink(cfg)))
        self._cfg = cfg
        firing = self.transitions.firing()
        if fresh and firing:
            self._dispatcher.submit(firing, only=fresh)
        log.info("alerting configured", extra={"sinks": ",".join(s.name for s in self._dispatcher.sinks)
                                               or "none"})

    def _sentry_sink(self, cfg: Alerting) -> sentry.SentrySink | None:
        """The Sentry sink, kept while its DSN and environment are (one client per DSN)."""
        if cfg.sentry_dsn is None:
            self._sentry = None
            return None
        key = (cfg.sentry_dsn.get_secret_value(), cfg.sentry_environment)
        if self._sentry is None or self._sentry[0] != key:
            client = sentry.init(key[0], key[1], self._secrets)
            self._sentry = (key, sentry.SentrySink(client))
        return self._sentry[1]

    def on_record(self, previous: InboxState | None, state: InboxState) -> None:
        """Store listener: runs on the check's thread, so it must never block."""
        if state.last is not None:
            self.observe(state.last, state.inbox.provider)

    def observe(self, result: CheckResult, provider: str) -> None:
        alerts = self.transitions.observe(result, provider)
        if alerts:
            self._dispatcher.submit(alerts)

    def forget(self, names: Iterable[str]) -> None:
        now = time.time()
        for name in names:
            alerts = self.transitions.forget(name, now)
            if alerts:
                self._dispatcher.submit(alerts)

    def stop(self) -> None:
        self._dispatcher.stop()
