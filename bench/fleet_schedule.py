"""Benchmark: 1,000 inboxes at a 60 s interval against the lab's real Dovecot and Postfix.

`inbox-exporter run` (a process of its own) checks every inbox every minute, the full check
including the test email. After the first interval (when every inbox has started), it is
measured over whole intervals: checks done vs due, checks skipped, how late checks started
(the scheduling-lag histogram), failures, and the daemon's CPU share and memory. Targets
(issue #3): no check skipped or late; report CPU and RSS.

    .venv/bin/python bench/fleet_schedule.py [--inboxes 1000] [--interval 60] [--intervals 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "daemon"), str(ROOT / "lab")]

import yaml  # noqa: E402
from maillab import MailLab  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

ACCOUNTS = 50  # inboxes share these lab users (20 each): the per-account cap is exercised too


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, list[tuple[dict, float]]]:
    out: dict[str, list[tuple[dict, float]]] = {}
    body = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(metrics, name: str, **labels) -> float:
    return sum(v for lab, v in metrics.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rss_mb(pid: int) -> tuple[float, float]:
    f = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(f["VmRSS"].split()[0]) / 1024, int(f["VmHWM"].split()[0]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inboxes", type=int, default=1000)
    ap.add_argument("--interval", type=int, default=60, help="seconds")
    ap.add_argument("--intervals", type=int, default=2, help="measured intervals")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="inbox-bench-") as tmp, MailLab(Path(tmp) / "lab") as lab:
        users = [lab.add_user(f"fleet{i}", f"fleet-password-{i}") for i in range(ACCOUNTS)]
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump({
            "defaults": {"interval": f"{args.interval}s", "timeout": "10s",
                         "ca_file": str(lab.ca_file),
                         "test_email": {"to": lab.users["bcc"].address}},
            "inboxes": [{
                "name": f"inbox-{i:04d}", "email": users[i % ACCOUNTS].address,
                "password": users[i % ACCOUNTS].password,
                "imap": {"host": lab.host, "port": lab.ports.imaps, "security": "ssl"},
                "smtp": {"host": lab.host, "port": lab.ports.submission, "security": "starttls"},
            } for i in range(args.inboxes)]}))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "inbox_exporter", "run", "--config.file", str(config),
             "--web.listen-address", f"127.0.0.1:{port}", "--log.level", "warning"],
            env={**os.environ, "PYTHONPATH": str(ROOT / "daemon")},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(url + "/-/ready", timeout=1)
                    break
                except OSError:
                    time.sleep(0.2)
            # First runs are spread over the first interval: measure after it.
            time.sleep(args.interval + 2)
            before, cpu0, t0 = scrape(url), cpu_seconds(proc.pid), time.monotonic()
            time.sleep(args.interval * args.intervals)
            after, cpu1, t1 = scrape(url), cpu_seconds(proc.pid), time.monotonic()
            rss, hwm = rss_mb(proc.pid)
        finally:
            proc.terminate()
            _, stderr = proc.communicate(timeout=60)

    window = t1 - t0
    done = total(after, "inbox_exporter_checks_total") - total(before, "inbox_exporter_checks_total")
    due = args.inboxes * window / args.interval
    skipped = total(after, "inbox_exporter_checks_skipped_total")
    lag_count = total(after, "inbox_exporter_scheduling_lag_seconds_count")
    late = {le: lag_count - total(after, "inbox_exporter_scheduling_lag_seconds_bucket", le=le)
            for le in ("0.1", "1.0", "5.0")}
    failures = {}
    for labels, value in after.get("inbox_failure_info", []):
        failures[labels["reason"]] = failures.get(labels["reason"], 0) + 1
    ok = total(after, "inbox_check_success")
    print(f"{args.inboxes} inboxes every {args.interval} s ({ACCOUNTS} shared accounts), "
          f"full checks with test email, real Dovecot + Postfix on this machine")
    print(f"measured window {window:.0f} s: {done:.0f} checks done, {due:.0f} due "
          f"({done / due:.1%}); skipped (previous still running): {skipped:.0f}")
    print(f"scheduling lag over all {lag_count:.0f} checks: {late['0.1']:.0f} started > 0.1 s late, "
          f"{late['1.0']:.0f} > 1 s, {late['5.0']:.0f} > 5 s")
    print(f"inboxes passing at the end: {ok:.0f}/{args.inboxes}; failing steps by reason: "
          f"{failures or 'none'}")
    print(f"daemon CPU: {cpu1 - cpu0:.1f} s over {window:.0f} s = {(cpu1 - cpu0) / window:.1%} "
          f"of one core ({(cpu1 - cpu0) / max(done, 1) * 1e3:.1f} ms per check)")
    print(f"daemon RSS {rss:.0f} MB, peak {hwm:.0f} MB")
    verdict = skipped == 0 and late["1.0"] == 0 and done >= 0.98 * due
    print(f"no check skipped or more than 1 s late, all due checks done: {'PASS' if verdict else 'FAIL'}")
    if "Traceback" in stderr:
        print(stderr[-2000:])


if __name__ == "__main__":
    main()
