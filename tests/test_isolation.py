"""Isolation: a server that hangs costs only its own share of the exporter, liveness is not
capacity, waiting holds no worker; and the test email budget."""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml

from inbox_exporter.daemon import Exporter
from inbox_exporter.model import Category, CheckResult, Diagnosis, Reason, Status, Step, StepResult
from inbox_exporter.probes import transport
from inbox_exporter.web import WebServer

from .conftest import check_now, env_name, lab_entry, wait_until, write_config

HANGING_HOST = "127.0.0.2"  # another loopback address: a server of its own for the caps


class SilentServer:
    """Accepts TCP connections on 127.0.0.2 and never says a word (a provider outage, a
    silent firewall). Counts how many connections it holds at once."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((HANGING_HOST, 0))
        self.sock.listen(512)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.open = 0
        self.max_open = 0
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        while not self._stop.is_set():  # bounded by the test's __exit__
            # Closed connections first: a client closes before it opens the next one, and both
            # may be ready in one batch.
            ready = sorted(sel.select(timeout=0.1), key=lambda kv: kv[0].fileobj is self.sock)
            for key, _ in ready:
                if key.fileobj is self.sock:
                    try:
                        conn, _ = self.sock.accept()
                    except OSError:
                        continue
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
                    self.accepted += 1
                    self.open += 1
                    self.max_open = max(self.max_open, self.open)
                else:
                    conn = key.fileobj
                    try:
                        data = conn.recv(4096)
                    except OSError:
                        data = b""
                    if not data:  # the client gave up: it closed
                        sel.unregister(conn)
                        conn.close()
                        self.open -= 1
        for key in list(sel.get_map().values()):
            if key.fileobj is not self.sock:
                key.fileobj.close()
        sel.close()


def get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


@pytest.fixture
def exporter_for(tmp_path, lab):
    started = []

    def start(entries: list[dict], env: dict, **top) -> tuple[Exporter, str]:
        config = write_config(tmp_path, lab, entries, **top)
        exporter = Exporter(str(config), environ=env)
        server = WebServer(("127.0.0.1", 0), exporter)
        exporter.start()
        server.start()
        started.append((exporter, server))
        return exporter, f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for exporter, server in started:
        exporter.stop(5)
        server.stop()


def test_a_hanging_server_costs_only_its_own_share_and_never_liveness(lab, exporter_for):
    with SilentServer() as hang:
        healthy = [lab_entry(lab, f"ok{n}", interval="2s", timeout="1s") for n in range(3)]
        hung = [{"name": f"hung{n}", "email": f"user{n}@hang.example", "password_env": "PW_HUNG",
                 "interval": "2s", "timeout": "1s",
                 "imap": {"host": HANGING_HOST, "port": hang.port, "security": "ssl"},
                 "smtp": {"host": HANGING_HOST, "port": hang.port, "security": "ssl"}}
                for n in range(60)]
        env = {env_name(e["name"]): lab.users["alice"].password for e in healthy}
        env["PW_HUNG"] = "x"
        exporter, url = exporter_for(
            healthy + hung, env, checks={"concurrency": 8, "max_connections_per_host": 3})
        # 60 hanging inboxes x 2 legs every 2 s, 3 connections at a time for 1 s each: most of
        # their legs wait, and expire. The healthy ones must not notice.
        health, waiting_seen = [], 0
        t_end = time.monotonic() + 9
        while time.monotonic() < t_end:  # bounded: 9 s
            health.append(get(url + "/-/healthy")[0])
            waiting_seen = max(waiting_seen, exporter.runner.waiting)
            time.sleep(0.25)
        doc = json.loads(get(url + "/api/v1/status")[1])
        statuses = {s["name"]: s for s in doc["inboxes"]}
        page = get(url + "/")[1]
    # saturation is shown where people look: the status page and its JSON
    assert doc["load"]["connections_active"] >= 0 and "connections open" in page
    assert set(health) == {200}, health
    assert hang.max_open <= 3  # the per-server cap held: 3 workers of 8 at the most
    assert waiting_seen > 0  # work queued for the hanging server: in a list, not on a thread
    for n in range(3):
        history = statuses[f"ok{n}"]["history"]
        # every 2 s for 9 s (first run within the first interval): at least 3 checks, all ok
        assert len(history) >= 3 and all(h["ok"] for h in history), statuses[f"ok{n}"]
    failing = [s for name, s in statuses.items() if name.startswith("hung") and s["ok"] is False]
    assert failing and all(s["reason"] in ("greeting_timeout", "timeout") for s in failing)
    text = get(url + "/metrics")[1]
    assert "inbox_exporter_connections_waiting" in text and "inbox_exporter_connections_active" in text


def test_the_test_email_goes_out_once_per_test_email_interval(lab, exporter_for, tmp_path):
    entry = lab_entry(lab, "budget", interval="10m")  # scheduled run far away: on demand only
    exporter, url = exporter_for([entry], {env_name("budget"): lab.users["alice"].password})
    inbox = exporter.config.inboxes[0]
    first = check_now(exporter, inbox.name)
    second = check_now(exporter, inbox.name)
    assert first.step(Step.TEST_EMAIL).status is Status.OK
    held = second.step(Step.TEST_EMAIL)
    assert held.status is Status.SKIPPED and held.note.startswith("not due: last sent at")
    assert second.ok and second.step(Step.SMTP_LOGIN).status is Status.OK  # still verified
    assert second.sent_at is None
    # exactly one mail: the first check's
    lab.wait_for_message("bcc", lambda m: first.probe_id in m.get("Message-ID", ""))
    assert not [m for m in lab.messages("bcc") if second.probe_id in m.get("Message-ID", "")]
    status = json.loads(get(url + "/api/v1/status")[1])["inboxes"][0]
    assert status["last_test_email"] is not None
    metrics = get(url + "/metrics")[1]
    assert f'inbox_test_email_last_sent_timestamp_seconds{{inbox="budget"}} {first.sent_at!r}' in metrics


def test_an_on_demand_check_never_sends_inside_the_test_email_interval(lab, exporter_for):
    entry = lab_entry(lab, "strict", interval="1h", timeout="5s", test_email={
        "to": lab.users["bcc"].address, "interval": "1h"})
    exporter, _ = exporter_for([entry], {env_name("strict"): lab.users["alice"].password})
    inbox = exporter.config.inboxes[0]
    sent = time.time() - 3600 + 20  # the last mail went out 59 min 40 s ago
    exporter.store.record(CheckResult(inbox.name, sent - 1, 1.0, tuple(
        StepResult(step, Status.OK, 0.1) for step in Step), "id", sent_at=sent), inbox)
    now = time.time()
    # a scheduled check on its grid sends (the last one's mail left up to a deadline late)...
    assert exporter.scheduler.hold_test_email(inbox, now) is None
    # ...an on-demand one waits for the whole interval
    assert exporter.scheduler.hold_test_email(inbox, now, on_demand=True).startswith("not due")
    assert exporter.scheduler.hold_test_email(inbox, sent + 3600, on_demand=True) is None
    # and a scheduled check half an interval early does not send either
    assert exporter.scheduler.hold_test_email(inbox, sent + 1800).startswith("not due")


def test_check_sends_unless_told_not_to(lab, tmp_path):
    from .test_cli import run_cli

    config = write_config(tmp_path, lab, [lab_entry(lab, "cli")])
    env = {env_name("cli"): lab.users["alice"].password}
    out = run_cli("check", "--config.file", str(config), "--output", "json",
                  "--no-test-email", env=env)
    steps = {s["step"]: s for s in json.loads(out.stdout)["inboxes"][0]["steps"]}
    assert out.returncode == 0 and steps["test_email"]["status"] == "skipped"
    assert steps["smtp_login"]["status"] == "ok"
    out = run_cli("check", "--config.file", str(config), "--output", "json", env=env)
    steps = {s["step"]: s for s in json.loads(out.stdout)["inboxes"][0]["steps"]}
    assert steps["test_email"]["status"] == "ok"


def test_a_backoff_racing_a_reload_keeps_the_new_inbox(lab, exporter_for, tmp_path):
    entry = lab_entry(lab, "racy", interval="10m")
    env = {env_name("racy"): "wrong"}
    exporter, _ = exporter_for([entry], env)
    old = exporter.config.inboxes[0]
    config = tmp_path / "config.yaml"
    doc = yaml.safe_load(config.read_text())
    doc["inboxes"][0]["timeout"] = "4s"  # the inbox changes
    config.write_text(yaml.safe_dump(doc))
    assert exporter.reload() is None
    new = exporter.config.inboxes[0]
    assert new != old
    # The old inbox's check ends now and backs off: it must not put its job back.
    exporter.scheduler._backoff(old, 120.0)
    job = exporter.scheduler._sched.get_job("racy")
    assert job.args[0] == new


def test_rate_limits_back_off_like_credential_failures(lab, exporter_for):
    exporter, _ = exporter_for([lab_entry(lab, "limited")],
                               {env_name("limited"): lab.users["alice"].password})
    inbox = exporter.config.inboxes[0]
    d = Diagnosis(Category.SMTP_SETTINGS_INCORRECT, Reason.RATE_LIMITED, "hint", "454 4.7.0")
    result = CheckResult(inbox.name, time.time(), 0.1,
                         (StepResult(Step.SMTP_LOGIN, Status.FAILED, 0.1, d),), "p")
    sched = exporter.scheduler
    assert sched._next_interval(inbox, None, result, sched.backoff_after) == 2 * inbox.interval
    other = Diagnosis(Category.SMTP_SETTINGS_INCORRECT, Reason.AUTH_UNAVAILABLE, "hint", "454")
    result = CheckResult(inbox.name, time.time(), 0.1,
                         (StepResult(Step.SMTP_LOGIN, Status.FAILED, 0.1, other),), "p")
    assert sched._next_interval(inbox, None, result, sched.backoff_after) is None


def test_a_hung_resolver_cannot_grow_a_queue(monkeypatch):
    # A resolver that never answers is a fault no real server here produces on demand.
    release = threading.Event()
    calls = []

    def hanging_getaddrinfo(host, *args, **kwargs):
        calls.append(host)
        release.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "released")

    monkeypatch.setattr(transport.socket, "getaddrinfo", hanging_getaddrinfo)
    try:
        outcomes = []
        threads = [threading.Thread(target=lambda n=n: outcomes.append(_try(f"h{n % 100}.example")))
                   for n in range(300)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert time.monotonic() - t0 < 5  # nobody waited past the 0.3 s timeout by much
        assert len(outcomes) == 300 and all(o == "timeout" for o in outcomes)
        # 100 names, 300 callers: at most MAX_PENDING lookups were ever queued, 4 ran
        assert transport.pending_lookups() <= transport.MAX_PENDING
        assert len(calls) <= 4  # the dns threads; cancelled ones never ran
    finally:
        release.set()
    wait_until(lambda: transport.pending_lookups() == 0, 15, "the hung lookups to end")


def _try(host: str) -> str:
    try:
        transport.resolve(host, 993, 0.3)
        return "ok"
    except TimeoutError:
        return "timeout"
    except OSError:
        return "error"


def test_the_daemon_removes_the_sent_copy_of_its_test_email(lab, exporter_for):
    entry = lab_entry(lab, "with-sent-copy", "sender", interval="10m")
    exporter, _ = exporter_for([entry], {env_name("with-sent-copy"): lab.users["sender"].password})
    result = check_now(exporter, exporter.config.inboxes[0].name)
    assert result.ok and result.sent_at

    def copies():
        return [m for m in lab.messages("sender") if result.probe_id in m.get("X-Inbox-Exporter-Probe", "")]

    # Delivered to the BCC address and, in the same queue run, filed in the sender's Sent
    # folder by the server; then removed by the daemon (it looks 2 s and 10 s after sending).
    lab.wait_for_message("bcc", lambda m: result.probe_id in m.get("Message-ID", ""))
    wait_until(lambda: "to=<sender+Sent@" in lab.log_tail("postfix", 400), 10, "the Sent copy")
    wait_until(lambda: not copies(), 20, "the Sent copy to be removed")
