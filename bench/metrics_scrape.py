"""Benchmark: /metrics with 10,000 inboxes (synthetic results in the store).

The real Exporter (config parsed, 10,000 scheduler jobs, HTTP server) with one synthetic
check result recorded per inbox (90 % healthy, 10 % failing), then /metrics scraped over
loopback: the first (cold) scrape, which renders every inbox; warm scrapes, nothing changed;
and scrapes under churn, each after new results were recorded for a random quarter of the
inboxes (the recording is not timed). Targets (issue #3): every scrape, cold, warm and under
churn, < 200 ms; RSS < 250 MB.

    .venv/bin/python bench/metrics_scrape.py [--inboxes 10000] [--scrapes 20] [--churn-scrapes 5]
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

from benchlab import rss_mb  # noqa: E402 - sets the import paths

import yaml  # noqa: E402

from inbox_exporter.daemon import Exporter  # noqa: E402
from inbox_exporter.model import (ALL_STEPS, Category, CertificateInfo, CheckResult,  # noqa: E402
                                  Diagnosis, Protocol, Reason, Status, StepResult)
from inbox_exporter.web import WebServer  # noqa: E402

TARGET = 0.2  # seconds per scrape
CHURN = 0.25  # share of the inboxes with a new result between two churn scrapes


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
    Prints its port, then obeys stdin until it closes: "change" records a new result for one
    inbox (the usual case), "churn" for a random quarter of them; each answers "ok"."""
    t0 = time.perf_counter()
    exporter = Exporter(config)
    server = WebServer(("127.0.0.1", 0), exporter)
    exporter.start()
    server.start()
    startup = time.perf_counter() - t0
    now = time.time()
    inboxes = exporter.config.inboxes
    for i, inbox in enumerate(inboxes):
        exporter.store.record(synthetic(inbox.name, i % 10 == 0, now), inbox)
    print(server.server_address[1], f"{startup:.2f}", flush=True)
    for line in sys.stdin:
        changed = [inboxes[1]] if line.strip() == "change" else random.sample(
            inboxes, round(CHURN * len(inboxes)))
        for inbox in changed:  # a new state: some recover, some start failing
            exporter.store.record(synthetic(inbox.name, random.random() < 0.1, time.time()), inbox)
        print("ok", flush=True)
    exporter.stop(5)
    server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inboxes", type=int, default=10_000)
    ap.add_argument("--scrapes", type=int, default=20, help="warm scrapes")
    ap.add_argument("--churn-scrapes", type=int, default=5,
                    help=f"scrapes, each after {CHURN:.0%} of the inboxes changed")
    ap.add_argument("--serve", metavar="CONFIG", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return 0

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

            def timed_scrape(command: str | None = None) -> tuple[float, bytes]:
                if command:  # the state changes first (not timed)
                    proc.stdin.write(command + "\n")
                    proc.stdin.flush()
                    assert proc.stdout.readline().strip() == "ok"
                t0 = time.perf_counter()
                body = urllib.request.urlopen(url, timeout=30).read()
                return time.perf_counter() - t0, body

            cold, body = timed_scrape()  # renders every inbox: nothing cached yet
            warm = [timed_scrape()[0] for _ in range(args.scrapes)]
            one_changed, _ = timed_scrape("change")
            churn = [timed_scrape("churn")[0] for _ in range(args.churn_scrapes)]
            rss, hwm = rss_mb(proc.pid)
        finally:
            proc.stdin.close()
            proc.wait(timeout=30)
    t0 = time.perf_counter()
    gzip.compress(body, compresslevel=1)  # Prometheus asks for gzip: what it would add
    gz = time.perf_counter() - t0
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))

    def verdict(seconds: float) -> str:
        return "PASS" if seconds < TARGET else "FAIL"

    print(f"/metrics with {args.inboxes} inboxes: {series} series, {len(body) / 1e6:.1f} MB "
          f"(start-up incl. config parse and {args.inboxes} jobs: {float(startup):.1f} s); "
          f"target per scrape < {TARGET * 1e3:.0f} ms")
    print(f"cold: first scrape (renders every inbox): {cold * 1e3:.0f} ms: {verdict(cold)}")
    print(f"warm: {args.scrapes} scrapes, nothing changed: median {statistics.median(warm) * 1e3:.0f} ms, "
          f"max {max(warm) * 1e3:.0f} ms: {verdict(max(warm))}")
    print(f"churn: {args.churn_scrapes} scrapes, each after {CHURN:.0%} of the inboxes got a new "
          f"result: median {statistics.median(churn) * 1e3:.0f} ms, max {max(churn) * 1e3:.0f} ms: "
          f"{verdict(max(churn))}")
    print(f"scrape after one inbox changed: {one_changed * 1e3:.0f} ms: {verdict(one_changed)}; "
          f"gzip level 1 of the body would add {gz * 1e3:.0f} ms")
    print(f"exporter RSS {rss:.0f} MB, peak {hwm:.0f} MB (target < 250 MB): "
          f"{'PASS' if hwm < 250 else 'FAIL'}")
    ok = max(cold, *warm, one_changed, *churn) < TARGET and hwm < 250
    print(f"every scrape (cold, warm, one changed, churn) < {TARGET * 1e3:.0f} ms and RSS < 250 MB: "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
