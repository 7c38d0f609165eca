"""The latest state of every configured inbox: last result, counters, schedule (the history of
checks is history.py).

One lock guards it; readers get immutable snapshots. Results of inboxes no longer configured
(a check still in flight during a reload) are dropped, so removed inboxes leave no series.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .config import Inbox
from .model import Category, CheckResult, Reason

if TYPE_CHECKING:
    from .confirm import DeliveryResult


CREDENTIAL_CATEGORIES = frozenset({Category.UNAUTHORIZED, Category.APP_PASSWORD_REQUIRED})
# Backed off like credential failures: retrying at full pace only prolongs a rate limit.
BACKOFF_REASONS = frozenset({Reason.RATE_LIMITED})


@dataclass(frozen=True)
class InboxState:
    inbox: Inbox
    last: CheckResult | None = None
    last_success_at: float | None = None
    consecutive_failures: int = 0
    failures_total: Counter = field(default_factory=Counter)  # (Category, Reason) -> count
    next_run_at: float | None = None
    effective_interval: float | None = None  # longer than inbox.interval while backing off
    delivery: DeliveryResult | None = None  # the last confirmed (or failed) delivery
    last_test_email_at: float | None = None  # when the SMTP server last accepted a test email
    # The last failed check's transcript (zlib); the last check's is `last.transcript`.
    failure_transcript: bytes | None = None
    version: int = 0  # bumped on every change: lets renderers cache per inbox

    @property
    def interval(self) -> float:
        return self.effective_interval or self.inbox.interval


class Store:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, InboxState] = {}
        self._listeners: list[Callable[[InboxState | None, InboxState], None]] = []

    def on_record(self, listener: Callable[[InboxState | None, InboxState], None]) -> None:
        """`listener(previous, current)` after each recorded result (alerting hooks in here)."""
        self._listeners.append(listener)

    def sync(self, inboxes: Iterable[Inbox]) -> None:
        """Adopt a (re)loaded config: new inboxes appear, removed ones vanish, changed ones
        keep their history but start over on backoff."""
        with self._lock:
            new: dict[str, InboxState] = {}
            for inbox in inboxes:
                old = self._states.get(inbox.name)
                if old is None:
                    new[inbox.name] = InboxState(inbox)
                elif old.inbox != inbox:
                    new[inbox.name] = replace(old, inbox=inbox, effective_interval=None,
                                              version=old.version + 1)
                else:
                    new[inbox.name] = old
            self._states = new

    def record(self, result: CheckResult, inbox: Inbox,
               effective_interval: float | None = None) -> InboxState | None:
        """Record a finished check of `inbox` (the config it ran with)."""
        with self._lock:
            old = self._states.get(result.inbox)
            if old is None or old.inbox != inbox:
                return None  # removed or changed while the check ran
            counts = Counter(old.failures_total)
            for key in {(s.diagnosis.category, s.diagnosis.reason) for s in result.failures
                        if s.diagnosis is not None}:
                counts[key] += 1
            state = replace(
                old,
                last=result,
                last_success_at=result.started_at if result.ok else old.last_success_at,
                consecutive_failures=0 if result.ok else old.consecutive_failures + 1,
                failures_total=counts,
                effective_interval=effective_interval,
                last_test_email_at=result.sent_at or old.last_test_email_at,
                failure_transcript=(result.transcript if not result.ok
                                    else old.failure_transcript),
                version=old.version + 1,
            )
            self._states[result.inbox] = state
            listeners = list(self._listeners)
        for listener in listeners:
            listener(old, state)
        return state

    def record_delivery(self, result: DeliveryResult, inbox: Inbox) -> InboxState | None:
        with self._lock:
            old = self._states.get(result.inbox)
            if old is None or old.inbox != inbox:
                return None
            state = replace(old, delivery=result, version=old.version + 1)
            self._states[result.inbox] = state
            return state

    def set_next_run(self, name: str, at: float | None) -> None:
        with self._lock:
            old = self._states.get(name)
            if old is not None and old.next_run_at != at:
                self._states[name] = replace(old, next_run_at=at)

    def get(self, name: str) -> InboxState | None:
        with self._lock:
            return self._states.get(name)

    def snapshot(self) -> list[InboxState]:
        with self._lock:
            return list(self._states.values())
