"""Webhook: one JSON document per transition (firing / resolved), for chat gateways."""

from __future__ import annotations

from dataclasses import asdict

from .alertmanager import summary
from .dispatch import Sink
from .httpjson import _origin, post_json
from .transitions import Alert


def document(alert: Alert, runbook_url: str | None, status_page_url: str | None) -> dict:
    return {"version": 1, "status": alert.status, "summary": summary(alert),
            "alert": asdict(alert), "runbook_url": runbook_url, "status_page_url": status_page_url}


class WebhookSink(Sink):
    def __init__(self, url: str, headers: dict[str, str], runbook_url: str | None = None,
                 status_page_url: str | None = None, index: int = 0):
        self.url, self._headers = url, headers
        self.name = f"webhook{index}"  # bounded: one per configured webhook, no URL in labels
        self.runbook_url, self.status_page_url = runbook_url, status_page_url

    @property
    def destination(self) -> object:
        return self.url

    def send(self, alert: Alert) -> None:
        post_json(self.url, document(alert, self.runbook_url, self.status_page_url), self._headers)

    def __repr__(self) -> str:
        return f"WebhookSink({_origin(self.url)})"  # headers hold tokens
