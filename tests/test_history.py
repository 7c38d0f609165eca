"""What happened to an inbox before: the history strip, uptime and sparkline, the page per
inbox, and the history that survives a restart (--storage.path, SQLite), a kill -9 and a
corrupt file."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from inbox_exporter.daemon import Exporter
from inbox_exporter.history import ENTRY, History, decode, encode
from inbox_exporter.model import Reason, Step
from inbox_exporter.redact import sasl_plain

from .conftest import PASSWORD, check_now, env_name, lab_entry, wait_until, write_config
from .test_daemon import chromium, daemon  # noqa: F401 - the fixture, and the browser
from .test_storage import NOW, result

ROOT = Path(__file__).parent.parent


def test_a_check_is_one_small_record_and_reads_back_the_same(lab, tmp_path):
    config = write_config(tmp_path, lab, [{**lab_entry(lab, "bad"), "interval": "1h"}])
    exporter = Exporter(str(config), environ={env_name("bad"): PASSWORD})
    exporter.start()
    try:
        result = check_now(exporter, "bad")
    finally:
        exporter.stop(5)
    entry = decode(encode(result))
    assert ENTRY.size == 20
    assert not entry.ok and entry.failing_step is Step.IMAP_LOGIN
    assert entry.reason is Reason.AUTH_FAILED and entry.started_at == int(result.started_at)
    login_ms = entry.step_ms[list(Step).index(Step.IMAP_LOGIN)]
    assert login_ms == round(result.step(Step.IMAP_LOGIN).duration_seconds * 1000)


def test_the_history_keeps_the_last_hundred_checks_oldest_first(lab, tmp_path):
    config = write_config(tmp_path, lab, [{**lab_entry(lab, "h"), "interval": "1h"}])
    exporter = Exporter(str(config), environ={env_name("h"): lab.users["alice"].password})
    exporter.start()
    try:
        result = check_now(exporter, "h")
    finally:
        exporter.stop(5)
    history = History(size=100)
    for i in range(130):
        history.add("h", result.__class__(**{**result.__dict__, "started_at": 1_000_000 + i}))
    entries = history.entries("h")
    assert len(entries) == 100
    assert entries[0].started_at == 1_000_030 and entries[-1].started_at == 1_000_129
    assert history.nbytes() == 100 * ENTRY.size  # all ok: nothing kept apart
    failing = next(r for r in [result] if r.ok)
    history.add("h", failing.__class__(**{**failing.__dict__, "started_at": 1, "steps": tuple(
        s.__class__(s.step, s.status.__class__("failed"), s.duration_seconds,
                    s.diagnosis) if s.step is Step.IMAP_LOGIN else s for s in failing.steps)}))
    for i in range(100):  # the failure scrolls out of the ring into its own
        history.add("h", result.__class__(**{**result.__dict__, "started_at": 2_000_000 + i}))
    assert [e.started_at for e in history.older_failures("h")] == [1]
    assert history.uptime("h") == 1.0


def test_the_inbox_page_shows_the_failure_its_history_and_no_secret(
        daemon, lab, tmp_path):  # noqa: F811 - `daemon` is the fixture imported above
    running = daemon([{**lab_entry(lab, "good"), "interval": "1h"},
                      {**lab_entry(lab, "bad"), "interval": "1h"}], {"bad": PASSWORD})
    for _ in range(3):  # not POST /probe: "bad" backs off after two failures
        check_now(running.exporter, "good")
        check_now(running.exporter, "bad")
    page = running.get("/inbox/bad")
    assert "Transcript: last check" in page and "NO [AUTHENTICATIONFAILED]" in page
    assert "Transcript: last failure" not in page  # the same check: shown once
    assert re.search(r"C \w+ LOGIN &lt;redacted \d+ bytes&gt;\n", page)  # user and password
    assert "unauthorized / auth_failed" in page and "The server rejected the credentials" in page
    assert page.count("<rect") == 3 and "imap_login failed: auth_failed" in page
    assert "uptime 0.0 %" in running.get("/inbox/bad") and "uptime 100.0 %" in running.get("/inbox/good")
    doc = json.loads(running.get("/api/v1/inboxes/bad"))
    assert doc["uptime"] == 0 and len(doc["checks"]) == 3
    assert doc["checks"][-1]["failing_step"] == "imap_login"
    assert doc["checks"][-1]["step_ms"]["imap_connect"] is not None
    assert "AUTHENTICATIONFAILED" in doc["transcripts"]["last"]
    status = running.get("/")
    assert '<a href="/inbox/bad">' in status and "3 checks" in status  # a merged run
    good = running.get("/inbox/good") + running.get("/api/v1/inboxes/good")
    user = lab.users["alice"].address
    for text in (page, status, json.dumps(doc), good):
        for password in (PASSWORD, lab.users["alice"].password):  # the wrong one, the right one
            for form in (password, base64.b64encode(password.encode()).decode(),
                         sasl_plain(user, password), sasl_plain("", password)):
                assert form not in text
    with pytest.raises(urllib.error.HTTPError) as e:
        running.get("/inbox/%3Cscript%3E")
    assert e.value.code == 404 and b"script" not in e.value.read()

    shot = tmp_path / "inbox.png"
    out = chromium("--window-size=1100,1200", f"--screenshot={shot}", running.url + "/inbox/bad")
    assert out.returncode == 0 and shot.stat().st_size > 10000, out.stderr
    shot = tmp_path / "status.png"
    out = chromium("--window-size=1400,600", f"--screenshot={shot}", running.url + "/")
    assert out.returncode == 0 and shot.stat().st_size > 10000, out.stderr


def run_daemon(config: Path, env: dict, storage: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "inbox_exporter", "run", f"--config.file={config}",
         f"--storage.path={storage}", f"--web.listen-address=127.0.0.1:{port}",
         "--web.enable-probe", "--log.format=json"],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT / "daemon")},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checks_of(url: str, name: str) -> list[dict]:
    try:
        return json.load(urllib.request.urlopen(f"{url}/api/v1/inboxes/{name}", timeout=5))["checks"]
    except OSError:
        return []


def test_the_history_survives_a_restart_and_a_kill_9(lab, tmp_path):
    config = write_config(tmp_path, lab, [{**lab_entry(lab, "kept"), "interval": "1h"}],
                          web={"probe_min_interval": "1ms"})
    env = {env_name("kept"): lab.users["alice"].password}
    storage, port = tmp_path / "state", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = run_daemon(config, env, storage, port)
    try:
        wait_until(lambda: checks_of(url, "kept") is not None and _ready(url), timeout=30,
                   what="the daemon")
        for _ in range(2):
            urllib.request.urlopen(urllib.request.Request(f"{url}/probe?inbox=kept",
                                                          method="POST"), timeout=30).read()
        # the writer flushes every 5 s: wait for the file to hold both, then kill -9
        wait_until(lambda: _stored(storage, "kept") >= 2, timeout=15, what="a flush")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = run_daemon(config, env, storage, port)
        wait_until(lambda: len(checks_of(url, "kept")) >= 2, timeout=30, what="the history back")
        before = checks_of(url, "kept")
        proc.send_signal(signal.SIGTERM)  # a clean stop writes the last batch at once
        proc.wait(30)
        proc = run_daemon(config, env, storage, port)
        wait_until(lambda: len(checks_of(url, "kept")) >= len(before), timeout=30,
                   what="the history after a clean restart")
        assert checks_of(url, "kept")[:2] == before[:2]
    finally:
        proc.kill()
        proc.wait(10)


def _ready(url: str) -> bool:
    try:
        return urllib.request.urlopen(url + "/-/ready", timeout=1).status == 200
    except OSError:
        return False


def _stored(storage: Path, name: str) -> int:
    try:
        with sqlite3.connect(storage / "history.db") as db:
            row = db.execute("SELECT records FROM history WHERE inbox=?", (name,)).fetchone()
    except sqlite3.Error:
        return 0
    return 0 if row is None else len(row[0]) // ENTRY.size


def test_a_corrupt_history_file_is_set_aside_and_a_fresh_one_started(lab, tmp_path, caplog):
    storage = tmp_path / "state"
    storage.mkdir()
    (storage / "history.db").write_bytes(b"this is not a database" * 100)
    config = write_config(tmp_path, lab, [{**lab_entry(lab, "fresh"), "interval": "1h"}])
    exporter = Exporter(str(config), environ={env_name("fresh"): lab.users["alice"].password},
                        storage_path=str(storage))
    exporter.start()
    try:
        check_now(exporter, "fresh")
    finally:
        exporter.stop(5)
    aside = [p.name for p in storage.iterdir() if ".corrupt-" in p.name]
    assert aside and any("moved aside" in r.getMessage() for r in caplog.records)
    assert _stored(storage, "fresh") == 1  # the fresh file works (stop() flushed it)


def test_an_inbox_removed_by_a_reload_and_added_back_starts_with_a_blank_strip(lab, tmp_path):
    both = [{**lab_entry(lab, "a"), "interval": "1h"}, {**lab_entry(lab, "b"), "interval": "1h"}]
    config = write_config(tmp_path, lab, both)
    password = lab.users["alice"].password
    exporter = Exporter(str(config), environ={env_name("a"): password, env_name("b"): password})
    exporter.start()
    try:
        check_now(exporter, "a")
        assert "<rect" in exporter.strips()["a"]
        write_config(tmp_path, lab, both[1:])
        assert exporter.reload() is None
        assert "a" not in exporter.strips() and "a" not in exporter._strips  # the cache too
        write_config(tmp_path, lab, both)
        assert exporter.reload() is None
        assert exporter.strips()["a"] == ""  # not the strip drawn before the removal
    finally:
        exporter.stop(5)


def test_a_version_is_never_reused_after_an_inbox_is_forgotten():
    history = History()
    history.add("a", result(NOW))
    history.add("b", result(NOW))
    seen = {history.version("a"), history.version("b")}
    history.keep(["b"])
    assert history.version("a") == 0 and history.version("b") in seen
    history.add("a", result(NOW))
    assert history.version("a") not in seen
