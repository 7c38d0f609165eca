"""Benchmark: 1,000 inboxes at a 60 s interval against the lab's real Dovecot and Postfix.

`inbox-exporter run` (a process of its own) checks every inbox every minute, the full check
including the test email. It runs for `intervals + 1` intervals from the moment it is ready,
so every inbox has `intervals + 1` scheduled checks in that time, the first one (the cold
start, every inbox's first run spread over the first interval) included; then a settle time
of one step timeout lets the last ones finish. Per inbox, its first `intervals + 1` checks are
taken from /api/v1/status (history): a passed check is done; a failed one is not, nor one that
never started (missing). The daemon's JSON log says which failed steps never got a connection
slot (detail "not run: no connection slot ...": starved by the monitor's own queue).
Also: checks skipped (previous still running), how late checks started (the scheduling-lag
histogram), and the daemon's CPU and memory. Targets (issue #3): every due check done and
passed, none failed, starved, skipped or more than 1 s late; report CPU and RSS.

    .venv/bin/python bench/fleet_schedule.py [--inboxes 1000] [--interval 60] [--intervals 2]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from benchlab import NOT_RUN_NO_SLOT, Daemon, cpu_seconds, get_json, rss_mb, scrape, total

import yaml

from maillab import MailLab

ACCOUNTS = 50  # inboxes share these lab users (20 each): the per-account cap is exercised too
TIMEOUT = 10  # seconds per step; also the settle time after the last due run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inboxes", type=int, default=1000)
    ap.add_argument("--interval", type=int, default=60, help="seconds")
    ap.add_argument("--intervals", type=int, default=2,
                    help="intervals after the first (cold) one; at most 15 (the status "
                         "history holds 20 checks per inbox)")
    args = ap.parse_args()
    if not 1 <= args.intervals <= 15:
        ap.error("--intervals must be 1..15")
    runs = args.intervals + 1  # due checks per inbox, the cold one included

    with tempfile.TemporaryDirectory(prefix="inbox-bench-") as tmp, MailLab(Path(tmp) / "lab") as lab:
        users = [lab.add_user(f"fleet{i}", f"fleet-password-{i}") for i in range(ACCOUNTS)]
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump({
            "defaults": {"interval": f"{args.interval}s", "timeout": f"{TIMEOUT}s",
                         "ca_file": str(lab.ca_file),
                         # worst case: the test email at every check, not once an hour
                         "test_email": {"to": lab.users["bcc"].address,
                                        "interval": f"{args.interval}s"}},
            "inboxes": [{
                "name": f"inbox-{i:04d}", "email": users[i % ACCOUNTS].address,
                "password": users[i % ACCOUNTS].password,
                "imap": {"host": lab.host, "port": lab.ports.imaps, "security": "ssl"},
                "smtp": {"host": lab.host, "port": lab.ports.submission, "security": "starttls"},
            } for i in range(args.inboxes)]}))
        daemon = Daemon(config, Path(tmp) / "daemon.log")
        with daemon:
            cpu0, t0 = cpu_seconds(daemon.pid), time.monotonic()
            time.sleep(args.interval)  # the first interval: every inbox's first run
            cold_cpu, cold = cpu_seconds(daemon.pid) - cpu0, time.monotonic() - t0
            time.sleep(args.interval * args.intervals + TIMEOUT)
            window = time.monotonic() - t0 - cold
            cpu = cpu_seconds(daemon.pid) - cpu0 - cold_cpu
            metrics = scrape(daemon.url)
            status = get_json(daemon.url + "/api/v1/status")
            rss, hwm = rss_mb(daemon.pid)
            alive = daemon.alive()
        failed_steps = daemon.log_events("step failed")
        crash = daemon.tracebacks()

    # Each inbox's first `runs` checks, oldest first; what is not there never ran (in time).
    done = failed = missing = 0
    reasons: collections.Counter = collections.Counter()
    for inbox in status["inboxes"]:
        history = sorted(inbox["history"], key=lambda h: datetime.fromisoformat(h["started_at"]))
        due = history[:runs]
        missing += runs - len(due)
        for h in due:
            if h["ok"]:
                done += 1
            else:
                failed += 1
                reasons[f"{h['failing_step']}/{h['reason']}"] += 1
    no_slot = [e for e in failed_steps if str(e.get("detail", "")).startswith(NOT_RUN_NO_SLOT)]
    due_total = args.inboxes * runs
    skipped = total(metrics, "inbox_exporter_checks_skipped_total")
    lag_count = total(metrics, "inbox_exporter_scheduling_lag_seconds_count")
    late = {le: lag_count - total(metrics, "inbox_exporter_scheduling_lag_seconds_bucket", le=le)
            for le in ("0.1", "1.0", "5.0")}
    checks = total(metrics, "inbox_exporter_checks_total")

    print(f"{args.inboxes} inboxes every {args.interval} s ({ACCOUNTS} shared accounts), "
          f"full checks with test email, real Dovecot + Postfix on this machine; "
          f"{runs} intervals from start-up (the first, cold one included) + {TIMEOUT} s settle")
    print(f"due checks (first {runs} of each inbox): {due_total}; done (passed): {done} "
          f"({done / due_total:.1%}); failed: {failed}; never ran in time (missing): {missing}")
    if reasons:
        print("  failed checks by first failing step/reason: "
              + ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
    print(f"failed steps that never got a connection slot ('{NOT_RUN_NO_SLOT} ...', whole run, "
          f"daemon log): {len(no_slot)} in {len({e.get('inbox') for e in no_slot})} inboxes; "
          f"failed steps logged in all: {len(failed_steps)}")
    print(f"skipped (previous still running): {skipped:.0f}")
    print(f"scheduling lag over all {lag_count:.0f} checks started: {late['0.1']:.0f} started "
          f"> 0.1 s late, {late['1.0']:.0f} > 1 s, {late['5.0']:.0f} > 5 s")
    print(f"daemon CPU: first interval {cold_cpu:.1f} s over {cold:.0f} s = {cold_cpu / cold:.1%} "
          f"of one core; then {cpu:.1f} s over {window:.0f} s = {cpu / window:.1%} "
          f"({(cold_cpu + cpu) / max(checks, 1) * 1e3:.1f} ms per completed check over the run)")
    print(f"daemon RSS {rss:.0f} MB, peak {hwm:.0f} MB; alive at the end: {alive}")
    verdict = (alive and done == due_total and failed == 0 and missing == 0 and not no_slot
               and skipped == 0 and late["1.0"] == 0)
    print(f"every due check done and passed (cold start included); none failed, starved, "
          f"skipped or more than 1 s late: {'PASS' if verdict else 'FAIL'}")
    if crash:
        print(crash)
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
