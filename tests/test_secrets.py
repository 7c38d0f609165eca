"""The password never appears: not in output, logs, details, or the exceptions of a failed step,
in none of the forms a server may echo it back (quoted, base64, inside SASL PLAIN)."""

from __future__ import annotations

import base64
import json
import traceback

import pytest

from inbox_exporter import check as check_module
from inbox_exporter.check import Checker
from inbox_exporter.redact import sasl_plain

from .conftest import PASSWORD, make_inbox
from .fakeserver import IMAP_CAPABILITY, IMAP_GREETING, SMTP_EHLO, SMTP_GREETING, FakeServer
from .test_cli import run_cli

NASTY = 'Pw"with\\quotes-9d2e1b'  # IMAP quotes it as "Pw\"with\\quotes-9d2e1b"

# Servers that echo the command they refuse, password and all.
ECHO_IMAP = [(None, IMAP_GREETING), IMAP_CAPABILITY,
             (r"LOGIN", "{tag} BAD Error in IMAP command received by server: {line}\r\n")]
ECHO_SMTP = [(None, SMTP_GREETING), (r"^EHLO", SMTP_EHLO),
             (r"^AUTH", "535 5.7.8 Error: authentication failed: {line}\r\n")]


@pytest.fixture
def echo_servers():
    with FakeServer(ECHO_IMAP, echo=True) as imap, FakeServer(ECHO_SMTP, echo=True) as smtp:
        yield imap, smtp


SPACED = 'pa"ss w\\rd{5}-7c1f04'  # a space, a quote, a backslash, a literal-like {5}


def forms(password: str, tail: str) -> tuple[str, ...]:
    return (password, tail, base64.b64encode(password.encode()).decode(),
            sasl_plain("alice@example.test", password))


@pytest.mark.parametrize("password,tail", [(NASTY, "9d2e1b"), (SPACED, "7c1f04")])
def test_a_server_echoing_the_login_command_never_makes_the_password_visible(
        tmp_path, echo_servers, password, tail):
    imap, smtp = echo_servers
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"inboxes": [{
        "name": "echo", "email": "alice@example.test", "password_env": "ECHO_PW",
        "allow_plaintext_login": True,
        "imap": {"host": "127.0.0.1", "port": imap.port, "security": "none"},
        "smtp": {"host": "127.0.0.1", "port": smtp.port, "security": "none"},
        "timeout": "3s"}]}))
    for output in ("text", "json"):
        out = run_cli("check", "--config.file", str(config), "--output", output,
                      "--log.level", "debug", env={"ECHO_PW": password})
        assert out.returncode == 1
        assert "<redacted>" in out.stdout  # the echo was there, and was cut
        for form in forms(password, tail):
            assert form not in out.stdout and form not in out.stderr, form
    # the servers really saw (and echoed) the secret: the test is not vacuous
    sent = "\n".join(line for t in imap.transcripts + smtp.transcripts for line in t)
    assert tail in sent or sasl_plain("alice@example.test", password) in sent


def test_the_password_is_in_no_exception_a_failed_step_raised(lab_inbox, monkeypatch):
    seen = []
    real = check_module.classify

    def spy(step, exc, phase, ctx, secrets):
        seen.append(exc)
        return real(step, exc, phase, ctx, secrets)

    monkeypatch.setattr(check_module, "classify", spy)
    result = Checker().check(lab_inbox(password=PASSWORD))
    assert len(seen) == 2  # the IMAP and the SMTP login
    for exc in seen:
        text = "".join(traceback.format_exception(exc))
        assert PASSWORD not in text and PASSWORD not in repr(exc)
    assert PASSWORD not in json.dumps(result.to_json())


def test_an_inbox_never_shows_its_password_when_printed():
    inbox = make_inbox(password=NASTY)
    for text in (repr(inbox), str(inbox), repr(inbox.password)):
        assert "9d2e1b" not in text
