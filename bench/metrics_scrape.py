"""Benchmark: /metrics with 10,000 inboxes (synthetic results in the store).

The real Exporter (config parsed, 10,000 scheduler jobs, HTTP server) with one synthetic
check result recorded per inbox (90 % healthy, 10 % failing), then /metrics scraped over
loopback. Targets (issue #3): scrape time < 200 ms, RSS < 250 MB.

    .venv/bin/python bench/metrics_scrape.py [--inboxes 10000] [--scrapes 20]
"""

from __future__ import annotations

import argparse
import gzip
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "daemon"))

import yaml  # noqa: E402

from inbox_exporter.daemon import Exporter  # noqa: E402
from inbox_exporter.model import (ALL_STEPS, Category, CertificateInfo, CheckResult,  # noqa: E402
                                  Diagnosis, Protocol, Reason, Status, StepResult)
from inbox_exporter.web import WebServer  # noqa: E402


def rss_mb(pid: int | str = "self") -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def synthetic(name: str, failing: bool, now: float) -> CheckResult:
    steps = []
    for step in ALL_STEPS:
        if failing and step.value == "imap_login":
            d = Diagnosis(Category.UNAUTHORIZED, Reason.AUTH_FAILED, "hint", "NO [AUTHENTICATIONFAILED]")
            steps.append(StepResult(step, Status.FAILED, 0.02, d))
        elif failing and step.value == "imap_validate":
            steps.append(StepResult(step, Status.SKIPPED, note="not run"))
        else:
            steps.append(StepResult(step, Status.OK, random.uniform(0.001, 0.05)))
    certs = tuple(CertificateInfo(p, now + 90 * 86400, True) for p in Protocol)
    return CheckResult(name, now, 0.1, tuple(steps), "0" * 32, certs)


def serve(config: str) -> None:
    """The exporter's process: load, schedule, record one synthetic result per inbox, serve.
    Prints its port, then runs until stdin closes."""
    t0 = time.perf_counter()
    exporter = Exporter(config)
    server = WebServer(("127.0.0.1", 0), exporter)
    exporter.start()
    server.start()
    startup = time.perf_counter() - t0
    now = time.time()
    for i, inbox in enumerate(exporter.config.inboxes):
        exporter.store.record(synthetic(inbox.name, i % 10 == 0, now), inbox)
    print(server.server_address[1], f"{startup:.2f}", flush=True)
    for line in sys.stdin:  # "change": one inbox gets a new result (the usual case)
        inbox = exporter.config.inboxes[1]
        exporter.store.record(synthetic(inbox.name, True, time.time()), inbox)
        print("ok", flush=True)
    exporter.stop(5)
    server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inboxes", type=int, default=10_000)
    ap.add_argument("--scrapes", type=int, default=20)
    ap.add_argument("--serve", metavar="CONFIG", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return

    with tempfile.TemporaryDirectory(prefix="inbox-bench-") as tmp:
        config = Path(tmp) / "config.yaml"
        # A closed loopback port and a day's interval: the scheduler holds every job, and the
        # few that fire during the run fail at once without leaving the machine.
        config.write_text(yaml.safe_dump({
            "defaults": {"interval": "24h", "timeout": "2s"},
            "inboxes": [{"name": f"inbox-{i:05d}", "email": f"user{i}@example.test",
                         "password": f"pw-{i}", "imap": {"host": "127.0.0.1", "port": 9},
                         "smtp": {"host": "127.0.0.1", "port": 9}}
                        for i in range(args.inboxes)]}))
        # The exporter runs in a process of its own, so that its RSS is not the client's.
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(config)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        try:
            port, startup = proc.stdout.readline().split()
            url = f"http://127.0.0.1:{port}/metrics"
            times = []
            for n in range(args.scrapes + 1):
                t0 = time.perf_counter()
                body = urllib.request.urlopen(url, timeout=30).read()
                elapsed = time.perf_counter() - t0
                if n:  # the first scrape renders every inbox; later ones reuse the cache
                    times.append(elapsed)
                else:
                    first = elapsed
            proc.stdin.write("change\n")
            proc.stdin.flush()
            proc.stdout.readline()
            t0 = time.perf_counter()
            urllib.request.urlopen(url, timeout=30).read()
            one_changed = time.perf_counter() - t0
            rss, hwm = rss_mb(proc.pid)
        finally:
            proc.stdin.close()
            proc.wait(timeout=30)
    t0 = time.perf_counter()
    gzip.compress(body, compresslevel=1)  # Prometheus asks for gzip: what it would add
    gz = time.perf_counter() - t0
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))

    med = statistics.median(times)
    print(f"/metrics with {args.inboxes} inboxes: {series} series, {len(body) / 1e6:.1f} MB "
          f"(start-up incl. config parse and {args.inboxes} jobs: {float(startup):.1f} s)")
    print(f"first scrape (renders every inbox): {first * 1e3:.0f} ms")
    print(f"scrape time over {args.scrapes} scrapes: median {med * 1e3:.0f} ms, "
          f"max {max(times) * 1e3:.0f} ms (target < 200 ms): {'PASS' if max(times) < 0.2 else 'FAIL'}")
    print(f"scrape after one inbox changed: {one_changed * 1e3:.0f} ms; "
          f"gzip level 1 of the body would add {gz * 1e3:.0f} ms")
    print(f"exporter RSS {rss:.0f} MB, peak {hwm:.0f} MB (target < 250 MB): "
          f"{'PASS' if hwm < 250 else 'FAIL'}")


if __name__ == "__main__":
    main()
