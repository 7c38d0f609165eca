"""Benchmark: time from breaking an inbox to the daemon's alert in Alertmanager.

The daemon checks one lab inbox; each trial changes the inbox's password on the server at a
random moment and measures until the daemon's InboxCheckFailing alert, one that started after
the break, is active in a real Alertmanager, then restores the password. A trial starts only
from a clean state: the inbox's last check passed, the daemon has no alert firing, and
Alertmanager shows none for the inbox (the previous trial's alert resolved there). That is
waited for, bounded; a trial that cannot start cleanly is a failure, and so are the trials
after it. The first trial is the cold one (a fresh daemon and Alertmanager). The bound
(issue #4): failure_threshold x interval + one step timeout, for every trial.

    .venv/bin/python bench/alert_latency.py [--trials 6] [--interval 10] [--timeout 5]
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from benchlab import wait_until

import yaml

from inbox_exporter import logs
from inbox_exporter.daemon import Exporter
from maillab import MailLab
from maillab.promstack import Alertmanager

INBOX = "latency"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--interval", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--threshold", type=int, default=2)
    args = ap.parse_args()
    logs.setup("error")
    bound = args.threshold * args.interval + args.timeout
    # Clean again within: a check with the right password (interval + its deadline), then the
    # resolved notification to Alertmanager; generous, but bounded.
    settle = 2 * args.interval + 4 * args.timeout + 30

    with tempfile.TemporaryDirectory(prefix="inbox-bench-") as tmp, \
            MailLab(Path(tmp) / "lab") as lab, Alertmanager(Path(tmp)) as am:
        user = lab.add_user(INBOX, "right-password")
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump({
            "alerting": {"failure_threshold": args.threshold,
                         "alertmanager": {"url": am.url, "resend_interval": "5s"}},
            "inboxes": [{"name": INBOX, "email": user.address, "password_env": "PW",
                         "interval": f"{args.interval:g}s", "timeout": f"{args.timeout:g}s",
                         "ca_file": str(lab.ca_file),
                         "imap": {"host": lab.host, "port": lab.ports.imaps, "security": "ssl"},
                         "smtp": {"host": lab.host, "port": lab.ports.submission,
                                  "security": "starttls"},
                         "test_email": {"to": lab.users["bcc"].address}}]}))
        exporter = Exporter(str(config), environ={"PW": "right-password"})

        def clean() -> bool:
            state = exporter.store.get(INBOX)
            return (state is not None and state.last is not None and state.last.ok
                    and not any(a.inbox == INBOX for a in exporter.alerts.transitions.firing())
                    and not am.alerts(inbox=INBOX))

        def alerted_since(wall: float) -> bool:
            return any(datetime.fromisoformat(a["startsAt"]).timestamp() >= wall - 2
                       for a in am.alerts(inbox=INBOX))

        exporter.start()
        latencies: list[float] = []  # inf: no alert within the wait
        waits: list[float] = []  # seconds until the trial could start cleanly
        not_started = 0
        try:
            for _ in range(args.trials):
                t0 = time.monotonic()
                if wait_until(clean, settle, 0.2) is None:
                    not_started = args.trials - len(latencies)
                    break
                waits.append(time.monotonic() - t0)
                time.sleep(random.uniform(0, args.interval))  # break at any phase of the cycle
                lab.set_password(INBOX, "broken-password")
                broken, broken_wall = time.monotonic(), time.time()
                alerted = wait_until(functools.partial(alerted_since, broken_wall), bound + 30, 0.05)
                latencies.append((alerted or math.inf) - broken)
                lab.set_password(INBOX, "right-password")
        finally:
            exporter.stop(5)

    failed = sum(1 for x in latencies if x > bound) + not_started
    print(f"break -> daemon's alert active in Alertmanager, {args.trials} trials "
          f"(interval {args.interval:g} s, failure_threshold {args.threshold}, step timeout "
          f"{args.timeout:g} s; a wrong password fails within milliseconds); each trial starts "
          f"after the previous alert resolved (waited at most {settle:g} s):")
    print("  latency: " + (", ".join(f"{x:.1f} s" for x in latencies) or "none"))
    print("  wait for a clean start: " + ", ".join(f"{x:.1f} s" for x in waits)
          + ("" if not not_started else f"; then no clean start within {settle:g} s: "
             f"{not_started} trial(s) not run"))
    if latencies:
        print(f"  median {statistics.median(latencies):.1f} s, max {max(latencies):.1f} s "
              f"(first, cold trial {latencies[0]:.1f} s)")
    ok = failed == 0 and len(latencies) == args.trials
    print(f"  every trial started cleanly and alerted within the bound {bound:g} s: "
          f"{failed} failed: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
