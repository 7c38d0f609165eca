"""`inbox-exporter check` and `check-config`: output, exit codes, and no password anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inbox_exporter.model import ALL_STEPS

from .conftest import PASSWORD, lab_entry, write_config

ROOT = Path(__file__).parent.parent


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(ROOT / "daemon"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "inbox_exporter", *args], capture_output=True,
                          text=True, env=environ, timeout=120)


@pytest.fixture
def two_inboxes(tmp_path, lab):
    """A healthy inbox and one whose password (PASSWORD) is wrong."""
    config = write_config(tmp_path, lab, [lab_entry(lab, "good"), lab_entry(lab, "bad")])
    env = {"PW_GOOD": lab.users["alice"].password, "PW_BAD": PASSWORD}
    return config, env


def test_check_prints_a_table_with_category_reason_and_hint_and_exits_1_when_one_fails(two_inboxes):
    config, env = two_inboxes
    out = run_cli("check", "--config.file", str(config), env=env)
    assert out.returncode == 1, out.stderr
    assert "good: OK" in out.stdout and "bad: FAILING" in out.stdout
    assert "unauthorized / auth_failed" in out.stdout
    assert "hint: The server rejected the credentials" in out.stdout
    assert "1 of 2 inboxes OK" in out.stdout


def test_check_exits_0_when_all_pass_and_can_pick_one_inbox(two_inboxes):
    config, env = two_inboxes
    out = run_cli("check", "--config.file", str(config), "--inbox", "good", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bad" not in out.stdout


def test_check_json_has_exactly_the_documented_shape(two_inboxes):
    config, env = two_inboxes
    out = run_cli("check", "--config.file", str(config), "--output", "json", env=env)
    doc = json.loads(out.stdout)
    assert list(doc) == ["inboxes"]
    by_name = {i["name"]: i for i in doc["inboxes"]}
    assert by_name["good"]["ok"] is True and by_name["bad"]["ok"] is False
    for inbox in doc["inboxes"]:
        assert list(inbox) == ["name", "ok", "steps"]
        assert [s["step"] for s in inbox["steps"]] == [s.value for s in ALL_STEPS]
        for s in inbox["steps"]:
            assert list(s) == ["step", "status", "duration_seconds", "category", "reason",
                               "hint", "detail"]
            assert s["status"] in ("ok", "failed", "skipped")
    login = by_name["bad"]["steps"][1]
    assert (login["status"], login["category"], login["reason"]) == ("failed", "unauthorized",
                                                                      "auth_failed")
    assert login["hint"] and login["detail"]


def test_a_config_error_exits_2_with_one_line_naming_the_inbox(tmp_path):
    bad = tmp_path / "config.yaml"
    bad.write_text("inboxes:\n  - {name: sales, email: a@b.c, password_env: NOPE_UNSET, provider: gmail}\n")
    for command in ("check", "check-config"):
        out = run_cli(command, "--config.file", str(bad))
        assert out.returncode == 2
        assert out.stderr.strip() == (f"error: {bad}: inboxes[sales].password_env: "
                                      "environment variable NOPE_UNSET is not set")
        assert "Traceback" not in out.stderr


def test_check_config_accepts_the_example(tmp_path):
    out = run_cli("check-config", "--config.file", str(ROOT / "config.example.yaml"),
                  env={"SALES_PASSWORD": "x", "SUPPORT_PASSWORD": "y",
                       "M365_CLIENT_SECRET": "z", "SALES_M365_REFRESH_TOKEN": "t"})
    assert out.returncode == 0, out.stderr
    assert "OK, 3 inboxes" in out.stdout


def test_the_password_never_appears_in_text_json_or_debug_logs(tmp_path, lab):
    # Both inboxes present PASSWORD: it is right for one (a user created with it) and wrong
    # for the other, so it travels through a success and through every failure path.
    if "secretive" not in lab.users:
        lab.add_user("secretive", PASSWORD)
    config = write_config(tmp_path, lab, [lab_entry(lab, "good", "secretive"),
                                          lab_entry(lab, "bad", "alice")])
    env = {"PW_GOOD": PASSWORD, "PW_BAD": PASSWORD}
    for output in ("text", "json"):
        out = run_cli("check", "--config.file", str(config), "--output", output,
                      "--log.level", "debug", "--log.format", "json", env=env)
        assert out.returncode == 1
        assert "auth_failed" in out.stdout and '"level": "warning"' in out.stderr
        assert PASSWORD not in out.stdout and PASSWORD not in out.stderr


def test_check_prints_category_reason_and_hint_for_each_kind_of_failure(tmp_path, lab):
    entries = [
        lab_entry(lab, "apppw", "appuser"),
        lab_entry(lab, "closed", imap={"port": 1}),
        lab_entry(lab, "selfsigned", imap={"port": lab.ports.imaps_selfsigned}),
        lab_entry(lab, "norcpt", test_email={"to": f"nobody@{lab.domain}"}),
    ]
    config = write_config(tmp_path, lab, entries)
    env = {"PW_APPPW": lab.users["appuser"].password, "PW_CLOSED": lab.users["alice"].password,
           "PW_SELFSIGNED": lab.users["alice"].password, "PW_NORCPT": lab.users["alice"].password}
    out = run_cli("check", "--config.file", str(config), env=env)
    assert out.returncode == 1
    blocks = {b.split(":")[0]: b for b in out.stdout.split("\n\n")}
    expected = {
        "apppw": ("app_password_required / app_password_required", "app-specific password"),
        "closed": ("imap_settings_incorrect / connection_refused", "most IMAP ports are 993"),
        "selfsigned": ("certificate_untrusted / certificate_untrusted", "allow_insecure_certificate"),
        "norcpt": ("test_email_failed / recipient_rejected", "test_email.to"),
    }
    for name, (why, hint) in expected.items():
        flat = " ".join(blocks[name].split())  # the table wraps long hints
        assert why in flat and hint in flat, blocks[name]
