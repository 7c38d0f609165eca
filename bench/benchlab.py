"""What the benchmarks share: import paths, an inbox on the lab, tool versions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "daemon"), str(ROOT / "lab")]

import yaml  # noqa: E402

from inbox_exporter.config import Inbox, parse_config  # noqa: E402


def lab_inbox(lab, user: str = "alice", **extra) -> Inbox:
    """An inbox on the lab's good endpoints (IMAPS, submission with STARTTLS)."""
    u = lab.users[user]
    entry = {"name": "bench", "email": u.address, "password": u.password,
             "imap": {"host": lab.host, "port": lab.ports.imaps, "security": "ssl"},
             "smtp": {"host": lab.host, "port": lab.ports.submission, "security": "starttls"},
             "ca_file": str(lab.ca_file), **extra}
    return parse_config(yaml.safe_dump({"inboxes": [entry]}), "bench", {}).inboxes[0]


def version(name: str) -> str:
    try:
        return subprocess.run([name, "--version"], capture_output=True, text=True).stdout.split()[0]
    except (OSError, IndexError):
        return "?"
