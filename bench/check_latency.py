"""Benchmark: one healthy check over loopback against the lab's real Dovecot and Postfix.

Reports wall time per step and client CPU per full check, and compares `imap_connect` with
prometheus-blackbox-exporter's TCP+TLS probe of the same IMAPS port, measured side by side
(interleaved, same run). Targets (issue #2): CPU per check < 8 ms; imap_connect median
within 1.2x of the blackbox probe's.

    .venv/bin/python bench/check_latency.py [--checks 200]
"""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchlab import free_port, lab_inbox, version

import yaml

from inbox_exporter.check import Checker
from inbox_exporter.model import ALL_STEPS, Step
from maillab import MailLab


def quantiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=10)
    return statistics.median(values), q[8], max(values)


class Blackbox:
    """prometheus-blackbox-exporter with a tcp+tls module trusting the lab CA."""

    def __init__(self, workdir: Path, ca_file: Path):
        binary = shutil.which("prometheus-blackbox-exporter")
        if not binary:
            sys.exit("prometheus-blackbox-exporter not found (apt-get install prometheus-blackbox-exporter)")
        config = workdir / "blackbox.yml"
        config.write_text(yaml.safe_dump({"modules": {"tcp_tls": {
            "prober": "tcp", "timeout": "5s",
            "tcp": {"tls": True, "tls_config": {"ca_file": str(ca_file)}}}}}))
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/healthy", timeout=1)
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        sys.exit("blackbox exporter did not start")

    def probe(self, target: str) -> float:
        url = f"http://127.0.0.1:{self.port}/probe?module=tcp_tls&target={target}"
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        if not re.search(r"^probe_success 1$", body, re.M):
            raise RuntimeError(f"blackbox probe failed:\n{body}")
        return float(re.search(r"^probe_duration_seconds (\S+)$", body, re.M).group(1))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@functools.lru_cache(maxsize=1)
def _plain_context(ca_file: str):
    import ssl

    return ssl.create_default_context(cafile=ca_file)  # once: loading trust stores costs ms


def plain_check(lab, inbox) -> None:
    """The reference: the same verification written as a plain imapclient + smtplib script
    (no step timing, classification, deadlines or caps)."""
    import smtplib

    from imapclient import IMAPClient

    ctx = _plain_context(str(lab.ca_file))
    password = inbox.password.get_secret_value()
    with IMAPClient(lab.host, port=lab.ports.imaps, ssl=True, ssl_context=ctx, timeout=10) as c:
        c.login(inbox.username, password)
        c.capabilities()
        c.select_folder("INBOX", readonly=True)
        c.list_folders(pattern="%")
    with smtplib.SMTP(lab.host, lab.ports.submission, timeout=10, local_hostname="bench") as s:
        s.starttls(context=ctx)
        s.login(inbox.username, password)
        s.sendmail(inbox.email, [inbox.test_email_to],
                   b"Subject: plain\r\nFrom: " + inbox.email.encode() + b"\r\n\r\nplain\r\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checks", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="inbox-bench-") as tmp, MailLab(Path(tmp) / "lab") as lab:
        inbox = lab_inbox(lab, test_email={"to": lab.users["bcc"].address})
        checker = Checker()
        blackbox = Blackbox(Path(tmp), lab.ca_file)
        target = f"{lab.host}:{lab.ports.imaps}"
        try:
            for _ in range(args.warmup):
                assert checker.check(inbox).ok
                blackbox.probe(target)
            steps: dict[Step, list[float]] = {s: [] for s in ALL_STEPS}
            cpu, wall, bb, plain = [], [], [], []
            for _ in range(args.checks):
                c0, w0 = time.process_time(), time.perf_counter()
                result = checker.check(inbox)
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
                c0 = time.process_time()
                plain_check(lab, inbox)  # interleaved: same conditions
                plain.append(time.process_time() - c0)
                assert result.ok, result.to_json()
                for s in result.steps:
                    steps[s.step].append(s.duration_seconds)
                bb.append(blackbox.probe(target))  # interleaved: same conditions
        finally:
            blackbox.stop()

    print(f"inbox-exporter check benchmark: {args.checks} healthy checks over loopback "
          f"(IMAPS + submission/STARTTLS, real Dovecot {version('dovecot')} / Postfix)")
    print(f"{'step':<16}{'median ms':>10}{'p90 ms':>10}{'max ms':>10}")
    for step, values in steps.items():
        med, p90, mx = quantiles(values)
        print(f"{step.value:<16}{med * 1e3:>10.2f}{p90 * 1e3:>10.2f}{mx * 1e3:>10.2f}")
    med, p90, mx = quantiles(wall)
    print(f"{'full check':<16}{med * 1e3:>10.2f}{p90 * 1e3:>10.2f}{mx * 1e3:>10.2f}")
    cpu_med, cpu_p90, _ = quantiles(cpu)  # process CPU: our threads (watchdog) included
    print(f"client CPU per check: median {cpu_med * 1e3:.2f} ms, p90 {cpu_p90 * 1e3:.2f} ms, "
          f"mean {statistics.mean(cpu) * 1e3:.2f} ms (target < 8 ms): "
          f"{'PASS' if statistics.mean(cpu) < 0.008 else 'FAIL'}")
    print(f"reference, a plain imapclient + smtplib script doing the same, measured interleaved: "
          f"median {statistics.median(plain) * 1e3:.2f} ms, mean {statistics.mean(plain) * 1e3:.2f} ms "
          f"(ours / plain: {statistics.mean(cpu) / statistics.mean(plain):.2f})")
    ours, theirs = statistics.median(steps[Step.IMAP_CONNECT]), statistics.median(bb)
    ratio = ours / theirs
    print(f"imap_connect median {ours * 1e3:.2f} ms vs blackbox tcp+tls probe median "
          f"{theirs * 1e3:.2f} ms: ratio {ratio:.2f} (target <= 1.2): "
          f"{'PASS' if ratio <= 1.2 else 'FAIL'}")



if __name__ == "__main__":
    main()
