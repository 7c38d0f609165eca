"""Benchmark: a hanging server and a black-holed one must not starve healthy inboxes (issue #10).

N inboxes on a server that accepts TCP connections and then never says a word (127.0.0.2: the
TLS handshake or the greeting never comes) and N on a server that black-holes SYNs (an
iptables DROP rule for a 127.0.0.3 port: connects time out), beside M healthy inboxes on the
lab's real Dovecot and Postfix (127.0.0.1). `inbox-exporter run` runs as a process of its own
for a duration, first with only the M healthy inboxes (the baseline), then with all of them
(the outage), same settings; each run is a fresh daemon, and the broken servers exist only
during the outage run. They are other hosts than the lab: the per-host cap
(checks.max_connections_per_host) is per address, so on 127.0.0.1 they would share the
healthy inboxes' cap; `--blackhole-host 127.0.0.1` measures that case (with lab.blackhole()).

Measured in each run:
- per healthy inbox, its checks: the exact start times from /metrics
  (`inbox_last_check_timestamp_seconds`, with `inbox_check_success`), polled every 2 s, and
  merged at the end with /api/v1/status history (second resolution: it adds any check the
  polling missed). A check counts as done only if it passed.
- lateness, from those times alone: for each healthy inbox, its passed checks framed by the
  daemon's ready time and the end of the run; every gap longer than one interval is late by
  the excess (max(0, gap - interval)). On schedule, every gap is one interval (the first and
  last shorter); a check that comes late or never makes its gap grow. This needs nothing of
  the scheduler's internals (offsets, anchors, its own lag metric, which covers every inbox
  and only the checks that did start), and it is what a user sees: how stale the state got.
- /-/healthy, polled every 2 s with a 2 s timeout: any answer but 200, or none, fails.
- the daemon's threads (/proc/PID/status Threads, sampled every 0.5 s) and RSS, max.

Verdict PASS only if, in the outage run, every healthy inbox passed at least
floor(duration / interval) - 1 checks and none of its checks failed, the healthy lateness p95
is within the baseline's p95 + 1 s, no /-/healthy poll failed, and the daemon's threads stayed
below --max-threads (200: the daemon needs its check workers, `checks.concurrency`, 32 by
default, plus about ten more; far more means threads grow with the broken inboxes); and the
baseline meets the same counts, and the outage really happened (the silent server accepted
connections, the black-holed inboxes' checks failed). Exits 1 on FAIL.

    .venv/bin/python bench/outage.py [--hanging 500] [--blackholed 500] [--healthy 30]
                                     [--duration 90] [--interval 20] [--timeout 10]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import math
import re
import secrets
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from benchlab import NOT_RUN_NO_SLOT, Daemon, Report, get_json, percentile, proc_status, scrape, total

import yaml

from maillab import MailLab

HANG_HOST = "127.0.0.2"
BLACKHOLE_HOST = "127.0.0.3"
POLL = 2.0  # seconds between /-/healthy polls (also their timeout) and /metrics polls
SAMPLE = 0.5  # seconds between /proc samples
PASSWORD_ENV = "OUTAGE_PASSWORD"  # the hanging and black-holed inboxes' (never used) password
CHECK_LINE = re.compile(rb'^(inbox_last_check_timestamp_seconds|inbox_check_success)'
                        rb'\{inbox="(healthy-\d+)"\} (\S+)$', re.M)


# --- the broken servers ----------------------------------------------------------------------

class SilentServer:
    """Accepts every TCP connection on `host` and never sends a byte: a hung mail server (the
    handshake completes, the greeting or TLS handshake never comes). What a client sends is
    read and dropped; a connection is closed when its client closes it. At most `max_held`
    are held (beyond that, accepted and closed at once, counted); the loop ends at stop() or
    at `deadline` (monotonic), whichever comes first."""

    def __init__(self, host: str, deadline: float, max_held: int = 4096):
        self.sock = socket.create_server((host, 0), backlog=1024)
        self.sock.setblocking(False)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.deadline, self.max_held = deadline, max_held
        self.accepted = self.dropped = self.peak = 0
        self._held: set[socket.socket] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="silent-server", daemon=True)

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        try:
            while not self._stop.is_set() and time.monotonic() < self.deadline:
                # Closes before accepts: a client's next connection (after it closed one)
                # must not count as held at once with the one it closed.
                events = sorted(sel.select(timeout=0.2), key=lambda e: e[0].fileobj is self.sock)
                for key, _ in events:
                    if key.fileobj is self.sock:
                        self._accept(sel)
                    else:
                        self._read(sel, key.fileobj)
        finally:
            for conn in self._held:
                conn.close()
            self._held.clear()
            sel.close()
            self.sock.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(64):  # a burst at most; the rest at the next select
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.accepted += 1
            if len(self._held) >= self.max_held:
                self.dropped += 1
                conn.close()
                continue
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ)
            self._held.add(conn)
            self.peak = max(self.peak, len(self._held))

    def _read(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the client gave up: let the connection go
            sel.unregister(conn)
            self._held.discard(conn)
            conn.close()


@contextlib.contextmanager
def blackhole(lab, host: str):
    """A TCP port on `host` where connects time out: lab.blackhole() on the lab's own address,
    else the same kind of iptables DROP rule for `host`, tagged with the lab's id so that
    lab.stop() removes it too if this never gets to."""
    if host == lab.host:
        with lab.blackhole() as port:
            yield port
        return
    with socket.socket() as s:  # a port nobody listens on: without the rule, connects are refused
        s.bind((host, 0))
        port = s.getsockname()[1]
    rule = ["INPUT", "-i", "lo", "-p", "tcp", "-d", host, "--dport", str(port),
            "-m", "comment", "--comment", f"maillab-{lab.id}", "-j", "DROP"]
    subprocess.run(["iptables", "-w", "10", "-I", *rule], check=True, capture_output=True, timeout=30)
    try:
        yield port
    finally:
        subprocess.run(["iptables", "-w", "10", "-D", *rule], capture_output=True, timeout=30)


def connect_outcome(host: str, port: int, timeout: float = 0.5) -> str:
    """What a client sees within `timeout`: 'no connect', 'silent', 'refused' or 'talks'."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            try:
                return "talks" if s.recv(1) else "closed"
            except TimeoutError:
                return "silent"
    except TimeoutError:
        return "no connect"
    except ConnectionRefusedError:
        return "refused"


# --- watching the daemon -------------------------------------------------------------------

class Observer:
    """Polls a running daemon until `until` (monotonic): /-/healthy and /metrics every POLL
    seconds, each on a thread of its own (a slow /metrics never delays a health poll)."""

    def __init__(self, daemon: Daemon, until: float):
        self.daemon, self.until, self.t0 = daemon, until, time.monotonic()
        self.health_polls = 0
        self.health_failures: list[str] = []  # "t+12s: 503" / "t+14s: timed out"
        self.checks: dict[str, dict[float, bool]] = collections.defaultdict(dict)  # exact
        self.scrapes: list[float] = []
        self.scrape_errors = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._every, args=(f,), daemon=True)
                         for f in (self._health, self._metrics)]

    def __enter__(self) -> Observer:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)

    def _every(self, poll) -> None:
        k = 0
        while not self._stop.is_set():
            at = self.t0 + k * POLL
            if at > self.until:
                return
            if self._stop.wait(max(0.0, at - time.monotonic())):
                return
            poll()
            k = max(k + 1, math.ceil((time.monotonic() - self.t0) / POLL))  # no catch-up burst

    def _health(self) -> None:
        self.health_polls += 1
        t = time.monotonic() - self.t0
        try:
            code = urllib.request.urlopen(self.daemon.url + "/-/healthy", timeout=POLL).status
        except urllib.error.HTTPError as e:
            code = e.code
        except OSError as e:
            code = f"no answer ({type(e).__name__})"
        if code != 200:
            self.health_failures.append(f"t+{t:.0f}s: {code}")

    def _metrics(self) -> None:
        t0 = time.monotonic()
        try:
            body = urllib.request.urlopen(self.daemon.url + "/metrics", timeout=10).read()
        except OSError:
            self.scrape_errors += 1
            return
        self.scrapes.append(time.monotonic() - t0)
        self.record(body)

    def record(self, body: bytes) -> None:
        latest: dict[str, dict[bytes, float]] = collections.defaultdict(dict)
        for family, inbox, value in CHECK_LINE.findall(body):
            latest[inbox.decode()][family] = float(value)
        for inbox, v in latest.items():
            ts = v.get(b"inbox_last_check_timestamp_seconds", math.nan)
            if not math.isnan(ts):
                self.checks[inbox][ts] = v.get(b"inbox_check_success") == 1.0

    def final(self) -> None:
        """One more /metrics after the end (checks that started before it have finished)."""
        self._metrics()


# --- one run --------------------------------------------------------------------------------

@dataclass
class Run:
    label: str
    hanging: int = 0
    blackholed: int = 0
    passed: dict[str, int] = field(default_factory=dict)  # healthy inbox -> passed checks
    failed: dict[str, int] = field(default_factory=dict)  # healthy inbox -> failed checks
    lateness: list[float] = field(default_factory=list)  # seconds, one per gap
    from_history: int = 0  # checks the polling missed, taken from /api/v1/status
    health_polls: int = 0
    health_failures: list[str] = field(default_factory=list)
    threads_max: int = 0
    rss_max: float = 0.0
    scrapes: list[float] = field(default_factory=list)
    scrape_errors: int = 0
    alive: bool = True
    stop_seconds: float = 0.0
    exit_code: int | None = None
    skipped: float = 0.0
    late_1s: float = 0.0
    lag_count: float = 0.0
    broken: dict[str, collections.Counter] = field(default_factory=dict)  # group -> reasons
    broken_checked: dict[str, int] = field(default_factory=dict)  # group -> inboxes checked
    no_slot: collections.Counter = field(default_factory=collections.Counter)  # group -> steps
    silent_accepted: int = 0
    silent_peak: int = 0
    crash: str = ""

    def p(self, q: float) -> float:
        return percentile(self.lateness, q)


def group(name: str) -> str:
    return name.split("-", 1)[0]


def run(lab, tmp: Path, label: str, args, healthy: list, outage: bool) -> Run:
    out = Run(label)
    work = tmp / label
    work.mkdir()
    env = {f"PW_HEALTHY_{i:02d}": u.password for i, u in enumerate(healthy)}
    env[PASSWORD_ENV] = secrets.token_urlsafe(12)
    inboxes = [{"name": f"healthy-{i:02d}", "email": u.address, "password_env": f"PW_HEALTHY_{i:02d}",
                "imap": {"host": lab.host, "port": lab.ports.imaps, "security": "ssl"},
                "smtp": {"host": lab.host, "port": lab.ports.submission, "security": "starttls"}}
               for i, u in enumerate(healthy)]
    with contextlib.ExitStack() as stack:
        if outage:
            end_bound = time.monotonic() + args.duration + 120
            silent = stack.enter_context(SilentServer(HANG_HOST, end_bound))
            hole = stack.enter_context(blackhole(lab, args.blackhole_host))
            # The outage must be what it claims, or the run proves nothing.
            seen = (connect_outcome(HANG_HOST, silent.port),
                    connect_outcome(args.blackhole_host, hole))
            if seen != ("silent", "no connect"):
                raise SystemExit(f"the broken servers are not broken as they should be: {seen}")
            probes = silent.accepted  # ours, just now: not the daemon's
            out.hanging, out.blackholed = args.hanging, args.blackholed
            inboxes += [broken_inbox(f"hang-{i:04d}", HANG_HOST, silent.port) for i in range(args.hanging)]
            inboxes += [broken_inbox(f"blackhole-{i:04d}", args.blackhole_host, hole)
                        for i in range(args.blackholed)]
        config = work / "config.yaml"
        config.write_text(yaml.safe_dump({
            "checks": {"concurrency": args.concurrency, "max_connections_per_host": args.per_host},
            "defaults": {"interval": f"{args.interval}s", "timeout": f"{args.timeout}s",
                         "ca_file": str(lab.ca_file),
                         "test_email": {"to": lab.users["bcc"].address}},
            "inboxes": inboxes}))
        daemon = Daemon(config, work / "daemon.log", env=env, grace="5s")
        daemon.start(timeout=120)
        try:
            end = time.monotonic() + args.duration
            end_wall = daemon.ready_at + args.duration
            with Observer(daemon, end) as observer:
                while time.monotonic() < end and daemon.alive():  # bounded by the duration
                    try:
                        status = proc_status(daemon.pid)
                    except OSError:
                        break
                    out.threads_max = max(out.threads_max, int(status["Threads"]))
                    out.rss_max = max(out.rss_max, int(status["VmRSS"].split()[0]) / 1024)
                    time.sleep(SAMPLE)
            out.alive = daemon.alive()
            time.sleep(2)  # checks that started before the end finish (healthy ones take ms)
            observer.final()
            history = get_json(daemon.url + "/api/v1/status", timeout=60)["inboxes"]
            metrics = scrape(daemon.url, timeout=60)
        finally:
            out.exit_code, out.stop_seconds = daemon.stop(timeout=30)  # grace 5 s: plenty
        if outage:
            out.silent_accepted, out.silent_peak = silent.accepted - probes, silent.peak
    out.health_polls, out.health_failures = observer.health_polls, observer.health_failures
    out.scrapes, out.scrape_errors = observer.scrapes, observer.scrape_errors
    tally(out, args, observer.checks, history, daemon.ready_at, end_wall)
    out.skipped = total(metrics, "inbox_exporter_checks_skipped_total")
    out.lag_count = total(metrics, "inbox_exporter_scheduling_lag_seconds_count")
    out.late_1s = out.lag_count - total(metrics, "inbox_exporter_scheduling_lag_seconds_bucket", le="1.0")
    for labels, value in metrics.get("inbox_check_failures_total", []):
        g = group(labels["inbox"])
        out.broken.setdefault(g, collections.Counter())[labels["reason"]] += value
    for labels, value in metrics.get("inbox_last_check_timestamp_seconds", []):
        if not math.isnan(value):
            out.broken_checked[group(labels["inbox"])] = out.broken_checked.get(group(labels["inbox"]), 0) + 1
    for e in daemon.log_events("step failed"):
        if str(e.get("detail", "")).startswith(NOT_RUN_NO_SLOT):
            out.no_slot[group(str(e.get("inbox", "?")))] += 1
    out.crash = daemon.tracebacks()
    return out


def broken_inbox(name: str, host: str, port: int) -> dict:
    return {"name": name, "email": f"{name}@example.test", "password_env": PASSWORD_ENV,
            "imap": {"host": host, "port": port, "security": "ssl"},
            "smtp": {"host": host, "port": port, "security": "starttls"}}


def tally(out: Run, args, polled: dict[str, dict[float, bool]], statuses: list[dict],
          start: float, end: float) -> None:
    """Per healthy inbox: its checks (exact polled times, plus any the polling missed from
    the status history, at mid-second), passed and failed, and the lateness of its gaps."""
    for st in statuses:
        name = st["name"]
        if group(name) != "healthy":
            continue
        checks = dict(polled.get(name, {}))
        seconds = {math.floor(ts) for ts in checks}
        for h in st["history"]:
            sec = datetime.fromisoformat(h["started_at"]).timestamp()
            if sec not in seconds:
                checks[sec + 0.5] = bool(h["ok"])
                out.from_history += 1
        times = sorted(ts for ts in checks if ts <= end)
        passed = [ts for ts in times if checks[ts]]
        out.passed[name] = len(passed)
        out.failed[name] = len(times) - len(passed)
        frame = [min([start, *passed]), *passed, end]
        out.lateness += [max(0.0, b - a - args.interval) for a, b in itertools.pairwise(frame)]


# --- the report -----------------------------------------------------------------------------

def report(base: Run, outage: Run, args) -> bool:
    need = math.floor(args.duration / args.interval) - 1

    def row(what: str, f) -> None:
        print(f"  {what:<46}{f(base):>24}{f(outage):>24}")

    def ms(values: list[float]) -> str:
        return (f"{statistics.median(values) * 1e3:.0f} / {max(values) * 1e3:.0f}"
                if values else "none")

    print(f"  {'':<46}{'baseline':>24}{'outage':>24}")
    row("inboxes: healthy / hanging / black-holed",
        lambda r: f"{len(r.passed)} / {r.hanging} / {r.blackholed}")
    row("healthy passed checks per inbox: min / median",
        lambda r: f"{min(r.passed.values(), default=0)} / {statistics.median(r.passed.values() or [0]):g}")
    row(f"healthy inboxes with < {need} passed checks", lambda r: sum(v < need for v in r.passed.values()))
    row("healthy checks failed", lambda r: sum(r.failed.values()))
    row("healthy lateness p50 / p95 / max (s)",
        lambda r: f"{r.p(50):.2f} / {r.p(95):.2f} / {max(r.lateness, default=math.nan):.2f}")
    row("  (checks the polling missed, from history)", lambda r: r.from_history)
    row("/-/healthy polls failed / made", lambda r: f"{len(r.health_failures)} / {r.health_polls}")
    row("daemon threads, max", lambda r: r.threads_max)
    row("daemon RSS max (MB)", lambda r: f"{r.rss_max:.0f}")
    row("/metrics poll median / max (ms)", lambda r: ms(r.scrapes))
    row("/metrics polls without an answer in 10 s", lambda r: r.scrape_errors)
    row("checks started > 1 s late / all (lag metric)", lambda r: f"{r.late_1s:.0f} / {r.lag_count:.0f}")
    row("checks skipped (previous still running)", lambda r: f"{r.skipped:.0f}")
    row("steps 'not run: no connection slot', healthy", lambda r: r.no_slot.get("healthy", 0))
    row("daemon alive to the end", lambda r: "yes" if r.alive else "no")
    row("daemon stop after SIGTERM: s (exit code)", lambda r: f"{r.stop_seconds:.1f} ({r.exit_code})")
    for g, n in (("hang", outage.hanging), ("blackhole", outage.blackholed)):
        by_reason = outage.broken.get(g, collections.Counter()).most_common()
        reasons = ", ".join(f"{k} {v:g}" for k, v in by_reason)
        print(f"  outage, {g} inboxes: {outage.broken_checked.get(g, 0)} of {n} checked at least once; "
              f"failures by reason: {reasons or 'none'}; steps never given a slot: "
              f"{outage.no_slot.get(g, 0)}")
    print(f"  silent server ({HANG_HOST}): {outage.silent_accepted} connections accepted, "
          f"at most {outage.silent_peak} held at once")
    for r in (base, outage):
        if r.health_failures:
            print(f"  {r.label}: failed /-/healthy polls: {', '.join(r.health_failures[:12])}"
                  f"{' ...' if len(r.health_failures) > 12 else ''}")
        if r.crash:
            print(f"  {r.label}: the daemon's log holds a traceback:\n{r.crash}")

    verdict = Report()
    check = verdict.check
    for r in (outage, base):
        short = [n for n, v in r.passed.items() if v < need]
        check(len(r.passed) == args.healthy and not short,
              f"{r.label}: every healthy inbox passed >= {need} checks (floor({args.duration:g} / "
              f"{args.interval}) - 1): {len(short)} of {args.healthy} did not"
              f"{' (' + ', '.join(short[:5]) + ')' if short else ''}")
        check(sum(r.failed.values()) == 0,
              f"{r.label}: healthy checks failed: {sum(r.failed.values())} == 0")
        check(not r.health_failures and r.health_polls > 0,
              f"{r.label}: /-/healthy polls failed: {len(r.health_failures)} of {r.health_polls} == 0")
        check(r.threads_max < args.max_threads,
              f"{r.label}: daemon threads max {r.threads_max} < {args.max_threads}")
        check(r.alive, f"{r.label}: the daemon ran to the end")
    check(outage.p(95) <= base.p(95) + 1.0,
          f"outage: healthy lateness p95 {outage.p(95):.2f} s <= baseline p95 {base.p(95):.2f} s + 1 s")
    check(outage.silent_accepted > 0 and sum(outage.broken.get("blackhole", {}).values()) > 0,
          f"outage happened: the silent server accepted {outage.silent_accepted} connections, the "
          f"black-holed inboxes failed {sum(outage.broken.get('blackhole', {}).values()):g} times")
    return verdict.failed == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hanging", type=int, default=500, help="inboxes on the silent server")
    ap.add_argument("--blackholed", type=int, default=500, help="inboxes on the black-holed port")
    ap.add_argument("--healthy", type=int, default=30, help="inboxes on the lab (one user each)")
    ap.add_argument("--duration", type=float, default=90, help="seconds per run")
    ap.add_argument("--interval", type=int, default=20, help="seconds, every inbox")
    ap.add_argument("--timeout", type=int, default=10, help="seconds per step, every inbox")
    ap.add_argument("--concurrency", type=int, default=32, help="checks.concurrency")
    ap.add_argument("--per-host", type=int, default=10, help="checks.max_connections_per_host")
    ap.add_argument("--max-threads", type=int, default=200, help="the daemon's thread bound")
    ap.add_argument("--blackhole-host", default=BLACKHOLE_HOST,
                    help=f"the black-holed server's address (default {BLACKHOLE_HOST}; the lab's "
                         "127.0.0.1 puts it under the healthy inboxes' per-host cap)")
    args = ap.parse_args()
    if not 1 <= args.healthy <= 99 or args.duration < 2 * args.interval:
        ap.error("--healthy must be 1..99 and --duration at least two intervals")

    started = time.monotonic()
    print(f"outage benchmark: {args.healthy} healthy inboxes (lab Dovecot + Postfix, 127.0.0.1), "
          f"then the same beside {args.hanging} on a silent server ({HANG_HOST}) and "
          f"{args.blackholed} on a black-holed port ({args.blackhole_host}); interval "
          f"{args.interval} s, timeout {args.timeout} s, checks.concurrency {args.concurrency}, "
          f"max_connections_per_host {args.per_host}; {args.duration:g} s per run", flush=True)
    with tempfile.TemporaryDirectory(prefix="inbox-outage-") as tmp, \
            MailLab(Path(tmp) / "lab") as lab:
        healthy = [lab.add_user(f"healthy{i}", secrets.token_urlsafe(12)) for i in range(args.healthy)]
        base = run(lab, Path(tmp), "baseline", args, healthy, outage=False)
        outage = run(lab, Path(tmp), "outage", args, healthy, outage=True)
    ok = report(base, outage, args)
    print(f"{'PASS' if ok else 'FAIL'}: healthy inboxes beside a hanging and a black-holed server "
          f"({time.monotonic() - started:.0f} s in all)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
