"""Every metric the exporter exposes, named in one place.

Per-inbox series are rendered from the store straight into the Prometheus text format and
cached per inbox until that inbox's state changes: with 10,000 inboxes (~40 series each)
building metric-family objects at every scrape would take seconds; joining cached text takes
milliseconds. Removed inboxes vanish with their store entry. Aggregates and the exporter's own
metrics live in an injected prometheus_client registry.

A step's state is one series, `inbox_step_success`: 1 ok, 0 failed, NaN when skipped (or
before the first check), so a skipped step reads neither as a success nor as a new failure:
`== 0` and `== 1` are both false for NaN (see docs/metrics.md). A one-hot status series per
state would triple the largest family: 400,000 series at 10,000 inboxes instead of 230,000.
"""

from __future__ import annotations

import math
import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.exposition import generate_latest

from . import __version__
from .model import ALL_STEPS, CheckResult, Status
from .oauth.tokens import OUTCOMES
from .store import InboxState

disable_created_metrics()  # *_created series double the counters and say nothing useful here

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Loopback checks take milliseconds; real providers up to the 15 s default timeout.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30)

# name -> (type, help). The order is the exposition order.
INBOX_FAMILIES: dict[str, tuple[str, str]] = {
    "inbox_info": ("gauge", "Configured inbox (value 1); labels describe it."),
    "inbox_check_success": ("gauge", (
        "1 if the last completed check passed every step that ran, 0 if not; NaN before the first check.")),
    "inbox_check_duration_seconds": ("gauge", "Wall time of the last completed check."),
    "inbox_check_interval_seconds": ("gauge", (
        "Current interval between checks (longer while backing off after credential failures).")),
    "inbox_last_check_timestamp_seconds": ("gauge", "Unix time the last completed check started."),
    "inbox_last_success_timestamp_seconds": ("gauge", "Unix time the last successful check started."),
    "inbox_consecutive_failures": ("gauge", "Failed checks in a row (0 after a success)."),
    "inbox_step_success": ("gauge", (
        "1 if the step passed in the last check, 0 if it failed, NaN if it was skipped or has not run.")),
    "inbox_step_duration_seconds": ("gauge", "Wall time of the step in the last check; NaN if skipped."),
    "inbox_failure_info": ("gauge", (
        "The current failure of a step (value 1), with its category and reason; absent when the step is "
        "not failing.")),
    "inbox_check_failures_total": ("counter", "Failed checks, by category and reason of their failures."),
    "inbox_tls_certificate_expiry_timestamp_seconds": ("gauge", (
        "Unix time the server certificate seen in the last check expires.")),
    "inbox_test_email_last_sent_timestamp_seconds": ("gauge", (
        "Unix time the SMTP server last accepted this inbox's test email (sent at most every "
        "test_email.interval).")),
    "inbox_delivery_success": ("gauge", (
        "1 if the last test email was found in the watched mailbox's folders in time, 0 if not (timeout, "
        "Junk, watcher error); NaN until the first confirmation. Only for inboxes with `delivery`.")),
    "inbox_delivery_duration_seconds": ("gauge", (
        "Time from the SMTP server accepting the last test email to finding it.")),
    "inbox_delivery_auth_result": ("gauge", (
        "1, with the receiving server's SPF, DKIM or DMARC result for the last test email found "
        "(Authentication-Results); one series per method. Only for inboxes with `delivery`.")),
    "inbox_tls_certificate_trusted": ("gauge", (
        "1 if the server certificate seen in the last check was verified, 0 if not (or verification was "
        "disabled).")),
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NaN"
    if isinstance(value, bool):
        return "1" if value else "0"
    return repr(float(value)) if isinstance(value, float) else str(value)


def render_inbox(state: InboxState, expose_email: bool = False) -> dict[str, str]:
    """This inbox's samples, as text, per family."""
    inbox = state.inbox
    name = _escape(inbox.name)
    lines: dict[str, list[str]] = {f: [] for f in INBOX_FAMILIES}

    def add(family: str, value: float | bool | None, **labels: str) -> None:
        extra = "".join(f',{k}="{_escape(str(v))}"' for k, v in labels.items())
        lines[family].append(f'{family}{{inbox="{name}"{extra}}} {_num(value)}\n')

    info = {"provider": inbox.provider, "imap_host": inbox.imap.host, "smtp_host": inbox.smtp.host,
            "auth": "oauth2" if inbox.oauth else "password"}
    if expose_email:
        info["email"] = inbox.email
    add("inbox_info", 1, **info)
    last: CheckResult | None = state.last
    add("inbox_check_success", None if last is None else last.ok)
    add("inbox_check_duration_seconds", None if last is None else last.duration_seconds)
    add("inbox_check_interval_seconds", state.interval)
    add("inbox_last_check_timestamp_seconds", None if last is None else last.started_at)
    add("inbox_last_success_timestamp_seconds", state.last_success_at)
    add("inbox_consecutive_failures", state.consecutive_failures)
    steps = {s.step: s for s in last.steps} if last else {}
    for step in ALL_STEPS:
        result = steps.get(step)
        ran = result if result is not None and result.status is not Status.SKIPPED else None
        add("inbox_step_success", ran.status is Status.OK if ran else None, step=step.value)
        add("inbox_step_duration_seconds", ran.duration_seconds if ran else None,
            step=step.value)
        if result is not None and result.diagnosis is not None:
            add("inbox_failure_info", 1, step=step.value, category=result.diagnosis.category.value,
                reason=result.diagnosis.reason.value)
    if inbox.test_email_to:
        add("inbox_test_email_last_sent_timestamp_seconds", state.last_test_email_at)
    for (category, reason), count in sorted(state.failures_total.items()):
        add("inbox_check_failures_total", count, category=category.value, reason=reason.value)
    if inbox.delivery is not None:
        found = state.delivery
        add("inbox_delivery_success", None if found is None else found.step.status is Status.OK)
        add("inbox_delivery_duration_seconds", None if found is None else found.step.duration_seconds)
        if found is not None and found.verdict is not None:
            for method, outcome in found.verdict.results.items():
                add("inbox_delivery_auth_result", 1, method=method, result=outcome)
        if found is not None and found.step.diagnosis is not None:
            d = found.step.diagnosis
            add("inbox_failure_info", 1, step=found.step.step.value, category=d.category.value,
                reason=d.reason.value)
    for cert in (last.certificates if last else ()):
        if cert.not_after is not None:
            add("inbox_tls_certificate_expiry_timestamp_seconds", cert.not_after,
                protocol=cert.protocol.value)
        add("inbox_tls_certificate_trusted", cert.trusted, protocol=cert.protocol.value)
    return {f: "".join(v) for f, v in lines.items()}


class ExporterMetrics:
    """Aggregates and the exporter's own metrics, in an injected registry."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        Info("inbox_exporter_build", "Build information.", registry=registry).info(
            {"version": __version__, "python_version": platform.python_version()})
        self.step_latency = Histogram(
            "inbox_step_latency_seconds", "Step latency over all inboxes, by provider.",
            ["step", "provider"], buckets=LATENCY_BUCKETS, registry=registry)
        self.reload_success = Gauge(
            "inbox_exporter_config_last_reload_successful",
            "1 if the last configuration (re)load succeeded.", registry=registry)
        self.reload_timestamp = Gauge(
            "inbox_exporter_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration (re)load.", registry=registry)
        self.inboxes = Gauge("inbox_exporter_inboxes", "Inboxes configured (on this shard).",
                             registry=registry)
        self.in_flight = Gauge("inbox_exporter_checks_in_flight",
                               "Checks started and not yet ended (queued for a slot or running).",
                               registry=registry)
        self.waiting = Gauge(
            "inbox_exporter_connections_waiting",
            "Connections (a check's IMAP or SMTP leg) queued for a slot: their server is at "
            "checks.max_connections_per_host or their account is in use. Holds no worker.",
            registry=registry)
        self.connections = Gauge(
            "inbox_exporter_connections_active",
            "Connections open to mail servers now (each holds one worker).", registry=registry)
        self.skipped = Counter(
            "inbox_exporter_checks_skipped",
            "Scheduled checks not started because the previous check of the inbox was still "
            "queued or running.",
            registry=registry)
        self.lag = Histogram(
            "inbox_exporter_scheduling_lag_seconds",
            "Delay between a check's scheduled time and its start.",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60), registry=registry)
        self.checks = Counter("inbox_exporter_checks", "Checks completed.", registry=registry)
        self.delivery_latency = Histogram(
            "inbox_delivery_latency_seconds",
            "Time from the SMTP server accepting a test email to finding it, by provider.",
            ["provider"], buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=registry)
        self.alerts_sent = Counter(
            "inbox_exporter_alerts_sent", "Alert notifications by sink and result "
            "(success, failure after retries or a permanent error, dropped from a full queue).",
            ["sink", "result"], registry=registry)
        self.oauth_token_requests = Counter(
            "inbox_exporter_oauth_token_requests", "Requests to OAuth token endpoints by result "
            "(ok, invalid_grant, invalid_client, unavailable): one per token lifetime and "
            "account, not one per check.", ["result"], registry=registry)
        for outcome in OUTCOMES:
            self.oauth_token_requests.labels(outcome)
        self.alerts_firing = Gauge("inbox_exporter_alerts_firing",
                                   "Inboxes with an alert firing now.", registry=registry)

    def observe_delivery(self, seconds: float, provider: str) -> None:
        self.delivery_latency.labels(provider).observe(seconds)

    def observe(self, result: CheckResult, provider: str) -> None:
        self.checks.inc()
        for s in result.steps:
            if s.status is not Status.SKIPPED:
                self.step_latency.labels(s.step.value, provider).observe(s.duration_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
