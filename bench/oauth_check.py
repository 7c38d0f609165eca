"""Benchmark: a check with `auth.method: oauth2` beside a password check, in the same run.

Against the lab's real oidc-provider and the Dovecot/Postfix that validate its tokens by
introspection. Password and OAuth checks alternate (same conditions); each reports client CPU
and wall time per check. The OAuth side also reports its token endpoint round trips.

Verdict (issue #9): once the token is cached, an OAuth check makes no token request (exactly one
request per trial: the cold check's), and its client CPU is within 1.5x of a password check's
(the SASL payload is the only extra work on our side). Every check must pass: a failed one fails
the benchmark. Each trial starts cold: a new token cache and a refresh token of its own.

    .venv/bin/python bench/oauth_check.py [--trials 3] [--checks 100]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlab import lab_inbox

import yaml

from inbox_exporter.check import Checker
from inbox_exporter.config import parse_config
from inbox_exporter.oauth.tokens import TokenCache
from maillab import MailLab

SECRET_ENV = "BENCH_CLIENT_SECRET"


def oauth_inbox(lab, rt_file: Path):
    client = lab.oauth.clients["exporter"]
    entry = {"name": "bench-oauth", "email": lab.users["alice"].address,
             "imap": {"host": lab.host, "port": lab.ports.imaps_oauth, "security": "ssl"},
             "smtp": {"host": lab.host, "port": lab.ports.submission_oauth, "security": "starttls"},
             "ca_file": str(lab.ca_file), "test_email": {"to": lab.users["bcc"].address},
             "auth": {"method": "oauth2", "token_url": lab.oauth.token_url,
                      "client_id": client.client_id, "client_secret_env": SECRET_ENV,
                      "refresh_token_file": str(rt_file), "scope": "mail offline_access"}}
    return parse_config(yaml.safe_dump({"inboxes": [entry]}), "bench",
                        {SECRET_ENV: client.client_secret}).inboxes[0]


def timed(checker: Checker, inbox) -> tuple[float, float, bool]:
    c0, w0 = time.process_time(), time.perf_counter()
    result = checker.check(inbox)
    return time.process_time() - c0, time.perf_counter() - w0, result.ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--checks", type=int, default=100, help="warm checks per trial and method")
    args = ap.parse_args()

    cold_cpu, cold_wall, failed, extra_requests = [], [], 0, 0
    cpu = {"password": [], "oauth2": []}
    wall = {"password": [], "oauth2": []}
    with tempfile.TemporaryDirectory(prefix="inbox-bench-") as tmp, MailLab(Path(tmp) / "lab") as lab:
        password = lab_inbox(lab, test_email={"to": lab.users["bcc"].address})
        for trial in range(args.trials):
            # A clean start: a refresh token of its own, an empty cache, a new checker.
            rt = Path(tmp) / f"rt-{trial}"
            rt.write_text(lab.oauth.refresh_token_for("alice") + "\n")
            inbox = oauth_inbox(lab, rt)
            tokens = TokenCache()
            checker = Checker(tokens=tokens)
            c, w, ok = timed(checker, inbox)  # cold: includes the token request
            cold_cpu.append(c)
            cold_wall.append(w)
            failed += not ok
            for _ in range(args.checks):
                for method, box in (("password", password), ("oauth2", inbox)):
                    c, w, ok = timed(checker, box)
                    cpu[method].append(c)
                    wall[method].append(w)
                    failed += not ok
            extra_requests += tokens.requests - 1

    def ms(values: list[float]) -> str:
        return (f"median {statistics.median(values) * 1e3:6.2f} ms, "
                f"mean {statistics.mean(values) * 1e3:6.2f} ms")

    print(f"OAuth check benchmark: {args.trials} trials x {args.checks} warm checks per method, "
          "alternating, over loopback (real oidc-provider, Dovecot, Postfix)")
    for method in ("password", "oauth2"):
        print(f"{method:<9} client CPU {ms(cpu[method])} | wall {ms(wall[method])}")
    print(f"oauth2 cold (token request included): client CPU {ms(cold_cpu)} | wall {ms(cold_wall)}")
    ratio = statistics.mean(cpu["oauth2"]) / statistics.mean(cpu["password"])
    print(f"token requests beyond the first of each trial: {extra_requests} (target 0)")
    print(f"oauth2 / password client CPU per warm check: {ratio:.2f} (target <= 1.5)")
    print(f"failed checks: {failed} (target 0)")
    ok = extra_requests == 0 and ratio <= 1.5 and failed == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
