"""Benchmark: HTTP clients that stall (issue #11), against the exporter as a process of its own.

Per trial (a fresh exporter each, 1,000 inboxes on a closed loopback port), 200 connections are
opened and left stalled: half send nothing, half stop in the middle of their request headers
(over TLS: half never send a ClientHello, half stop after the handshake, mid-headers). While
they hang, /metrics and /-/healthy are fetched 10 times each; the exporter's thread count is
read from /proc; then the time until the server has cut every stalled connection is measured.
Targets: every fetch while stalled < 2 s, and none fails; every stalled connection cut within
15 s (the server's idle and handshake timeouts are 10 s); threads grow by at most 4. Trials:
plain HTTP and TLS (web config file), 2 each.

    .venv/bin/python bench/stalled_clients.py [--clients 200] [--trials 2]
"""

from __future__ import annotations

import argparse
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchlab import Daemon, Report, threads, wait_until

import yaml

FETCH_TARGET = 2.0
CUT_TARGET = 15.0
THREAD_GROWTH = 4


def make_tls(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 (openssl)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"), "-days", "2", "-subj", "/CN=ca",
        "-addext", "basicConstraints=critical,CA:TRUE")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"), "-subj", "/CN=server")
    run("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"), "-CAkey",
        str(d / "ca.key"), "-CAcreateserial", "-days", "2", "-extfile", str(d / "ext"),
        "-out", str(d / "server.pem"))
    return d / "ca.pem", d / "server.pem", d / "server.key"


def stall(port: int, n: int, tls_ca: Path | None) -> list[socket.socket]:
    partial = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: "
    out = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if i % 2:
            if tls_ca is not None:  # a whole handshake first, then stall mid-headers
                s = ssl.create_default_context(cafile=str(tls_ca)).wrap_socket(
                    s, server_hostname="127.0.0.1")
            s.sendall(partial)
        out.append(s)
    return out


def cut(s: socket.socket) -> bool:
    s.settimeout(0.005)
    for _ in range(10):  # an error page may come first: read on to the close
        try:
            if s.recv(65536) == b"":
                return True
        except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
            return False
        except (OSError, ssl.SSLError):
            return True
    return False


def trial(tmp: Path, clients: int, tls: bool, report: Report, n: int) -> None:
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({"defaults": {"interval": "24h", "timeout": "2s"}, "inboxes": [
        {"name": f"inbox-{i:04d}", "email": f"u{i}@example.test", "password": "pw",
         "imap": {"host": "127.0.0.1", "port": 9}, "smtp": {"host": "127.0.0.1", "port": 9}}
        for i in range(1000)]}))
    args: tuple[str, ...] = ()
    ca = None
    if tls:
        ca, cert, key = make_tls(tmp)
        web = tmp / "web.yml"
        web.write_text(yaml.safe_dump({"tls_server_config": {"cert_file": str(cert),
                                                             "key_file": str(key)}}))
        args = ("--web.config.file", str(web))
    label = f"{'TLS' if tls else 'HTTP'} trial {n}"
    with Daemon(config, tmp / f"daemon-{n}.log", args=args, tls_ca=ca) as daemon:
        urllib.request.urlopen(daemon.url + "/metrics", timeout=30, context=daemon.context).read()
        before = threads(daemon.pid)
        stalled = stall(daemon.port, clients, ca)
        opened = time.monotonic()
        times, failed = [], 0
        for _ in range(10):
            for path in ("/metrics", "/-/healthy"):
                t0 = time.monotonic()
                try:
                    urllib.request.urlopen(daemon.url + path, timeout=10,
                                           context=daemon.context).read()
                except OSError:
                    failed += 1
                times.append(time.monotonic() - t0)
        during = threads(daemon.pid)
        cut_at = wait_until(lambda: all(cut(s) for s in stalled), timeout=30, poll=0.2)
        for s in stalled:
            s.close()
        after = threads(daemon.pid)
    took = None if cut_at is None else cut_at - opened
    report.check(max(times) < FETCH_TARGET and failed == 0,
                 f"{label}: 20 fetches with {clients} stalled clients: max "
                 f"{max(times) * 1e3:.0f} ms, failed {failed} (target < {FETCH_TARGET:.0f} s, 0)")
    report.check(took is not None and took < CUT_TARGET,
                 f"{label}: all {clients} stalled connections cut after "
                 f"{'never' if took is None else f'{took:.1f} s'} (target < {CUT_TARGET:.0f} s)")
    report.check(during - before <= THREAD_GROWTH,
                 f"{label}: exporter threads {before} before, {during} while stalled, {after} "
                 f"after (growth target <= {THREAD_GROWTH})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--trials", type=int, default=2)
    args = ap.parse_args()
    report = Report()
    for n in range(args.trials):
        for tls in (False, True):
            with tempfile.TemporaryDirectory(prefix="inbox-bench-stall-") as tmp:
                trial(Path(tmp), args.clients, tls, report, n + 1)
    print(f"{'PASS' if report.failed == 0 else 'FAIL'}: stalled clients ({report.failed} checks "
          "failed)")
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
