"""What the benchmarks share: import paths, an inbox on the lab, tool versions, the daemon as a
subprocess, its /proc figures and its metrics, and reading its JSON log."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "daemon"), str(ROOT / "lab")]  # the benches run from a checkout

from inbox_exporter.config import Inbox, parse_config  # noqa: E402 - needs the line above

# The start of the detail of a step that never got a connection slot (the monitor's own
# queue, not the server): such a check failed, it was not done.
NOT_RUN_NO_SLOT = "not run: no connection slot"


def lab_inbox(lab, user: str = "alice", **extra) -> Inbox:
    """An inbox on the lab's good endpoints (IMAPS, submission with STARTTLS)."""
    u = lab.users[user]
    entry = {"name": "bench", "email": u.address, "password": u.password,
             "imap": {"host": lab.host, "port": lab.ports.imaps, "security": "ssl"},
             "smtp": {"host": lab.host, "port": lab.ports.submission, "security": "starttls"},
             "ca_file": str(lab.ca_file), **extra}
    return parse_config(yaml.safe_dump({"inboxes": [entry]}), "bench", {}).inboxes[0]


def version(name: str) -> str:
    try:
        return subprocess.run([name, "--version"], capture_output=True, text=True).stdout.split()[0]
    except (OSError, IndexError):
        return "?"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, poll: float = 0.05) -> float | None:
    """Poll until `predicate()` is true: the monotonic time it was, or None after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic()
        time.sleep(poll)
    return None


class Report:
    """A benchmark's verdict, check by check: one PASS/FAIL line each; failed counts them."""

    def __init__(self) -> None:
        self.failed = 0

    def check(self, ok: bool, text: str) -> bool:
        print(f"{'PASS' if ok else 'FAIL'}  {text}", flush=True)
        self.failed += not ok
        return ok

    @staticmethod
    def info(text: str) -> None:
        print(f"  {text}", flush=True)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    v = sorted(values)
    return v[max(0, math.ceil(p / 100 * len(v)) - 1)]


# --- a process's figures from /proc -------------------------------------------------------

def proc_status(pid: int | str = "self") -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


def rss_mb(pid: int | str = "self") -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MB."""
    f = proc_status(pid)
    return int(f["VmRSS"].split()[0]) / 1024, int(f["VmHWM"].split()[0]) / 1024


def threads(pid: int | str) -> int:
    return int(proc_status(pid)["Threads"])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# --- the daemon's HTTP side ---------------------------------------------------------------

def scrape(url: str, timeout: float = 30) -> dict[str, list[tuple[dict, float]]]:
    """/metrics of the daemon at `url`: sample name -> [(labels, value)]."""
    out: dict[str, list[tuple[dict, float]]] = {}
    body = urllib.request.urlopen(url + "/metrics", timeout=timeout).read().decode()
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(metrics, name: str, **labels) -> float:
    return sum(v for lab, v in metrics.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def get_json(url: str, timeout: float = 30):
    return json.load(urllib.request.urlopen(url, timeout=timeout))


class Daemon:
    """`inbox-exporter run` as a process of its own (its CPU, RSS and threads are its own),
    logging JSON at `log_level` into `log`, a file (a pipe nobody reads fills up and blocks
    the daemon). Started by start() (bounded wait for /-/ready), stopped by stop()."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None,
                 grace: str = "5s", log_level: str = "warning", args: tuple[str, ...] = (),
                 tls_ca: Path | None = None):
        """`args`: more flags (e.g. --web.config.file); `tls_ca`: the daemon serves HTTPS
        with a certificate from this CA."""
        self.config, self.log, self.grace, self.log_level = config, log, grace, log_level
        self.args = args
        self.env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT / "daemon")}
        self.port = free_port()
        self.url = f"{'https' if tls_ca else 'http'}://127.0.0.1:{self.port}"
        self.context = ssl.create_default_context(cafile=str(tls_ca)) if tls_ca else None
        self.proc: subprocess.Popen | None = None
        self.ready_at: float | None = None  # wall clock

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 60) -> Daemon:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "inbox_exporter", "run", "--config.file", str(self.config),
                 "--web.listen-address", f"127.0.0.1:{self.port}", "--log.level", self.log_level,
                 "--log.format", "json", "--shutdown.grace-period", self.grace, *self.args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if wait_until(lambda: self.proc.poll() is not None or self._ready(), timeout, 0.1) is None \
                or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"the daemon did not become ready:\n{self.log_tail()}")
        self.ready_at = time.time()
        return self

    def _ready(self) -> bool:
        try:
            return urllib.request.urlopen(self.url + "/-/ready", timeout=1,
                                          context=self.context).status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60) -> tuple[int | None, float]:
        """SIGTERM, then SIGKILL after `timeout`: (exit code, seconds it took to stop)."""
        if self.proc is None:
            return None, 0.0
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode, time.monotonic() - t0

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def log_events(self, msg: str | None = None) -> list[dict]:
        """The JSON log lines (of the event `msg`, if given); other output is passed over."""
        events = []
        with open(self.log, errors="replace") as f:
            for line in f:
                if not line.startswith("{"):
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if msg is None or event.get("msg") == msg:
                    events.append(event)
        return events

    def tracebacks(self) -> str:
        text = self.log_tail(10**7)
        i = text.find("Traceback")
        return "" if i < 0 else text[i:i + 2000]
