"""Alerting: transitions, and each sink against a real Alertmanager or a local HTTP endpoint."""

from __future__ import annotations

import json
import threading
import time

import pytest
import sentry_sdk
from prometheus_client import CollectorRegistry, Counter

from inbox_exporter.alerts.alertmanager import AlertmanagerSink
from inbox_exporter.alerts.dispatch import Dispatcher
from inbox_exporter.alerts.pipeline import AlertPipeline
from inbox_exporter.alerts.transitions import FIRING, RESOLVED, Alert, Transitions
from inbox_exporter.config import parse_config
from inbox_exporter.model import Category, CheckResult, Diagnosis, Reason, Status, Step, StepResult

from .conftest import PASSWORD, check_now, env_name, lab_entry, wait_until, write_config
from .httpcapture import Capture

UNAUTHORIZED = (Category.UNAUTHORIZED, Reason.AUTH_FAILED, Step.IMAP_LOGIN)
REFUSED = (Category.IMAP_SETTINGS_INCORRECT, Reason.CONNECTION_REFUSED, Step.IMAP_CONNECT)
TIMEOUT = (Category.IMAP_SETTINGS_INCORRECT, Reason.CONNECTION_TIMEOUT, Step.IMAP_CONNECT)


def result(failure=None, t: float = 0.0, inbox: str = "sales") -> CheckResult:
    if failure is None:
        steps = (StepResult(Step.IMAP_CONNECT, Status.OK, 0.01),)
    else:
        category, reason, step = failure
        steps = (StepResult(step, Status.FAILED, 0.01,
                            Diagnosis(category, reason, f"hint for {reason}", "detail")),)
    return CheckResult(inbox, t, 0.1, steps, "id")


def feed(transitions: Transitions, sequence) -> list[list[tuple[str, str, str]]]:
    """The alerts sent after each check, as (status, category, reason)."""
    out = []
    for t, failure in enumerate(sequence):
        alerts = transitions.observe(result(failure, float(t)), "gmail")
        out.append([(a.status, a.category, a.reason) for a in alerts])
    return out


F, R = FIRING, RESOLVED


@pytest.mark.parametrize("name,sequence,expected", [
    ("one blip pages nobody", [UNAUTHORIZED, None], [[], []]),
    ("two failures fire, a success resolves", [UNAUTHORIZED, UNAUTHORIZED, None, None],
     [[], [(F, "unauthorized", "auth_failed")], [(R, "unauthorized", "auth_failed")], []]),
    ("flapping never pages", [UNAUTHORIZED, None] * 4, [[]] * 8),
    ("mixed categories still count as failures", [REFUSED, UNAUTHORIZED],
     [[], [(F, "unauthorized", "auth_failed")]]),
    ("a new category that holds replaces the alert",
     [REFUSED, REFUSED, UNAUTHORIZED, UNAUTHORIZED],
     [[], [(F, "imap_settings_incorrect", "connection_refused")], [],
      [(R, "imap_settings_incorrect", "connection_refused"), (F, "unauthorized", "auth_failed")]]),
    ("alternating categories while failing do not spam",
     [REFUSED, REFUSED, UNAUTHORIZED, REFUSED, UNAUTHORIZED, REFUSED],
     [[], [(F, "imap_settings_incorrect", "connection_refused")], [], [], [], []]),
    ("a new reason in the same category updates the alert",
     [REFUSED, REFUSED, TIMEOUT, TIMEOUT],
     [[], [(F, "imap_settings_incorrect", "connection_refused")],
      [(F, "imap_settings_incorrect", "connection_timeout")], []]),
])
def test_transitions(name, sequence, expected):
    assert feed(Transitions(failure_threshold=2, recovery_threshold=1), sequence) == expected


def test_recovery_threshold_and_first_failure_time():
    t = Transitions(failure_threshold=3, recovery_threshold=2)
    sent = [t.observe(result(f, float(i)), "other") for i, f in
            enumerate([UNAUTHORIZED, UNAUTHORIZED, UNAUTHORIZED, None, UNAUTHORIZED, None, None])]
    fired = sent[2][0]
    assert fired.status == FIRING and fired.first_failure_at == 0.0
    assert fired.consecutive_failures == 3
    assert sent[3] == [] and sent[4] == [] and sent[5] == []  # one success is not recovery
    assert [a.status for a in sent[6]] == [RESOLVED]
    assert t.forget("sales", 99.0) == []  # nothing firing any more


def alert(status=FIRING, reason="auth_failed", inbox="sales") -> Alert:
    return Alert(inbox=inbox, provider="gmail", step="imap_login", category="unauthorized",
                 reason=reason, hint="Confirm the password.", detail="NO [AUTHENTICATIONFAILED]",
                 first_failure_at=time.time() - 60, consecutive_failures=2, status=status,
                 ends_at=time.time() if status == RESOLVED else None)


def test_alertmanager_receives_the_alert_keeps_it_while_resent_and_ends_it(alertmanager):
    sink = AlertmanagerSink(alertmanager.url, resend_interval=1.0,
                            runbook_url="https://runbooks.example/inbox")
    inbox = f"am-{time.monotonic_ns()}"
    sink.send(alert(inbox=inbox))
    got = wait_until(lambda: alertmanager.alerts(inbox=inbox))
    assert len(got) == 1
    a = got[0]
    assert a["labels"] == {"alertname": "InboxCheckFailing", "inbox": inbox,
                           "category": "unauthorized", "reason": "auth_failed",
                           "step": "imap_login", "provider": "gmail", "severity": "critical"}
    assert a["annotations"]["hint"] == "Confirm the password."
    assert a["annotations"]["runbook_url"] == "https://runbooks.example/inbox"
    assert inbox in a["annotations"]["summary"]
    # A new reason is a new identity for Alertmanager: the old label set is ended.
    sink.send(alert(inbox=inbox, reason="app_password_required"))
    assert wait_until(lambda: [x["labels"]["reason"] for x in alertmanager.alerts(inbox=inbox)]
                == ["app_password_required"])
    time.sleep(3.5)  # past the first endsAt (now + 3 x 1 s): only re-sending keeps it alive
    sink.tick()
    assert len(alertmanager.alerts(inbox=inbox)) == 1
    sink.send(alert(inbox=inbox, status=RESOLVED, reason="app_password_required"))
    assert wait_until(lambda: not alertmanager.alerts(inbox=inbox))


def counter() -> Counter:
    return Counter("sent", "", ["sink", "result"], registry=CollectorRegistry())


def test_a_permanent_error_is_not_retried_and_a_transient_one_is():
    sent = counter()
    with Capture(status=400) as bad, Capture(status=503) as flaky:
        sinks = [AlertmanagerSink(bad.url, 60), AlertmanagerSink(flaky.url, 60)]
        sinks[0].name, sinks[1].name = "bad", "flaky"
        d = Dispatcher(sinks, sent, backoff=0.05, attempts=3)
        d.submit([alert()])
        flaky.wait_for(3)
        time.sleep(0.3)
        d.stop()
        assert len(bad.requests) == 1 and len(flaky.requests) == 3
    assert sent.labels("bad", "failure")._value.get() == 1
    assert sent.labels("flaky", "failure")._value.get() == 1


def test_a_full_queue_drops_instead_of_blocking():
    sent = counter()
    with Capture(hang=True) as hung:
        sink = AlertmanagerSink(hung.url, 60)
        d = Dispatcher([sink], sent, queue_size=2)
        t0 = time.monotonic()
        d.submit([alert(inbox=f"i{n}") for n in range(10)])
        assert time.monotonic() - t0 < 0.1
        assert sent.labels("alertmanager", "dropped")._value.get() >= 7
        d.stop(timeout=0.5)


def pipeline_config(tmp_path, alerting: dict, env: dict):
    text = json.dumps({"alerting": alerting, "inboxes": [
        {"name": "x", "email": "x@example.test", "password": PASSWORD, "provider": "gmail"}]})
    return parse_config(text, "test.yaml", env)


def test_webhooks_get_one_document_per_transition_with_their_secret_headers(tmp_path):
    with Capture() as hook:
        config = pipeline_config(tmp_path, {"failure_threshold": 1, "webhooks": [
            {"url": hook.url + "/hook", "headers_env": {"Authorization": "HOOK_TOKEN"}}]},
            {"HOOK_TOKEN": "Bearer hook-secret"})
        p = AlertPipeline(config.alerting, counter(), lambda: [])
        for failure in (UNAUTHORIZED, None):
            p.observe(result(failure, inbox="x"), "gmail")
        requests = hook.wait_for(2)
        p.stop()
    assert [json.loads(r["body"])["status"] for r in requests] == ["firing", "resolved"]
    assert all(r["headers"]["Authorization"] == "Bearer hook-secret" for r in requests)
    doc = json.loads(requests[0]["body"])
    assert doc["alert"]["category"] == "unauthorized" and doc["alert"]["hint"]


@pytest.fixture
def sentry_endpoint():
    with Capture() as endpoint:
        yield endpoint
    sentry_sdk.init()  # back to no DSN: later tests send nothing anywhere


def envelopes(endpoint: Capture) -> list[dict]:
    """The event items of every envelope the SDK posted."""
    events = []
    for r in endpoint.requests:
        lines = r["body"].split("\n")
        for header, payload in zip(lines[1::2], lines[2::2], strict=False):
            if json.loads(header).get("type") == "event":
                events.append(json.loads(payload))
    return events


def test_sentry_gets_one_issue_per_inbox_and_category_and_never_a_secret(tmp_path, sentry_endpoint):
    dsn = f"http://publickey@127.0.0.1:{sentry_endpoint.server_address[1]}/42"
    config = pipeline_config(tmp_path, {"failure_threshold": 1, "sentry": {"dsn_env": "DSN"}},
                             {"DSN": dsn})
    p = AlertPipeline(config.alerting, counter(),
                      lambda: [s for i in config.inboxes for s in i.secrets()])
    for failure in (UNAUTHORIZED, None):
        p.observe(result(failure, inbox="x"), "gmail")
    # The daemon's own bug, with a secret in its message: scrubbed before it leaves.
    sentry_sdk.capture_exception(RuntimeError(f"bug while handling {PASSWORD}"))
    sentry_sdk.flush(5)
    events = wait_until(lambda: len(envelopes(sentry_endpoint)) >= 3 and envelopes(sentry_endpoint))
    p.stop()
    assert all(r["path"] == "/api/42/envelope/" for r in sentry_endpoint.requests)
    firing, resolved = [e for e in events if e.get("fingerprint")]
    assert firing["fingerprint"] == resolved["fingerprint"] == ["inbox-exporter", "x", "unauthorized"]
    assert firing["level"] == "error" and resolved["level"] == "info"
    for tag, value in {"inbox": "x", "provider": "gmail", "step": "imap_login",
                       "category": "unauthorized", "reason": "auth_failed"}.items():
        assert firing["tags"][tag] == value
    assert "hint for auth_failed" in firing["message"]
    raw = "".join(r["body"] for r in sentry_endpoint.requests)
    assert "bug while handling <redacted>" in raw
    assert PASSWORD not in raw


def test_a_sink_that_hangs_or_fails_never_delays_a_check(tmp_path, lab):
    with Capture(hang=True) as hung, Capture(status=500) as broken:
        config = write_config(tmp_path, lab, [{**lab_entry(lab, "bad"), "interval": "1h"}],
                              alerting={"failure_threshold": 1,
                                        "alertmanager": {"url": hung.url, "resend_interval": "1s"},
                                        "webhooks": [{"url": broken.url}]})
        from inbox_exporter.daemon import Exporter

        exporter = Exporter(str(config), environ={env_name("bad"): "wrong-password"})
        exporter.start()
        try:
            durations = []
            for _ in range(4):
                t0 = time.monotonic()
                check_now(exporter, "bad")
                durations.append(time.monotonic() - t0)
            assert max(durations) < 1.0, durations  # a check on the lab takes ~50 ms
            assert hung.wait_for(1) and broken.wait_for(2)
        finally:
            t0 = time.monotonic()
            exporter.stop(grace=5)
            assert time.monotonic() - t0 < 10


def test_the_status_page_link_and_runbook_reach_the_webhook(tmp_path):
    with Capture() as hook:
        config = pipeline_config(tmp_path, {
            "failure_threshold": 1, "runbook_url": "https://runbooks.example/x",
            "status_page_url": "https://inbox-exporter.example/", "webhooks": [{"url": hook.url}]}, {})
        p = AlertPipeline(config.alerting, counter(), lambda: [])
        p.observe(result(UNAUTHORIZED, inbox="x"), "gmail")
        doc = json.loads(hook.wait_for(1)[0]["body"])
        p.stop()
    assert doc["runbook_url"] == "https://runbooks.example/x"
    assert doc["status_page_url"] == "https://inbox-exporter.example/"


def test_alerting_config_errors_name_the_path(tmp_path):
    from inbox_exporter.config import ConfigError

    with pytest.raises(ConfigError) as e:
        pipeline_config(tmp_path, {"webhooks": [{"url": "hooks.example.com/x"}]}, {})
    assert str(e.value) == "test.yaml: alerting.webhooks[0].url: not an http(s) URL: 'hooks.example.com/x'"
    # URLs that may hold a password: one line naming the key, never the URL or its password
    for url, says in [("u:pw3SECRET@am.example:9093", "not an http(s) URL"),
                      ("http://u:pw3SECRET@[::1/", "not a valid URL (a password in it must be"),
                      ("http://u:pa/ss2SECRET@127.0.0.1/", "not a valid URL (a password in it"),
                      ("http://u:12/34SECRET@hooks.example/", "an @ after the host"),
                      ("https://hooks.example:99999/", "not a valid URL: 'https://hooks")]:
        with pytest.raises(ConfigError) as e:
            pipeline_config(tmp_path, {"webhooks": [{"url": url}]}, {})
        assert str(e.value).startswith(f"test.yaml: alerting.webhooks[0].url: {says}"), url
        assert "SECRET" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        pipeline_config(tmp_path, {"sentry": {"dsn_env": "NOPE"}}, {})
    assert str(e.value) == "test.yaml: alerting.sentry.dsn_env: environment variable NOPE is not set"


# --- reloads (issue #10 §4) ----------------------------------------------------------------

def hook_config(tmp_path, url: str, **alerting):
    """An alerting section with one webhook whose Authorization comes from HOOK_TOKEN."""
    env = {"HOOK_TOKEN": alerting.pop("token", "Bearer old")}
    return pipeline_config(tmp_path, {"failure_threshold": 1, "webhooks": [
        {"url": url, "headers_env": {"Authorization": "HOOK_TOKEN"}}], **alerting}, env)


def test_a_resolved_still_waiting_for_its_sink_is_delivered_after_a_reload(tmp_path):
    with Capture(status=503) as hook:  # the chat gateway is down for a while
        p = AlertPipeline(hook_config(tmp_path, hook.url).alerting, counter(), lambda: [])
        try:
            p.observe(result(UNAUTHORIZED, inbox="x"), "gmail")
            p.observe(result(None, inbox="x"), "gmail")  # recovered: "resolved" waits in line
            hook.wait_for(1)  # the firing alert's first attempt failed; a retry is pending
            # The reload rotates the webhook token and changes a threshold.
            p.configure(hook_config(tmp_path, hook.url, token="Bearer new",
                                    recovery_threshold=2).alerting)
            hook.status = 200  # the gateway is back
            delivered = wait_until(lambda: [r for r in hook.requests
                                            if r["headers"]["Authorization"] == "Bearer new"][1:],
                                   15, "the firing and resolved documents after the reload")
        finally:
            p.stop()
    docs = [json.loads(r["body"]) for r in hook.requests
            if r["headers"]["Authorization"] == "Bearer new"]
    assert [d["status"] for d in docs] == ["firing", "resolved"]
    assert delivered and "Bearer old" not in {r["headers"]["Authorization"] for r in delivered}


def test_a_reload_hands_firing_alerts_to_a_new_sink_only(tmp_path):
    with Capture() as kept, Capture() as added:
        p = AlertPipeline(hook_config(tmp_path, kept.url).alerting, counter(), lambda: [])
        try:
            p.observe(result(UNAUTHORIZED, inbox="x"), "gmail")
            kept.wait_for(1)
            both = pipeline_config(tmp_path, {"failure_threshold": 3, "webhooks": [
                {"url": kept.url, "headers_env": {"Authorization": "HOOK_TOKEN"}},
                {"url": added.url}]}, {"HOOK_TOKEN": "Bearer old"})
            p.configure(both.alerting)
            assert json.loads(added.wait_for(1)[0]["body"])["status"] == "firing"
            p.observe(result(None, inbox="x"), "gmail")
            wait_until(lambda: len(kept.requests) >= 2 and len(added.requests) >= 2)
        finally:
            p.stop()
    # the kept webhook was not paged twice for the same failure
    assert [d["status"] for d in kept.json_bodies()] == ["firing", "resolved"]
    assert [d["status"] for d in added.json_bodies()] == ["firing", "resolved"]


def test_sinks_removed_by_a_reload_are_shut_down_and_the_sentry_client_closed(
        tmp_path, sentry_endpoint, alertmanager):
    inbox = f"removed-{time.monotonic_ns()}"
    dsn = f"http://publickey@127.0.0.1:{sentry_endpoint.server_address[1]}/42"
    with Capture() as hook:
        before = set(threading.enumerate())
        full = pipeline_config(tmp_path, {
            "failure_threshold": 1, "sentry": {"dsn_env": "DSN"},
            "alertmanager": {"url": alertmanager.url, "resend_interval": "1s"},
            "webhooks": [{"url": hook.url}]}, {"DSN": dsn})
        p = AlertPipeline(full.alerting, counter(), lambda: [])
        try:
            workers = [t for t in set(threading.enumerate()) - before if t.name.startswith("alerts-")]
            assert sorted(t.name for t in workers) == ["alerts-alertmanager", "alerts-sentry",
                                                       "alerts-webhook0"]
            client = sentry_sdk.get_client()
            assert client.is_active() and client.dsn == dsn
            p.observe(result(UNAUTHORIZED, inbox=inbox), "gmail")
            wait_until(lambda: alertmanager.alerts(inbox=inbox), what="the alert in Alertmanager")
            wait_until(lambda: hook.requests and envelopes(sentry_endpoint), what="webhook and Sentry")

            p.configure(pipeline_config(tmp_path, {"failure_threshold": 1}, {}).alerting)

            wait_until(lambda: not any(t.is_alive() for t in workers), what="the workers to stop")
            assert client.transport is None  # closed: the SDK's sending thread is gone
            assert not sentry_sdk.get_client().is_active()
            sentry_sdk.capture_message("a crash after the DSN was removed")
            sentry_sdk.flush(2)
            assert "after the DSN was removed" not in "".join(r["body"] for r in sentry_endpoint.requests)
            # No more re-sending: the alert's endsAt (now + 3 x 1 s) passes in Alertmanager.
            wait_until(lambda: not alertmanager.alerts(inbox=inbox), 15,
                       "the alert to expire in Alertmanager")
            p.observe(result(None, inbox=inbox), "gmail")  # resolves; no sink is left to tell
            assert len(hook.requests) == 1
        finally:
            p.stop()


def test_a_changed_sentry_dsn_closes_the_old_client_and_hands_the_firing_alert_over(tmp_path):
    with Capture() as old, Capture() as new:
        def cfg(endpoint, **extra):
            dsn = f"http://publickey@127.0.0.1:{endpoint.server_address[1]}/7"
            return pipeline_config(tmp_path, {"failure_threshold": 1,
                                              "sentry": {"dsn_env": "DSN"}, **extra},
                                   {"DSN": dsn}).alerting

        p = AlertPipeline(cfg(old), counter(), lambda: [])
        try:
            p.observe(result(UNAUTHORIZED, inbox="x"), "gmail")
            wait_until(lambda: envelopes(old), what="the alert at the old DSN")
            first = sentry_sdk.get_client()
            p.configure(cfg(old, recovery_threshold=1, runbook_url="https://runbooks.example/x"))
            assert sentry_sdk.get_client() is first  # same DSN: same client, nothing re-sent
            p.configure(cfg(new))
            wait_until(lambda: first.transport is None, what="the old client to close")
            moved = wait_until(lambda: envelopes(new), what="the firing alert at the new DSN")
            assert moved[0]["level"] == "error" and moved[0]["tags"]["inbox"] == "x"
            assert len(envelopes(old)) == 1
        finally:
            p.stop()
            sentry_sdk.init()


def test_the_sentry_client_collects_no_personal_data_and_uses_no_deprecated_option():
    import warnings

    from inbox_exporter.alerts.sentry import init

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated option would raise here
        client = init("http://publickey@127.0.0.1:9/7", "test", lambda: [])
    try:
        assert client.options["data_collection"]["user_info"] is False
        assert client.options["include_local_variables"] is False
        assert client.options["event_scrubber"] is not None
    finally:
        client.close()
        sentry_sdk.init()
