"""Benchmark: transcripts and history at 10,000 inboxes (issue #13), and the pages drawn from them.

Two real checks against the lab give real results and transcripts: a healthy inbox (test email
sent) and a wrong password. The exporter, in a process of its own (its RSS is its own), is
loaded with 10,000 inboxes, and each gets 100 results recorded through the store as checks
would (90 % healthy, a failing tenth): the history ring fills, every inbox keeps the transcript
of its last check and of its last failure, each packed from its own text (the inbox's name and
probe id substituted: no two share an object). Measured: the bytes held (history records +
packed transcripts), the process's RSS before and after, and the time to serve `/` (every row
with its strip) and `/inbox/NAME` over HTTP.

Targets: transcripts + history < 50 MB (the bytes held, and the RSS growth beyond a baseline
process filled with the same results without transcripts or history); /inbox/NAME
p95 < 50 ms; / < 3 s. Cold (the first fetch of each page) counts.

    .venv/bin/python bench/history_pages.py [--inboxes 10000] [--checks 100]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

from benchlab import ROOT, Report, lab_inbox, percentile, rss_mb

import yaml

MEMORY_TARGET_MB = 50.0
INBOX_PAGE_TARGET = 0.05
STATUS_PAGE_TARGET = 3.0


def real_results(tmp: Path) -> tuple:
    """A healthy and a failing check against the lab, pickled for the exporter's process."""
    from inbox_exporter.check import Checker
    from maillab import MailLab

    with MailLab(tmp / "lab") as lab:
        good = Checker().check(lab_inbox(lab))
        bad = Checker().check(lab_inbox(lab, password="wrong-password"))
    assert good.ok and not bad.ok and good.transcript and bad.transcript
    return good, bad


def serve(config: str, results: str, inboxes: int, checks: int, baseline: bool) -> None:
    """The exporter's process: fill, report bytes and RSS, serve until stdin closes.
    `baseline`: the same results without transcripts and with no history kept, so that the
    difference of the two processes' RSS growth is what transcripts and history cost."""
    import pickle

    from inbox_exporter.daemon import Exporter
    from inbox_exporter.transcript import pack, unpack
    from inbox_exporter.web import WebServer

    good, bad = pickle.loads(Path(results).read_bytes())
    texts = {True: unpack(good.transcript), False: unpack(bad.transcript)}
    exporter = Exporter(config)
    server = WebServer(("127.0.0.1", 0), exporter)
    exporter.start()
    server.start()
    if baseline:
        exporter.history.add = lambda name, result: None  # type: ignore[method-assign]  # the baseline
    rss_before, _ = rss_mb("self")
    t0 = time.time() - checks * 60
    rng = random.Random(7)
    for i, inbox in enumerate(exporter.config.inboxes):
        failing_now = i % 10 == 0
        for n in range(checks):
            ok = not (failing_now and n >= checks - 3) and rng.random() > 0.02
            base = good if ok else bad
            packed = None
            if not baseline and (n >= checks - 2 or not ok):  # only these can end up kept: pack them for real
                packed = pack(texts[ok].replace("bench", inbox.name).replace(
                    base.probe_id, f"p1{i:060d}"))
            result = replace(base, inbox=inbox.name, started_at=t0 + n * 60, transcript=packed)
            exporter.store.record(result, inbox)
    rss_after, hwm = rss_mb("self")
    held = exporter.history.nbytes()
    transcripts = 0
    for state in exporter.store.snapshot():
        last = state.last.transcript if state.last else None
        transcripts += len(last or b"")
        if state.failure_transcript is not None and state.failure_transcript is not last:
            transcripts += len(state.failure_transcript)
    print(json.dumps({"port": server.server_address[1], "history_bytes": held,
                      "transcript_bytes": transcripts, "rss_before": rss_before,
                      "rss_after": rss_after, "hwm": hwm}), flush=True)
    for _ in sys.stdin:
        pass
    exporter.stop(5)
    server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inboxes", type=int, default=10_000)
    ap.add_argument("--checks", type=int, default=100)
    ap.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], args.serve[1], args.inboxes, args.checks, args.baseline)
        return 0
    import pickle

    report = Report()
    with tempfile.TemporaryDirectory(prefix="inbox-bench-history-") as tmp_dir:
        tmp = Path(tmp_dir)
        good, bad = real_results(tmp)
        (tmp / "results.pickle").write_bytes(pickle.dumps((good, bad)))
        config = tmp / "config.yaml"
        config.write_text(yaml.safe_dump({
            "defaults": {"interval": "24h", "timeout": "2s"},
            "inboxes": [{"name": f"inbox-{i:05d}", "email": f"u{i}@example.test", "password": "pw",
                         "imap": {"host": "127.0.0.1", "port": 9},
                         "smtp": {"host": "127.0.0.1", "port": 9}} for i in range(args.inboxes)]}))
        def start(*extra: str) -> subprocess.Popen:
            return subprocess.Popen(
                [sys.executable, __file__, "--serve", str(config), str(tmp / "results.pickle"),
                 "--inboxes", str(args.inboxes), "--checks", str(args.checks), *extra],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env={"PYTHONPATH": str(ROOT / "daemon"), "PATH": "/usr/bin:/bin"})

        proc = start("--baseline")
        base = json.loads(proc.stdout.readline())
        proc.stdin.close()
        proc.wait(60)
        proc = start()
        try:
            facts = json.loads(proc.stdout.readline())
            url = f"http://127.0.0.1:{facts['port']}"

            def timed(path: str, gzip: bool = False) -> tuple[float, int]:
                request = urllib.request.Request(
                    url + path, headers={"Accept-Encoding": "gzip"} if gzip else {})
                t0 = time.perf_counter()
                with urllib.request.urlopen(request, timeout=60) as response:
                    body = response.read()
                    assert (response.headers.get("Content-Encoding") == "gzip") == gzip
                return time.perf_counter() - t0, len(body)

            status = [timed("/") for _ in range(3)]  # the first is the cold one
            status_gzip = [timed("/", gzip=True) for _ in range(3)]  # what a browser fetches
            names = [f"inbox-{i:05d}" for i in random.Random(1).sample(range(args.inboxes), 50)]
            pages = [timed(f"/inbox/{n}") for n in names]
            failing_page = urllib.request.urlopen(url + "/inbox/inbox-00000", timeout=10).read()
        finally:
            proc.stdin.close()
            proc.wait(60)
    held_mb = (facts["history_bytes"] + facts["transcript_bytes"]) / 1e6
    base_growth = base["rss_after"] - base["rss_before"]
    growth = facts["rss_after"] - facts["rss_before"] - base_growth
    report.info(f"{args.inboxes} inboxes x {args.checks} results: history "
                f"{facts['history_bytes'] / 1e6:.1f} MB, transcripts (last + last failure, packed) "
                f"{facts['transcript_bytes'] / 1e6:.1f} MB; real transcripts: healthy "
                f"{len(good.transcript)} B packed, failing {len(bad.transcript)} B")
    report.check(held_mb < MEMORY_TARGET_MB and growth < MEMORY_TARGET_MB,
                 f"memory: {held_mb:.1f} MB held; RSS growth while filling {growth + base_growth:.0f} "
                 f"MB, of which {growth:.0f} MB beyond the same fill without transcripts and history "
                 f"({base_growth:.0f} MB: results, counters, /metrics text) "
                 f"(target < {MEMORY_TARGET_MB:.0f} MB)")
    p95 = percentile([t for t, _ in pages], 95)
    report.check(p95 < INBOX_PAGE_TARGET,
                 f"/inbox/NAME: 50 pages, median {statistics.median(t for t, _ in pages) * 1e3:.1f} "
                 f"ms, p95 {p95 * 1e3:.1f} ms, {pages[0][1] / 1e3:.0f} KB "
                 f"(target p95 < {INBOX_PAGE_TARGET * 1e3:.0f} ms)")
    report.check(max(t for t, _ in status) < STATUS_PAGE_TARGET,
                 f"/: cold {status[0][0]:.2f} s, then {status[1][0]:.2f} s, {status[2][0]:.2f} s; "
                 f"{status[0][1] / 1e6:.1f} MB of HTML for {args.inboxes} rows with strips "
                 f"(target < {STATUS_PAGE_TARGET:.0f} s)")
    report.check(max(t for t, _ in status_gzip) < STATUS_PAGE_TARGET,
                 f"/ gzipped (as a browser asks): {', '.join(f'{t:.2f} s' for t, _ in status_gzip)}; "
                 f"{status_gzip[0][1] / 1e6:.2f} MB sent (target < {STATUS_PAGE_TARGET:.0f} s)")
    report.check(b"Transcript: last check" in failing_page and b"<rect" in failing_page,
                 "a failing inbox's page shows its strip and its transcript")
    print(f"{'PASS' if report.failed == 0 else 'FAIL'}: history and transcripts at "
          f"{args.inboxes} inboxes")
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
