"""Benchmark: delivery latency on the local servers, and the extra load of the delivery step.

N checks of one lab inbox with `delivery: {mailbox: self}`: each test email is looked for
through the same confirmer the daemon uses, then cleaned up. Reports the distribution of
found - accepted, of the last Received: header - accepted, the polls it took, and the client
CPU of a confirmation next to a check's.

    .venv/bin/python bench/delivery_latency.py [--checks 100]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchlab import lab_inbox

from inbox_exporter import confirm, logs
from inbox_exporter.check import Checker
from inbox_exporter.limits import ConnectionLimits
from maillab import MailLab


def q(values: list[float]) -> str:
    v = sorted(values)
    return (f"median {statistics.median(v) * 1e3:.0f} ms, p90 {v[int(len(v) * 0.9) - 1] * 1e3:.0f} ms, "
            f"max {v[-1] * 1e3:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checks", type=int, default=100)
    args = ap.parse_args()
    logs.setup("error")
    with tempfile.TemporaryDirectory(prefix="inbox-bench-") as tmp, MailLab(Path(tmp) / "lab") as lab:
        inbox = lab_inbox(lab, delivery={"mailbox": "self", "timeout": "30s"})
        limits = ConnectionLimits()
        checker = Checker(limits)
        confirmer = confirm.DeliveryConfirmer(limits, on_result=lambda *a: None)
        polls = 0
        real_poll = confirmer.poll_once

        def counting_poll(*a, **k):
            nonlocal polls
            polls += 1
            return real_poll(*a, **k)

        confirmer.poll_once = counting_poll
        found, received, check_cpu, confirm_cpu = [], [], [], []
        try:
            for _ in range(args.checks):
                c0 = time.process_time()
                result = checker.check(inbox)
                check_cpu.append(time.process_time() - c0)
                assert result.ok and result.sent_at
                c0 = time.process_time()
                d = confirmer.confirm_now(inbox, result.probe_id, result.sent_at)
                confirm_cpu.append(time.process_time() - c0)
                assert d.step.status.value == "ok", d
                found.append(d.step.duration_seconds)
                if d.received_seconds is not None:
                    received.append(max(0.0, d.received_seconds))
            left = [m for m in lab.messages("alice") if m["X-Inbox-Exporter-Probe"]]
        finally:
            confirmer.stop()
    print(f"delivery step, {args.checks} test emails to the inbox itself (submission -> Postfix "
          f"-> LMTP -> Dovecot Maildir), found over IMAP and cleaned up")
    print(f"found - accepted: {q(found)} (first poll at 0.5 s, then 1 s, 2 s, ...)")
    if received:
        print(f"last Received: header - accepted: {q(received)} (1 s resolution)")
    print(f"polls per delivery: {polls / args.checks:.2f}; probe mails left in the mailbox: {len(left)}")
    print(f"client CPU: check {statistics.mean(check_cpu) * 1e3:.1f} ms, delivery confirmation "
          f"{statistics.mean(confirm_cpu) * 1e3:.1f} ms per test email "
          f"(+{statistics.mean(confirm_cpu) / statistics.mean(check_cpu):.0%})")


if __name__ == "__main__":
    main()
