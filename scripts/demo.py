"""The demo: the mail lab (real Dovecot + Postfix on 127.0.0.1) and `inbox-exporter run`
checking seven inboxes, some broken on purpose (one logs in with OAuth 2.0). Runs until Ctrl-C
(or --duration)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lab"))

from maillab import MailLab  # noqa: E402 - found through the sys.path line above

PORT = 9857  # the exporter's default port


def free_port(preferred: int | None = None) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred or 0))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_config(lab: MailLab, workdir: Path) -> tuple[dict, dict[str, str]]:
    def inbox(name, user="alice", **extra):
        u = lab.users[user]
        entry = {"name": name, "email": u.address, "password_env": f"DEMO_{name.upper()}_PASSWORD",
                 "imap": {"host": lab.host, "port": lab.ports.imaps, "security": "ssl"},
                 "smtp": {"host": lab.host, "port": lab.ports.submission, "security": "starttls"}}
        for key, value in extra.items():
            entry[key] = {**entry[key], **value} if isinstance(value, dict) and key in entry else value
        return entry, u.password

    inboxes = [
        inbox("sales"),
        inbox("support", "bob", imap={"port": lab.ports.imap, "security": "starttls"},
              smtp={"port": lab.ports.smtps, "security": "ssl"}),
        inbox("billing", "bob"),                         # wrong password (below)
        inbox("marketing", "appuser"),                   # the server demands an app password
        inbox("legacy", imap={"port": free_port()}),     # nothing listens on the IMAP port
        inbox("selfhosted", imap={"port": lab.ports.imaps_selfsigned},
              smtp={"port": lab.ports.smtps_selfsigned, "security": "ssl"}),  # untrusted cert
    ]
    env = {entry["password_env"]: password for entry, password in inboxes}
    env["DEMO_BILLING_PASSWORD"] = "not-the-password"
    # An OAuth 2.0 inbox, as Microsoft 365 / Google Workspace need: the lab's authorization
    # server signs alice in once (what `inbox-exporter oauth login` does with a browser).
    refresh_token = workdir / "m365.refresh-token"
    refresh_token.write_text(lab.oauth.refresh_token_for("alice") + "\n")
    refresh_token.chmod(0o600)
    client = lab.oauth.clients["exporter"]
    env["DEMO_CLIENT_SECRET"] = client.client_secret
    oauth = {"name": "sales-m365", "email": lab.users["alice"].address,
             "imap": {"host": lab.host, "port": lab.ports.imaps_oauth, "security": "ssl"},
             "smtp": {"host": lab.host, "port": lab.ports.submission_oauth, "security": "starttls"},
             "auth": {"method": "oauth2", "token_url": lab.oauth.token_url,
                      "authorization_url": lab.oauth.authorization_url,
                      "client_id": client.client_id, "client_secret_env": "DEMO_CLIENT_SECRET",
                      "refresh_token_file": str(refresh_token), "scope": "mail offline_access"}}
    config = {"defaults": {"interval": "30s", "timeout": "5s", "ca_file": str(lab.ca_file),
                           "test_email": {"to": lab.users["bcc"].address}},
              "inboxes": [entry for entry, _ in inboxes] + [oauth]}
    return config, env


def first_checks(url: str, names: list[str], timeout: float = 30) -> list[dict]:
    """Wait for the daemon, then check every inbox at once through /probe (the scheduler
    spreads first runs over the interval; a demo should not make you wait for that)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/-/ready", timeout=2)
            break
        except OSError:
            time.sleep(0.2)
    for name in names:
        request = urllib.request.Request(f"{url}/probe?inbox={name}", method="POST")
        urllib.request.urlopen(request, timeout=timeout).read()
    return json.load(urllib.request.urlopen(url + "/api/v1/status", timeout=5))["inboxes"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=float, default=None,
                    help="stop after this many seconds (default: run until Ctrl-C)")
    args = ap.parse_args()
    # The lab's servers, mail and the demo's config live here; removed when the demo ends.
    with tempfile.TemporaryDirectory(prefix="inbox-exporter-demo-") as tmp:
        return run_demo(Path(tmp), args.duration)


def run_demo(workdir: Path, duration: float | None) -> int:
    with MailLab(workdir / "lab") as lab:
        config, env = demo_config(lab, workdir)
        path = workdir / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        port = free_port(PORT)
        url = f"http://127.0.0.1:{port}"
        daemon = subprocess.Popen(
            [sys.executable, "-m", "inbox_exporter", "run", "--config.file", str(path),
             "--web.listen-address", f"127.0.0.1:{port}", "--web.enable-probe",
             "--web.enable-lifecycle"], env={**os.environ, **env})
        try:
            print(f"\nMail lab: Dovecot + Postfix on {lab.host}; config: {path}")
            print(f"Status page: {url}/\nMetrics:     {url}/metrics\nStatus JSON: {url}/api/v1/status\n")
            for i in first_checks(url, [e["name"] for e in config["inboxes"]]):
                why = f"{i['failing_step']}: {i['category']} / {i['reason']}" if i["category"] else ""
                print(f"  {i['name']:<11} {i['state']:<8} {i['auth']:<32} {why}")
            print("\nChecks repeat every 30 s. Ctrl-C stops the demo.", flush=True)
            deadline = None if duration is None else time.monotonic() + duration
            while daemon.poll() is None and (deadline is None or time.monotonic() < deadline):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(timeout=30)
    return 0 if daemon.returncode in (0, -signal.SIGTERM) else 1


if __name__ == "__main__":
    sys.exit(main())
