"""Shared fixtures: inboxes built through the real config parser, and the real mail lab."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from inbox_exporter.config import Inbox, parse_config

PASSWORD = "Pw-never-shown-7f3a9c"  # searched for in every output by the secrets tests


def make_inbox(**overrides) -> Inbox:
    """An inbox through the real config parser; nested dicts (imap, smtp) are merged."""
    entry = {
        "name": "test",
        "email": "alice@example.test",
        "password": PASSWORD,
        "allow_plaintext_login": True,
        "imap": {"host": "127.0.0.1", "port": 1, "security": "none"},
        "smtp": {"host": "127.0.0.1", "port": 1, "security": "none"},
        "timeout": "5s",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(entry.get(key), dict):
            entry[key] = {**copy.deepcopy(entry[key]), **value}
        elif value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    text = yaml.safe_dump({"inboxes": [entry]})
    return parse_config(text, "test.yaml", {}).inboxes[0]


@pytest.fixture
def inbox_factory():
    return make_inbox


def write_config(tmp_path: Path, lab, inboxes: list[dict], **top) -> Path:
    """A config file for inboxes on the lab (see lab_entry), trusting the lab's CA."""
    path = tmp_path / "config.yaml"
    config = {"defaults": {"timeout": "3s", "ca_file": str(lab.ca_file),
                           "test_email": {"to": lab.users["bcc"].address}},
              "inboxes": inboxes, **top}
    path.write_text(yaml.safe_dump(config))
    return path


def lab_entry(lab, name: str, user: str = "alice", **extra) -> dict:
    """A config entry for a lab user on the good endpoints; its password comes from PW_<NAME>."""
    u = lab.users[user]
    entry = {"name": name, "email": u.address, "password_env": env_name(name),
             "imap": {"host": lab.host, "port": lab.ports.imaps, "security": "ssl"},
             "smtp": {"host": lab.host, "port": lab.ports.submission, "security": "starttls"}}
    for key, value in extra.items():
        entry[key] = {**entry[key], **value} if isinstance(value, dict) and key in entry else value
    return entry


def check_now(exporter, name: str, timeout: float = 60.0):
    """Run a check of one inbox through the scheduler (as a scheduled one would run) and wait
    for its recorded result: no on-demand policy in the way."""
    import threading

    done, got = threading.Event(), []
    inbox = exporter.scheduler.inboxes()[name]
    assert exporter.scheduler.submit_on_demand(inbox, lambda r: (got.append(r), done.set())), \
        f"{name}: a check is already queued or running"
    assert done.wait(timeout), f"{name}: no result within {timeout}s"
    return got[0]


def wait_until(predicate, timeout: float = 10.0, what: str = "a condition"):
    """Poll `predicate` until it returns something true; fail naming `what` at the deadline."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def env_name(inbox_name: str) -> str:
    return "PW_" + inbox_name.upper().replace("-", "_").replace(".", "_")


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """Real Dovecot + Postfix on 127.0.0.1 high ports, once per test session."""
    from maillab import MailLab

    mail_lab = MailLab(tmp_path_factory.mktemp("lab"))
    mail_lab.start()
    try:
        yield mail_lab
    finally:
        mail_lab.stop()


@pytest.fixture
def lab_inbox(lab):
    """An inbox on the lab's good endpoints (IMAPS, submission with STARTTLS), trusting its CA."""

    def build(user: str = "alice", **overrides) -> Inbox:
        u = lab.users[user]
        base = {
            "email": u.address,
            "password": u.password,
            "imap": {"host": lab.host, "port": lab.ports.imaps, "security": "ssl"},
            "smtp": {"host": lab.host, "port": lab.ports.submission, "security": "starttls"},
            "ca_file": str(lab.ca_file),
            "test_email": {"to": lab.users["bcc"].address},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        return make_inbox(**base)

    return build


@pytest.fixture(scope="session")
def alertmanager(tmp_path_factory):
    """A real Alertmanager (Debian prometheus-alertmanager) on loopback, clustering off."""
    from maillab.promstack import Alertmanager

    with Alertmanager(tmp_path_factory.mktemp("alertmanager")) as am:
        yield am
