"""Start the mail lab, write a demo config with healthy and broken inboxes, and check them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lab"))

from maillab import MailLab  # noqa: E402


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_config(lab: MailLab) -> tuple[dict, dict[str, str]]:
    def inbox(name, user="alice", **extra):
        u = lab.users[user]
        entry = {"name": name, "email": u.address, "password_env": f"DEMO_{name.upper()}_PASSWORD",
                 "imap": {"host": lab.host, "port": lab.ports.imaps, "security": "ssl"},
                 "smtp": {"host": lab.host, "port": lab.ports.submission, "security": "starttls"}}
        for key, value in extra.items():
            entry[key] = {**entry[key], **value} if isinstance(value, dict) and key in entry else value
        return entry

    inboxes = [
        inbox("sales"),
        inbox("support", "bob", imap={"port": lab.ports.imap, "security": "starttls"},
              smtp={"port": lab.ports.smtps, "security": "ssl"}),
        inbox("billing", "bob"),                       # wrong password (set below)
        inbox("marketing", "appuser"),                 # server demands an app password
        inbox("legacy", imap={"port": closed_port()}),  # nothing listens on the IMAP port
        inbox("selfhosted", imap={"port": lab.ports.imaps_selfsigned},
              smtp={"port": lab.ports.smtps_selfsigned, "security": "ssl"}),  # untrusted cert
    ]
    env = {f"DEMO_{i['name'].upper()}_PASSWORD": lab.users[u].password
           for i, u in zip(inboxes, ["alice", "bob", "bob", "appuser", "alice", "alice"])}
    env["DEMO_BILLING_PASSWORD"] = "not-the-password"
    config = {"defaults": {"interval": "30s", "timeout": "5s", "ca_file": str(lab.ca_file),
                           "test_email": {"to": lab.users["bcc"].address}},
              "inboxes": inboxes}
    return config, env


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="inbox-exporter-demo-"))
    with MailLab(workdir / "lab") as lab:
        config, env = demo_config(lab)
        path = workdir / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        print(f"Mail lab running (Dovecot + Postfix on {lab.host}); demo config: {path}\n")
        cmd = [sys.executable, "-m", "inbox_exporter", "check", "--config.file", str(path)]
        return subprocess.run(cmd, env={**os.environ, **env}).returncode


if __name__ == "__main__":
    main()
    sys.exit(0)
