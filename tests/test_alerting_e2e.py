"""The real path: the daemon against the lab, scraped by a real Prometheus loaded with the
shipped rules, both alerting a real Alertmanager. Breaking an inbox on the server side makes
both alerts appear there; fixing it resolves both."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from inbox_exporter.daemon import Exporter
from inbox_exporter.web import WebServer
from maillab.promstack import Prometheus

from .conftest import env_name, lab_entry, wait_until, write_config

ROOT = Path(__file__).parent.parent
RULES = ROOT / "deploy" / "prometheus" / "inbox-exporter.rules.yml"


def fast_rules(tmp_path: Path) -> Path:
    """The shipped rules with every `for:` cut to 2 s: the test checks at 1 s intervals."""
    text = re.sub(r"(?m)^(\s+)for: \S+$", r"\1for: 2s", RULES.read_text())
    path = tmp_path / "rules.yml"
    path.write_text(text)
    return path


@pytest.fixture
def stack(tmp_path, lab, alertmanager):
    if "e2e" not in lab.users:
        lab.add_user("e2e", "e2e-password")
    lab.set_password("e2e", "e2e-password")
    config = write_config(tmp_path, lab, [{**lab_entry(lab, "e2e", "e2e"), "interval": "1s"}],
                          alerting={"failure_threshold": 2, "alertmanager": {
                              "url": alertmanager.url, "resend_interval": "1s"}})
    exporter = Exporter(str(config), environ={env_name("e2e"): "e2e-password"})
    server = WebServer(("127.0.0.1", 0), exporter)
    exporter.start()
    server.start()
    target = f"127.0.0.1:{server.server_address[1]}"
    with Prometheus(tmp_path, [target], [fast_rules(tmp_path)], alertmanager.url) as prom:
        yield exporter, prom, alertmanager
    exporter.stop(5)
    server.stop()


def test_a_broken_inbox_alerts_from_the_daemon_and_from_prometheus_and_fixing_it_resolves_both(stack, lab):
    exporter, prom, am = stack
    wait_until(lambda: prom.query('inbox_check_success{inbox="e2e"} == 1'), 30,
               "Prometheus to scrape a healthy inbox")
    assert not am.alerts(inbox="e2e")

    lab.set_password("e2e", "rotated-by-it")  # the IT team rotates the password
    broken_at = time.monotonic()
    ours = wait_until(lambda: [a for a in am.alerts(inbox="e2e") if "job" not in a["labels"]],
                      30, "the daemon's alert in Alertmanager")
    ours_after = time.monotonic() - broken_at
    # Prometheus alerts per failing step (IMAP and SMTP login both fail): find the IMAP one.
    theirs = wait_until(lambda: [a for a in am.alerts(inbox="e2e", step="imap_login")
                                 if "job" in a["labels"]],
                        60, "the Prometheus rule's alert in Alertmanager")
    assert ours[0]["labels"]["alertname"] == theirs[0]["labels"]["alertname"] == "InboxCheckFailing"
    for alert in (ours[0], theirs[0]):
        assert (alert["labels"]["category"], alert["labels"]["reason"]) == ("unauthorized", "auth_failed")
        assert alert["labels"]["step"] == "imap_login"
        assert "credentials" in alert["annotations"]["hint"]
    # failure_threshold (2) x interval (1 s) + one step timeout (3 s), plus delivery slack
    assert ours_after < 2 * 1 + 3 + 2, ours_after

    lab.set_password("e2e", "e2e-password")  # fixed
    wait_until(lambda: not am.alerts(inbox="e2e"), 60, "both alerts to resolve")
    assert exporter.metrics.alerts_sent.labels("alertmanager", "success")._value.get() >= 2
