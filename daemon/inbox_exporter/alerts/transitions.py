"""Per inbox, a small state machine fed by check results: ok <-> failing, one alert at a time.

The rules (also in docs/alerting.md):
- ok -> failing after `failure_threshold` consecutive failed checks (any categories): one blip
  pages nobody. The alert carries the category of the latest failure.
- failing -> ok after `recovery_threshold` consecutive successful checks: the alert resolves.
- While failing, a different category replaces the alert (the old one resolves, a new one
  fires) once that category has held for `failure_threshold` checks in a row: a server that
  alternates between two errors does not page on every check.
- A flapping inbox (fail, ok, fail, ok) never reaches the threshold and pages nobody; it shows
  in inbox_check_failures_total and the Prometheus rules' ratios instead.
- Step, reason, hint and detail may change while the category holds: the alert is updated
  (re-sent), not replaced.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

from ..model import CheckResult, StepResult

FIRING, RESOLVED = "firing", "resolved"


@dataclass(frozen=True)
class Alert:
    inbox: str
    provider: str
    step: str
    category: str
    reason: str
    hint: str
    detail: str  # redacted
    first_failure_at: float  # when the failure streak began (Unix time)
    consecutive_failures: int
    status: str = FIRING
    ends_at: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        """One alert per inbox and category (the Sentry fingerprint too)."""
        return (self.inbox, self.category)


@dataclass
class _Inbox:
    alert: Alert | None = None
    failures: int = 0  # consecutive failed checks
    successes: int = 0  # consecutive successful checks
    streak_category: str | None = None
    streak_len: int = 0  # consecutive failures with streak_category
    streak_start: float = 0.0
    failing_since: float = 0.0  # start of the first check of the current failure run


def _primary(result: CheckResult) -> StepResult:
    """The failure an alert is about: the first failed step (IMAP before SMTP)."""
    return result.failures[0]


class Transitions:
    def __init__(self, failure_threshold: int = 2, recovery_threshold: int = 1):
        self.failure_threshold = failure_threshold
        self.recovery_threshold = recovery_threshold
        self._inboxes: dict[str, _Inbox] = {}
        self._lock = threading.Lock()

    def observe(self, result: CheckResult, provider: str) -> list[Alert]:
        """Feed one finished check; returns the alerts to send (firing and/or resolved)."""
        with self._lock:
            st = self._inboxes.setdefault(result.inbox, _Inbox())
            if result.ok:
                return self._success(st, result)
            return self._failure(st, result, provider)

    def _success(self, st: _Inbox, result: CheckResult) -> list[Alert]:
        st.failures, st.streak_len, st.streak_category = 0, 0, None
        st.successes += 1
        if st.alert is not None and st.successes >= self.recovery_threshold:
            resolved = replace(st.alert, status=RESOLVED, ends_at=result.started_at)
            st.alert = None
            return [resolved]
        return []

    def _failure(self, st: _Inbox, result: CheckResult, provider: str) -> list[Alert]:
        st.successes = 0
        st.failures += 1
        if st.failures == 1:
            st.failing_since = result.started_at
        failed = _primary(result)
        d = failed.diagnosis
        assert d is not None
        if d.category.value == st.streak_category:
            st.streak_len += 1
        else:
            st.streak_category, st.streak_len, st.streak_start = (d.category.value, 1,
                                                                   result.started_at)
        alert = Alert(inbox=result.inbox, provider=provider, step=failed.step.value,
                      category=d.category.value, reason=d.reason.value, hint=d.hint,
                      detail=d.detail, consecutive_failures=st.failures,
                      first_failure_at=st.failing_since)
        current = st.alert
        if current is None:
            if st.failures < self.failure_threshold:
                return []
            st.alert = alert
            return [alert]
        if alert.category == current.category:
            st.alert = replace(alert, first_failure_at=current.first_failure_at)
            changed = (alert.step, alert.reason) != (current.step, current.reason)
            return [st.alert] if changed else []
        if st.streak_len < self.failure_threshold:
            return []  # a new category must hold before it replaces the alert
        st.alert = replace(alert, first_failure_at=st.streak_start)
        return [replace(current, status=RESOLVED, ends_at=result.started_at), st.alert]

    def forget(self, inbox: str, now: float) -> list[Alert]:
        """The inbox left the config: its alert resolves."""
        with self._lock:
            st = self._inboxes.pop(inbox, None)
        if st is None or st.alert is None:
            return []
        return [replace(st.alert, status=RESOLVED, ends_at=now)]

    def firing(self) -> list[Alert]:
        with self._lock:
            return [st.alert for st in self._inboxes.values() if st.alert is not None]

