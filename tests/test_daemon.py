"""The exporter against the real lab: metrics for each scenario, reload, backoff, caps, shutdown."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from inbox_exporter.daemon import Exporter
from inbox_exporter.web import WebOptions, WebServer

from .conftest import PASSWORD, check_now, env_name, lab_entry, wait_until, write_config

ROOT = Path(__file__).parent.parent


@dataclass
class Running:
    exporter: Exporter
    server: WebServer
    config: Path
    env: dict[str, str]  # the exporter's environment: add passwords before a reload

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read().decode()

    def probe(self, name: str) -> str:
        """POST /probe?inbox=NAME: an on-demand check; its metrics (HTTPError if refused)."""
        req = urllib.request.Request(f"{self.url}/probe?inbox={name}", method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.read().decode()

    def post(self, path: str) -> tuple[int, str]:
        req = urllib.request.Request(self.url + path, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def samples(self, name: str) -> dict[frozenset, float]:
        """{frozenset(labels.items()): value} of one metric in /metrics."""
        out = {}
        for family in text_string_to_metric_families(self.get("/metrics")):
            for s in family.samples:
                if s.name == name:
                    out[frozenset(s.labels.items())] = s.value
        return out

    def value(self, name: str, **labels) -> float | None:
        for key, value in self.samples(name).items():
            if dict(key) == labels:
                return value
        return None


@pytest.fixture
def daemon(tmp_path, lab):
    started: list[Running] = []

    def start(entries: list[dict], passwords: dict[str, str] | None = None, **top) -> Running:
        top.setdefault("web", {"probe_min_interval": "1ms"})  # tests check an inbox many times
        config = write_config(tmp_path, lab, entries, **top)
        env = {env_name(e["name"]): lab.users["alice"].password for e in entries}
        env.update({env_name(k): v for k, v in (passwords or {}).items()})
        exporter = Exporter(str(config), environ=env)
        server = WebServer(("127.0.0.1", 0), exporter,
                           WebOptions(enable_probe=True, enable_lifecycle=True))
        exporter.start()
        server.start()
        started.append(Running(exporter, server, config, env))
        return started[-1]

    yield start
    for r in started:
        r.exporter.stop(5)
        r.server.stop()


# inbox entry overrides -> the failures it must export: {(step, category, reason)}
SCENARIOS = {
    "healthy": ({}, set()),
    "wrong-password": ({"password": "wrong"}, {
        ("imap_login", "unauthorized", "auth_failed"), ("smtp_login", "unauthorized", "auth_failed")}),
    "app-password": ({"user": "appuser"}, {
        ("imap_login", "app_password_required", "app_password_required"),
        ("smtp_login", "app_password_required", "app_password_required")}),
    "closed-port": ({"imap": {"port": 1}}, {
        ("imap_connect", "imap_settings_incorrect", "connection_refused")}),
    "selfsigned": ({"ports": ("imaps_selfsigned", "smtps_selfsigned")}, {
        ("imap_connect", "certificate_untrusted", "certificate_untrusted"),
        ("smtp_connect", "certificate_untrusted", "certificate_untrusted")}),
    "expired": ({"ports": ("imaps_expired", "smtps_expired")}, {
        ("imap_connect", "certificate_untrusted", "certificate_expired"),
        ("smtp_connect", "certificate_untrusted", "certificate_expired")}),
    "client-rejected": ({"ports": (None, "submission_client_rejected")}, {
        ("test_email", "test_email_failed", "ip_not_allowed")}),
    "recipient-rejected": ({"test_email": {"to": "nobody@example.test"}}, {
        ("test_email", "test_email_failed", "recipient_rejected")}),
}


def scenario_entry(lab, name: str, spec: dict) -> tuple[dict, str | None]:
    spec = dict(spec)
    user = spec.pop("user", "alice")
    password = spec.pop("password", None) or lab.users[user].password
    ports = spec.pop("ports", None)
    entry = lab_entry(lab, name, user, **spec)
    if ports:
        imap_port, smtp_port = ports
        if imap_port:
            entry["imap"]["port"] = getattr(lab.ports, imap_port)
        smtp_port = getattr(lab.ports, smtp_port)
        entry["smtp"] = {"host": lab.host, "port": smtp_port,
                         "security": "starttls" if "submission" in ports[1] else "ssl"}
    return entry, password


def test_metrics_tell_each_scenario_apart_and_pass_promtool(daemon, lab):
    entries, passwords = [], {}
    for name, (spec, _) in SCENARIOS.items():
        entry, password = scenario_entry(lab, name, spec)
        entries.append({**entry, "interval": "1h"})
        passwords[name] = password
    running = daemon(entries, passwords)
    for name in SCENARIOS:
        running.probe(f"{name}")

    failures = running.samples("inbox_failure_info")
    for name, (_, expected) in SCENARIOS.items():
        got = {(dict(k)["step"], dict(k)["category"], dict(k)["reason"])
               for k in failures if dict(k)["inbox"] == name}
        assert got == expected, name
        assert running.value("inbox_check_success", inbox=name) == (0 if expected else 1)
        assert running.value("inbox_consecutive_failures", inbox=name) >= (1 if expected else 0)
        for category, reason in {(c, r) for _, c, r in expected}:
            assert running.value("inbox_check_failures_total", inbox=name, category=category,
                                 reason=reason) >= 1

    # Step state: ok / failed / skipped told apart; a skipped step is NaN, not 0 or 1.
    assert math.isnan(running.value("inbox_step_success", inbox="wrong-password", step="imap_validate"))
    assert running.value("inbox_step_success", inbox="wrong-password", step="imap_login") == 0
    assert running.value("inbox_step_success", inbox="healthy", step="test_email") == 1
    assert running.value("inbox_step_duration_seconds", inbox="healthy", step="imap_connect") > 0

    # Certificates: expiry and trust per protocol.
    for protocol in ("imap", "smtp"):
        assert running.value("inbox_tls_certificate_trusted", inbox="healthy", protocol=protocol) == 1
        assert running.value("inbox_tls_certificate_expiry_timestamp_seconds", inbox="healthy",
                             protocol=protocol) > time.time() + 86400
        assert running.value("inbox_tls_certificate_trusted", inbox="selfsigned", protocol=protocol) == 0

    # Aggregates: the latency histogram per step and provider, not per inbox.
    hist = running.samples("inbox_step_latency_seconds_count")
    assert all(set(dict(k)) == {"step", "provider"} for k in hist)
    assert running.value("inbox_info", inbox="healthy", provider="other", imap_host=lab.host,
                         smtp_host=lab.host, auth="password") == 1

    text = running.get("/metrics")
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), (
        check.stdout + check.stderr)
    assert PASSWORD not in text


def test_every_inbox_and_step_series_exists_from_the_first_scrape(daemon, lab):
    running = daemon([{**lab_entry(lab, "fresh"), "interval": "1h"}])
    steps = running.samples("inbox_step_success")
    assert len([k for k in steps if dict(k)["inbox"] == "fresh"]) == 6
    assert all(math.isnan(v) for v in steps.values())  # nothing known yet
    assert math.isnan(running.value("inbox_check_success", inbox="fresh"))
    assert running.value("inbox_check_interval_seconds", inbox="fresh") == 3600


def test_scheduled_checks_run_on_their_interval(daemon, lab):
    running = daemon([{**lab_entry(lab, "quick"), "interval": "1s"}])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        done = running.value("inbox_exporter_checks_total") or 0
        if done >= 3:
            break
        time.sleep(0.2)
    assert done >= 3
    assert running.value("inbox_check_success", inbox="quick") == 1
    assert running.value("inbox_exporter_scheduling_lag_seconds_count") >= 3
    assert running.value("inbox_exporter_checks_skipped_total") == 0


def test_reload_adds_removes_and_changes_inboxes_and_a_bad_one_keeps_the_old_config(daemon, lab):
    running = daemon([{**lab_entry(lab, "a"), "interval": "1h"},
                      {**lab_entry(lab, "b"), "interval": "1h"}])
    running.probe("a")
    assert running.value("inbox_check_success", inbox="a") == 1

    write_config(running.config.parent, lab, [{**lab_entry(lab, "b"), "interval": "2h"},
                                              {**lab_entry(lab, "c"), "interval": "1h"}])
    running.env[env_name("c")] = lab.users["alice"].password
    assert running.post("/-/reload")[0] == 200
    inboxes = {dict(k)["inbox"] for k in running.samples("inbox_info")}
    assert inboxes == {"b", "c"}  # a's series are gone
    assert running.value("inbox_check_interval_seconds", inbox="b") == 7200
    assert running.value("inbox_exporter_config_last_reload_successful") == 1

    running.config.write_text("inboxes:\n  - {name: b, email: nope}\n")
    code, body = running.post("/-/reload")
    assert code == 500 and "inboxes[b].email: not an email address" in body
    assert body.count("\n") == 1
    assert running.value("inbox_exporter_config_last_reload_successful") == 0
    assert {dict(k)["inbox"] for k in running.samples("inbox_info")} == {"b", "c"}
    running.probe("c")  # checks keep running on the old config
    assert running.value("inbox_check_success", inbox="c") == 1


def test_credential_failures_back_off_and_a_success_restores_the_interval(daemon, lab):
    user = lab.add_user("backoff", "right-password") if "backoff" not in lab.users else lab.users["backoff"]
    lab.set_password("backoff", "right-password")
    entry = {**lab_entry(lab, "locked", "backoff"), "interval": "1h"}
    running = daemon([entry], {"locked": "right-password"},
                     checks={"auth_failure_max_interval": "3h"})
    lab.set_password("backoff", "rotated-password")
    intervals = []
    for _ in range(4):  # not POST /probe: that is refused while the inbox backs off
        check_now(running.exporter, "locked")
        intervals.append(running.value("inbox_check_interval_seconds", inbox="locked"))
    # the pace holds until the alert threshold (2 failures), then doubles, capped
    assert intervals == [3600, 7200, 10800, 10800]
    lab.set_password("backoff", "right-password")
    check_now(running.exporter, "locked")
    assert running.value("inbox_check_interval_seconds", inbox="locked") == 3600
    assert user.address.startswith("backoff@")


def test_inboxes_sharing_an_account_never_make_the_server_refuse_a_connection(daemon, lab):
    # The limited Dovecot allows one connection per user+IP: ten inboxes on the same account,
    # checked all at once, must still never meet "too many connections".
    entries = [{**lab_entry(lab, f"shared{i}", imap={"port": lab.ports.imaps_limited}),
                "interval": "1h"} for i in range(10)]
    running = daemon(entries)
    threads = [threading.Thread(target=running.probe, args=(f"shared{i}",))
               for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(10):
        assert running.value("inbox_check_success", inbox=f"shared{i}") == 1, i


def test_health_readiness_and_the_status_api(daemon, lab):
    running = daemon([{**lab_entry(lab, "good"), "interval": "1h"},
                      {**lab_entry(lab, "bad"), "interval": "1h"}], {"bad": PASSWORD})
    assert running.get("/-/healthy").strip() == "Healthy"
    assert running.get("/-/ready").strip() == "Ready"
    running.probe("good")
    running.probe("bad")
    body = running.get("/api/v1/status")
    doc = json.loads(body)
    by_name = {i["name"]: i for i in doc["inboxes"]}
    assert by_name["good"]["state"] == "ok" and by_name["bad"]["state"] == "failing"
    assert by_name["bad"]["failing_step"] == "imap_login"
    assert by_name["bad"]["category"] == "unauthorized"
    assert "credentials" in by_name["bad"]["hint"]
    assert by_name["good"]["next_run"] is not None
    assert by_name["bad"]["history"][0]["reason"] == "auth_failed"
    assert PASSWORD not in body and PASSWORD not in running.get("/")
    with pytest.raises(urllib.error.HTTPError) as e:
        running.probe("nope")
    assert e.value.code == 404


def test_stopping_leaves_no_thread_behind(tmp_path, lab):
    before = set(threading.enumerate())
    config = write_config(tmp_path, lab, [{**lab_entry(lab, "t"), "interval": "1s"}])
    exporter = Exporter(str(config), environ={env_name("t"): lab.users["alice"].password})
    server = WebServer(("127.0.0.1", 0), exporter)
    exporter.start()
    server.start()
    time.sleep(1.5)  # let a scheduled check or two run
    assert exporter.stop(grace=10) is True
    server.stop()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and set(threading.enumerate()) - before:
        time.sleep(0.05)
    assert set(threading.enumerate()) - before == set()


def run_daemon(config: Path, env: dict, *extra: str) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "inbox_exporter", "run", "--config.file", str(config),
         "--web.listen-address", f"127.0.0.1:{port}", "--shutdown.grace-period", "10s", *extra],
        env={**os.environ, "PYTHONPATH": str(ROOT / "daemon"), **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/-/ready", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("daemon did not become ready: " + proc.communicate()[1])


def terminated(proc: subprocess.Popen) -> str:
    """SIGTERM, as Kubernetes stops a pod; the daemon's stderr once it has exited."""
    proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=15)[1]


def test_the_daemon_reloads_on_sighup_and_exits_cleanly_on_sigterm(tmp_path, lab):
    config = write_config(tmp_path, lab, [{**lab_entry(lab, "one"), "interval": "1s"}])
    env = {env_name(n): lab.users["alice"].password for n in ("one", "two")}
    proc, url = run_daemon(config, env)
    try:
        write_config(tmp_path, lab, [{**lab_entry(lab, "one"), "interval": "1s"},
                                     {**lab_entry(lab, "two"), "interval": "1s"}])
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if 'inbox_info{inbox="two"' in urllib.request.urlopen(url + "/metrics").read().decode():
                break
            time.sleep(0.1)
        else:
            raise AssertionError("SIGHUP did not add the inbox")
        t0 = time.monotonic()
        stderr = terminated(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert time.monotonic() - t0 < 11
    assert "msg=stopped" in stderr and "Traceback" not in stderr
    assert PASSWORD not in stderr and lab.users["alice"].password not in stderr


def test_a_bad_config_at_start_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "config.yaml"
    bad.write_text(yaml.safe_dump({"inboxes": [{"name": "x", "email": "x@example.test",
                                                "password": "p", "provider": "gmial"}]}))
    out = subprocess.run([sys.executable, "-m", "inbox_exporter", "run", "--config.file", str(bad),
                          "--web.listen-address", "127.0.0.1:0"],
                         env={**os.environ, "PYTHONPATH": str(ROOT / "daemon")},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip().startswith(f"error: {bad}: inboxes[x].provider: unknown provider")
    assert out.stderr.count("\n") == 1


def test_bad_reloads_are_one_line_each_and_never_stop_the_daemon(tmp_path, lab):
    config = write_config(tmp_path, lab, [{**lab_entry(lab, "one"), "interval": "1h"}])
    good = config.read_bytes()
    env = {env_name("one"): lab.users["alice"].password}
    proc, url = run_daemon(config, env)
    bad_versions = [
        good + b"# \xe9dit\xe9 en Latin-1\n",  # not UTF-8
        good + b"alerting:\n  alertmanager: {url: 'http://u:hush1SECRET@[::1/'}\n",
        good + b"alerting:\n  webhooks: [{url: 'u:hush2SECRET@hooks.example:9093'}]\n",
        good + b"alerting:\n  webhooks: [{url: 'http://u:pa/hush3SECRET@127.0.0.1/'}]\n",
    ]
    try:
        for n, bad in enumerate(bad_versions, 1):
            config.write_bytes(bad)
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "inbox_exporter_config_last_reload_successful 0.0" in
                       urllib.request.urlopen(url + "/metrics").read().decode(),
                       timeout=10, what=f"bad version {n} to be refused")
            assert urllib.request.urlopen(url + "/-/healthy").status == 200
            config.write_bytes(good)  # and back: the next bad one must be refused again
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "inbox_exporter_config_last_reload_successful 1.0" in
                       urllib.request.urlopen(url + "/metrics").read().decode(),
                       timeout=10, what="the good version to load")
        stderr = terminated(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    failures = [line for line in stderr.splitlines() if "config reload failed" in line]
    assert len(failures) == len(bad_versions), stderr
    assert "not UTF-8 text" in failures[0] and "alertmanager.url: not a valid URL" in failures[1]
    assert "webhooks[0].url: not an http(s) URL" in failures[2]
    assert "webhooks[0].url: not a valid URL" in failures[3]
    assert "Traceback" not in stderr and "SECRET" not in stderr


def chromium(*args: str) -> subprocess.CompletedProcess:
    # A fresh profile per run, removed afterwards (each holds a few MB).
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_the_status_page_shows_a_person_each_failure_and_its_hint(daemon, lab, tmp_path):
    running = daemon([{**lab_entry(lab, "good"), "interval": "1h"},
                      {**lab_entry(lab, "bad"), "interval": "1h"},
                      {**lab_entry(lab, "closed", imap={"port": 1}), "interval": "1h"}],
                     {"bad": PASSWORD})
    for name in ("good", "bad", "closed"):
        running.probe(f"{name}")
    dom = chromium("--virtual-time-budget=2000", "--dump-dom", running.url + "/")
    assert dom.returncode == 0, dom.stderr
    html = dom.stdout
    assert "1 of 3 OK, 2 failing" in html
    # The page's script ran under its Content-Security-Policy: it makes the headers focusable.
    assert html.count('tabindex="0"') == 8, "the status page script did not run (CSP?)"
    from html.parser import HTMLParser

    class Rows(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self._cells, self._in_row, self._depth = {}, None, None, 0

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "tr" and "data-inbox" in attrs:
                self._in_row, self._cells = attrs["data-inbox"], {"class": attrs.get("class")}
            elif tag == "td" and self._in_row:
                self._label = attrs.get("data-label")
                self._cells.setdefault(self._label, "")

        def handle_data(self, data):
            if self._in_row and getattr(self, "_label", None):
                self._cells[self._label] += data

        def handle_endtag(self, tag):
            if tag == "tr" and self._in_row and self._cells.get("Last check") is not None:
                self.rows[self._in_row] = self._cells
                self._in_row = None

    parser = Rows()
    parser.feed(html)
    rows = parser.rows
    assert list(rows) == ["bad", "closed", "good"]  # failing first
    assert rows["good"]["class"] == "ok" and rows["good"]["Status"] == "ok"
    assert rows["bad"]["class"] == "failing" and rows["bad"]["Failing step"] == "imap_login"
    assert rows["bad"]["Why"] == "unauthorized / auth_failed"
    assert rows["bad"]["Hint"].startswith("The server rejected the credentials")
    assert rows["closed"]["Failing step"] == "imap_connect"
    assert "connection_refused" in rows["closed"]["Why"]
    assert rows["good"]["Last success"] != "never" and rows["bad"]["Last success"] == "never"
    assert PASSWORD not in html

    # On a phone: the page renders at 390 px wide without external assets.
    shot = tmp_path / "phone.png"
    out = chromium("--window-size=390,844", f"--screenshot={shot}", running.url + "/")
    assert out.returncode == 0 and shot.stat().st_size > 5000, out.stderr


def test_the_readme_demo_starts_and_shows_healthy_and_broken_inboxes():
    # A TMPDIR of its own (short: Postfix's socket paths must fit in 108 bytes) to see
    # that the demo removes its lab when it ends.
    with tempfile.TemporaryDirectory(prefix="demo-", dir="/tmp") as tmp:
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--duration", "1"],
                             env={**os.environ, "PYTHONPATH": str(ROOT / "daemon"), "TMPDIR": tmp},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert os.listdir(tmp) == [], "the demo left its lab behind"
    assert "Status page: http://127.0.0.1:" in out.stdout
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("  ")}
    assert "ok" in lines["sales"] and "ok" in lines["support"]
    assert "ok" in lines["sales-m365"] and "oauth2 (xoauth2, refresh_token)" in lines["sales-m365"]
    assert "unauthorized" in lines["billing"] and "connection_refused" in lines["legacy"]
    assert "app_password_required" in lines["marketing"]
    assert "certificate_untrusted" in lines["selfhosted"]


def test_every_exported_metric_is_documented(daemon, lab):
    running = daemon([{**lab_entry(lab, "doc"), "interval": "1h"}])
    running.probe("doc")
    docs = (ROOT / "docs" / "metrics.md").read_text()
    names = {f.name for f in text_string_to_metric_families(running.get("/metrics"))}
    assert len(names) > 20
    for name in names:
        # the parser strips _total from counters and _info from info metrics
        assert f"`{name}`" in docs or f"`{name}_total`" in docs or f"`{name}_info`" in docs, name


def test_two_shards_check_disjoint_sets_of_inboxes_that_together_are_all(tmp_path, lab):
    names = [f"shard-{i}" for i in range(10)]
    config = write_config(tmp_path, lab, [{**lab_entry(lab, n), "interval": "1s"} for n in names])
    env = {env_name(n): lab.users["alice"].password for n in names}
    daemons = [run_daemon(config, {**env, "HOSTNAME": f"inbox-exporter-{i}"},
                          "--shard.count", "2", "--shard.index", index)
               for i, index in enumerate(("0", "hostname"))]  # index 1 from the pod name
    try:
        seen = []
        for _, url in daemons:
            def checked(url=url):
                text = urllib.request.urlopen(url + "/metrics").read().decode()
                ok = {s.labels["inbox"] for f in text_string_to_metric_families(text)
                      for s in f.samples if s.name == "inbox_check_success" and s.value == 1}
                configured = {s.labels["inbox"] for f in text_string_to_metric_families(text)
                              for s in f.samples if s.name == "inbox_info"}
                return configured if configured and ok == configured else None
            deadline = time.monotonic() + 20
            while (got := checked()) is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert got, "a shard did not check all of its inboxes"
            seen.append(got)
    finally:
        for proc, _ in daemons:
            proc.terminate()
            proc.communicate(timeout=15)
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(names)
    assert seen[0] and seen[1]  # 10 names: both shards get some (fixed by the hash)


def test_shard_flags_are_checked():
    from inbox_exporter.sharding import parse_shard

    assert parse_shard(3, "hostname", "inbox-exporter-2").index == 2
    for count, index, host in ((2, "2", None), (2, "x", None), (2, "hostname", "exporter"),
                               (0, "0", None)):
        with pytest.raises(ValueError):
            parse_shard(count, index, host)


def test_delivery_is_confirmed_off_the_check_and_kept_apart_from_send_failures(daemon, lab):
    bob = lab.users["bob"]
    running = daemon([
        {**lab_entry(lab, "arrives"), "interval": "1h", "delivery": {"timeout": "10s"}},
        {**lab_entry(lab, "lost"), "interval": "1h", "delivery": {"timeout": "2s", "mailbox": {
            "host": lab.host, "port": lab.ports.imaps, "username": bob.address,
            "password": bob.password}}},
        {**lab_entry(lab, "unsent"), "interval": "1h", "delivery": {"timeout": "2s"}},
    ], {"unsent": "wrong-password"})
    t0 = time.monotonic()
    for name in ("arrives", "lost", "unsent"):
        running.probe(f"{name}")
    assert time.monotonic() - t0 < 5  # the checks did not wait for the deliveries
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
            math.isnan(running.value("inbox_delivery_success", inbox="arrives"))
            or math.isnan(running.value("inbox_delivery_success", inbox="lost"))):
        time.sleep(0.2)
    assert running.value("inbox_delivery_success", inbox="arrives") == 1
    assert 0 < running.value("inbox_delivery_duration_seconds", inbox="arrives") < 10
    assert running.value("inbox_delivery_success", inbox="lost") == 0
    assert running.value("inbox_failure_info", inbox="lost", step="delivery",
                         category="delivery_failed", reason="delivery_timeout") == 1
    # The send failed: that is test_email's (not even sent), never a delivery failure.
    assert math.isnan(running.value("inbox_delivery_success", inbox="unsent"))
    assert not [k for k in running.samples("inbox_failure_info")
                if dict(k)["inbox"] == "unsent" and dict(k)["step"] == "delivery"]
    assert running.value("inbox_delivery_latency_seconds_count", provider="other") >= 1
