"""Benchmark: time from breaking an inbox to the daemon's alert in Alertmanager.

The daemon checks one lab inbox; each trial changes the inbox's password on the server at a
random moment and measures until the daemon's InboxCheckFailing alert is active in a real
Alertmanager, then restores the password and waits for the alert to resolve. The bound
(issue #4): failure_threshold x interval + one step timeout.

    .venv/bin/python bench/alert_latency.py [--trials 6] [--interval 10] [--timeout 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "daemon"), str(ROOT / "lab")]

import yaml  # noqa: E402
from maillab import MailLab  # noqa: E402
from maillab.promstack import Alertmanager  # noqa: E402

from inbox_exporter import logs  # noqa: E402
from inbox_exporter.daemon import Exporter  # noqa: E402


def wait_until(predicate, timeout: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic()
        time.sleep(0.05)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--interval", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--threshold", type=int, default=2)
    args = ap.parse_args()
    logs.setup("error")
    bound = args.threshold * args.interval + args.timeout

    with tempfile.TemporaryDirectory(prefix="inbox-bench-") as tmp, \
            MailLab(Path(tmp) / "lab") as lab, Alertmanager(Path(tmp)) as am:
        user = lab.add_user("latency", "right-password")
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump({
            "alerting": {"failure_threshold": args.threshold,
                         "alertmanager": {"url": am.url, "resend_interval": "5s"}},
            "inboxes": [{"name": "latency", "email": user.address, "password_env": "PW",
                         "interval": f"{args.interval:g}s", "timeout": f"{args.timeout:g}s",
                         "ca_file": str(lab.ca_file),
                         "imap": {"host": lab.host, "port": lab.ports.imaps, "security": "ssl"},
                         "smtp": {"host": lab.host, "port": lab.ports.submission,
                                  "security": "starttls"},
                         "test_email": {"to": lab.users["bcc"].address}}]}))
        exporter = Exporter(str(config), environ={"PW": "right-password"})
        exporter.start()
        latencies = []
        try:
            for _ in range(args.trials):
                time.sleep(random.uniform(0, args.interval))  # break at any phase of the cycle
                lab.set_password("latency", "broken-password")
                broken = time.monotonic()
                alerted = wait_until(lambda: am.alerts(inbox="latency"), bound + 30)
                latencies.append((alerted or float("inf")) - broken)
                lab.set_password("latency", "right-password")
                wait_until(lambda: not am.alerts(inbox="latency"), 4 * args.interval + 30)
        finally:
            exporter.stop(5)

    print(f"break -> daemon's alert active in Alertmanager, {args.trials} trials "
          f"(interval {args.interval:g} s, failure_threshold {args.threshold}, step timeout "
          f"{args.timeout:g} s; a wrong password fails within milliseconds):")
    print("  " + ", ".join(f"{x:.1f} s" for x in latencies))
    print(f"  median {statistics.median(latencies):.1f} s, max {max(latencies):.1f} s; bound "
          f"{bound:g} s: {'PASS' if max(latencies) <= bound else 'FAIL'}")


if __name__ == "__main__":
    main()
