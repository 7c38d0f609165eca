"""Alertmanager (API v2): POST /api/v2/alerts, re-sent while firing, endsAt on recovery.

Alertmanager expects clients to re-send firing alerts periodically; each firing alert says
it ends at now + 3 x resend_interval, so if the exporter dies its alerts resolve by themselves
instead of firing forever. An alert's labels are its identity in Alertmanager: when the step
or reason of a firing alert changes, the old label set is ended and the new one sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from .dispatch import Sink
from .httpjson import post_json
from .transitions import FIRING, Alert

ALERTNAME = "InboxCheckFailing"


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def summary(alert: Alert) -> str:
    return f"Inbox {alert.inbox}: {alert.step} failed ({alert.category} / {alert.reason})"


class AlertmanagerSink(Sink):
    name = "alertmanager"

    def __init__(self, url: str, resend_interval: float, runbook_url: str | None = None,
                 status_page_url: str | None = None,
                 clock: Callable[[], float] = time.time,
                 headers: dict[str, str] | None = None):
        self.url = url.rstrip("/") + "/api/v2/alerts"
        self._headers = headers or {}  # Authorization from the URL's user:password
        self.tick_interval: float = resend_interval
        self.runbook_url, self.status_page_url = runbook_url, status_page_url
        self._clock = clock
        self._active: dict[tuple[str, str], tuple[dict, Alert]] = {}  # key -> (labels, alert)
        self._lock = threading.Lock()

    @property
    def destination(self) -> object:
        return self.url

    def adopt(self, previous: Sink) -> None:
        """Same Alertmanager after a reload: keep re-sending what fires there."""
        if isinstance(previous, AlertmanagerSink) and previous.url == self.url:
            with previous._lock:
                active = dict(previous._active)
            with self._lock:
                self._active.update(active)

    def labels(self, alert: Alert) -> dict[str, str]:
        return {"alertname": ALERTNAME, "inbox": alert.inbox, "category": alert.category,
                "reason": alert.reason, "step": alert.step, "provider": alert.provider,
                "severity": "critical"}

    def _item(self, labels: dict, alert: Alert, ends_at: float) -> dict:
        annotations = {
            "summary": summary(alert),
            "hint": alert.hint,
            "description": f"{alert.detail} (failing since {_rfc3339(alert.first_failure_at)}, "
                           f"{alert.consecutive_failures} checks in a row)",
        }
        if self.runbook_url:
            annotations["runbook_url"] = self.runbook_url
        item = {"labels": labels, "annotations": annotations,
                "startsAt": _rfc3339(alert.first_failure_at), "endsAt": _rfc3339(ends_at)}
        if self.status_page_url:
            item["generatorURL"] = self.status_page_url
        return item

    def send(self, alert: Alert) -> None:
        now = self._clock()
        labels = self.labels(alert)
        with self._lock:
            previous = self._active.get(alert.key)
            items = []
            if previous and previous[0] != labels:
                items.append(self._item(previous[0], previous[1], now))  # end the old identity
            if alert.status == FIRING:
                self._active[alert.key] = (labels, alert)
                items.append(self._item(labels, alert, now + 3 * self.tick_interval))
            else:
                self._active.pop(alert.key, None)
                items.append(self._item(labels, alert, alert.ends_at or now))
        post_json(self.url, items, self._headers)

    def tick(self) -> None:
        now = self._clock()
        with self._lock:
            items = [self._item(labels, alert, now + 3 * self.tick_interval)
                     for labels, alert in self._active.values()]
        if items:
            post_json(self.url, items, self._headers)
