"""Sentry: one Sentry issue per inbox and category, recovery as an info event, and the
daemon's own unexpected exceptions. A before_send scrubber removes every secret we know of;
no PII, no local variables, no request bodies are sent."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import sentry_sdk
from sentry_sdk.integrations.logging import LoggingIntegration

from .. import __version__
from ..redact import redact
from .alertmanager import summary
from .dispatch import Sink
from .transitions import FIRING, Alert

Event = Any  # sentry-sdk's event and breadcrumb dicts
Hook = Callable[[Any, Any], Any]


def scrubber(secrets: Callable[[], Iterable[str]]) -> Hook:
    """before_send: redact every known secret anywhere in the event (strings, keys' values)."""
    known: list[str] = []  # read again for each event: a reload may add secrets

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return redact(value, known)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    def before_send(event: Event, hint: Any) -> Event:
        known[:] = [s for s in secrets() if s]
        event.pop("request", None)
        return clean(event)

    return before_send


def breadcrumb_scrubber(secrets: Callable[[], Iterable[str]]) -> Hook:
    """before_breadcrumb: log lines become breadcrumbs; redact them as events are."""
    clean_event = scrubber(secrets)

    def before_breadcrumb(crumb: Event, hint: Any) -> Event | None:
        return clean_event(crumb, hint)

    return before_breadcrumb


def _drop(event: Event, hint: Any) -> None:
    return None  # no performance data leaves the process


def init(dsn: str, environment: str, secrets: Callable[[], Iterable[str]]) -> sentry_sdk.Client:
    """A client for this DSN, made the process's (the scheduler reports our crashes to it)."""
    client = sentry_sdk.Client(
        dsn=dsn, environment=environment, release=f"inbox-exporter@{__version__}",
        # No PII: neither send_default_pii (deprecated, warns) nor data_collection is given, and
        # that is the SDK's no-PII default with its own event scrubber on; ours runs as well.
        include_local_variables=False, max_request_body_size="never",
        before_send=scrubber(secrets), before_breadcrumb=breadcrumb_scrubber(secrets),
        before_send_transaction=_drop,
        traces_sample_rate=0.0,
        # Our crashes reach Sentry once, through the scheduler's error hook; log lines are
        # breadcrumbs only (they are written secret-free, and the scrubber checks anyway).
        integrations=[LoggingIntegration(level=logging.INFO, event_level=None)])
    sentry_sdk.get_global_scope().set_client(client)
    return client


class SentrySink(Sink):
    """Alerts through one client. Closing the sink closes its client: a DSN removed from the
    config (or replaced) then gets nothing more, the daemon's own crashes included."""

    name = "sentry"

    def __init__(self, client: sentry_sdk.Client):
        self.client = client

    @property
    def destination(self) -> object:
        return self.client

    def send(self, alert: Alert) -> None:
        firing = alert.status == FIRING
        with sentry_sdk.new_scope() as scope:
            scope.set_client(self.client)  # this sink's DSN, even while a reload swaps them
            scope.fingerprint = ["inbox-exporter", alert.inbox, alert.category]
            scope.level = "error" if firing else "info"
            for tag in ("inbox", "provider", "step", "category", "reason", "status"):
                scope.set_tag(tag, getattr(alert, tag))
            scope.set_context("inbox_check", {
                "detail": alert.detail, "hint": alert.hint,
                "first_failure_at": alert.first_failure_at,
                "consecutive_failures": alert.consecutive_failures})
            text = summary(alert) + (f": {alert.hint}" if firing else " - resolved")
            scope.capture_message(text)
        self.client.flush(timeout=5)  # this worker's thread waits; the checks never do

    def close(self) -> None:
        scope = sentry_sdk.get_global_scope()
        if scope.client is self.client:
            scope.set_client(None)  # back to a client that records nothing
        self.client.close(timeout=2)  # sends what is queued, then stops the transport
