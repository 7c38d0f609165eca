"""Every scenario of the verification against the real Dovecot and Postfix of the lab."""

from __future__ import annotations

import os
import subprocess

import pytest
from imapclient import IMAPClient

from inbox_exporter.check import Checker
from inbox_exporter.model import ALL_STEPS, Category, Protocol, Reason, Status, Step
from inbox_exporter.probes.smtp import PROBE_HEADER

CHECKER = Checker()


def failure(result, step):
    s = result.step(step)
    assert s.status is Status.FAILED, f"{step} was {s.status}: {result.to_json()}"
    return s.diagnosis.category, s.diagnosis.reason


def assert_skipped_after(result, step):
    steps = list(ALL_STEPS)
    chain = steps[:3] if step.protocol is Protocol.IMAP else steps[3:]
    for later in chain[chain.index(step) + 1:]:
        assert result.step(later).status is Status.SKIPPED


def test_a_healthy_inbox_passes_every_step_and_the_test_email_arrives(lab, lab_inbox):
    result = CHECKER.check(lab_inbox())
    assert result.ok, result.to_json()
    assert [s.step for s in result.steps] == list(ALL_STEPS)
    assert all(s.status is Status.OK and s.duration_seconds > 0 for s in result.steps)
    certs = {c.protocol: c for c in result.certificates}
    assert set(certs) == {Protocol.IMAP, Protocol.SMTP}
    for c in certs.values():
        assert c.trusted and c.not_after == pytest.approx(_not_after(lab.tls.good_cert))
    msg = lab.wait_for_message("bcc", lambda m: m[PROBE_HEADER] == result.probe_id, timeout=15)
    assert result.probe_id in msg["Message-ID"]
    assert msg["From"] == lab.users["alice"].address


def test_starttls_imap_and_implicit_tls_smtp_work_too(lab, lab_inbox):
    inbox = lab_inbox(imap={"port": lab.ports.imap, "security": "starttls"},
                      smtp={"port": lab.ports.smtps, "security": "ssl"})
    result = CHECKER.check(inbox)
    assert result.ok, result.to_json()
    assert all(c.trusted for c in result.certificates) and len(result.certificates) == 2


def test_a_wrong_password_is_unauthorized_on_imap_and_on_smtp(lab_inbox):
    result = CHECKER.check(lab_inbox(password="wrong-password"))
    assert failure(result, Step.IMAP_LOGIN) == (Category.UNAUTHORIZED, Reason.AUTH_FAILED)
    # The chains are independent: the SMTP side is verified and fails on its own.
    assert result.step(Step.SMTP_CONNECT).status is Status.OK
    assert failure(result, Step.SMTP_LOGIN) == (Category.UNAUTHORIZED, Reason.AUTH_FAILED)
    assert_skipped_after(result, Step.IMAP_LOGIN)
    assert_skipped_after(result, Step.SMTP_LOGIN)


def test_a_custom_username_is_used_to_log_in_instead_of_the_email_address(lab, lab_inbox):
    login = lab.add_user("carol", "carol-password")
    shared = {"email": f"sales@{lab.domain}", "password": "carol-password"}
    assert CHECKER.check(lab_inbox(username=login.address, **shared)).ok
    without = CHECKER.check(lab_inbox(**shared))  # logs in as sales@..., which does not exist
    assert failure(without, Step.IMAP_LOGIN) == (Category.UNAUTHORIZED, Reason.AUTH_FAILED)


def test_an_app_password_demand_is_its_own_category_on_both_protocols(lab_inbox):
    result = CHECKER.check(lab_inbox("appuser"))
    expected = (Category.APP_PASSWORD_REQUIRED, Reason.APP_PASSWORD_REQUIRED)
    assert failure(result, Step.IMAP_LOGIN) == expected
    assert failure(result, Step.SMTP_LOGIN) == expected
    assert "app-specific password" in result.step(Step.IMAP_LOGIN).diagnosis.hint


def test_a_connection_limit_is_an_imap_authentication_error(lab, lab_inbox):
    alice = lab.users["alice"]
    with IMAPClient(lab.host, port=lab.ports.imaps_limited, ssl=True,
                    ssl_context=_trusting(lab)) as held:
        held.login(alice.address, alice.password)
        result = CHECKER.check(lab_inbox(imap={"port": lab.ports.imaps_limited}))
    assert failure(result, Step.IMAP_LOGIN) == (Category.IMAP_AUTHENTICATION_ERROR,
                                                Reason.TOO_MANY_CONNECTIONS)
    assert "simultaneous connections" in result.step(Step.IMAP_LOGIN).diagnosis.hint


def test_the_monitor_never_holds_a_connection_after_a_check(lab, lab_inbox):
    # With mail_max_userip_connections=1, one connection left open by a check would make the
    # next check fail with [LIMIT]: every connection must be closed, after success or failure.
    limited = {"port": lab.ports.imaps_limited}
    for password in (None, "wrong-password", None, None):
        kwargs = {"imap": limited}
        if password:
            kwargs["password"] = password
        result = CHECKER.check(lab_inbox(**kwargs))
        if password is None:
            assert result.step(Step.IMAP_VALIDATE).status is Status.OK, result.to_json()


def test_a_login_refused_by_client_ip_reads_like_a_wrong_password_and_hints_at_allowlists(lab_inbox):
    result = CHECKER.check(lab_inbox("netuser"))
    assert failure(result, Step.IMAP_LOGIN) == (Category.UNAUTHORIZED, Reason.AUTH_FAILED)
    assert "allowlist" in result.step(Step.IMAP_LOGIN).diagnosis.hint


def test_a_closed_port_is_connection_refused(lab_inbox):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()[1]
    s.close()
    result = CHECKER.check(lab_inbox(imap={"port": closed}, smtp={"port": closed}))
    assert failure(result, Step.IMAP_CONNECT) == (Category.IMAP_SETTINGS_INCORRECT,
                                                  Reason.CONNECTION_REFUSED)
    assert failure(result, Step.SMTP_CONNECT) == (Category.SMTP_SETTINGS_INCORRECT,
                                                  Reason.CONNECTION_REFUSED)
    assert_skipped_after(result, Step.IMAP_CONNECT)


def test_implicit_tls_against_a_starttls_port_is_a_tls_error(lab, lab_inbox):
    result = CHECKER.check(lab_inbox(imap={"port": lab.ports.imap, "security": "ssl"},
                                     smtp={"port": lab.ports.submission, "security": "ssl"}))
    assert failure(result, Step.IMAP_CONNECT) == (Category.IMAP_SETTINGS_INCORRECT, Reason.TLS_ERROR)
    assert failure(result, Step.SMTP_CONNECT) == (Category.SMTP_SETTINGS_INCORRECT, Reason.TLS_ERROR)


def test_starttls_against_an_implicit_tls_port_waits_for_a_greeting_that_never_comes(lab, lab_inbox):
    result = CHECKER.check(lab_inbox(timeout="1s",
                                     imap={"port": lab.ports.imaps, "security": "starttls"},
                                     smtp={"port": lab.ports.smtps, "security": "starttls"}))
    assert failure(result, Step.IMAP_CONNECT) == (Category.IMAP_SETTINGS_INCORRECT,
                                                  Reason.GREETING_TIMEOUT)
    assert failure(result, Step.SMTP_CONNECT) == (Category.SMTP_SETTINGS_INCORRECT,
                                                  Reason.GREETING_TIMEOUT)
    assert "implicit TLS" in result.step(Step.IMAP_CONNECT).diagnosis.hint
    assert result.step(Step.IMAP_CONNECT).duration_seconds < 2


@pytest.mark.parametrize("kind,reason", [
    ("selfsigned", Reason.CERTIFICATE_UNTRUSTED),
    ("expired", Reason.CERTIFICATE_EXPIRED),
    ("wronghost", Reason.CERTIFICATE_HOSTNAME_MISMATCH),
])
@pytest.mark.parametrize("mode", ["ssl", "starttls"])
def test_a_bad_certificate_is_certificate_untrusted_on_both_protocols(lab, lab_inbox, kind, reason, mode):
    imap_port = getattr(lab.ports, f"imaps_{kind}" if mode == "ssl" else f"imap_{kind}")
    smtp_port = getattr(lab.ports, f"smtps_{kind}" if mode == "ssl" else f"submission_{kind}")
    result = CHECKER.check(lab_inbox(imap={"port": imap_port, "security": mode},
                                     smtp={"port": smtp_port, "security": mode}))
    for step in (Step.IMAP_CONNECT, Step.SMTP_CONNECT):
        assert failure(result, step) == (Category.CERTIFICATE_UNTRUSTED, reason)
    assert {c.protocol: c.trusted for c in result.certificates} == {Protocol.IMAP: False,
                                                                    Protocol.SMTP: False}


def test_a_certificate_from_an_unknown_ca_is_untrusted_without_ca_file(lab, lab_inbox):
    result = CHECKER.check(lab_inbox(ca_file=None))
    assert failure(result, Step.IMAP_CONNECT) == (Category.CERTIFICATE_UNTRUSTED,
                                                  Reason.CERTIFICATE_UNTRUSTED)
    assert "allow_insecure_certificate" in result.step(Step.IMAP_CONNECT).diagnosis.hint


def test_allow_insecure_certificate_accepts_a_self_signed_one_and_still_reads_its_expiry(lab, lab_inbox):
    result = CHECKER.check(lab_inbox(allow_insecure_certificate=True,
                                     imap={"port": lab.ports.imaps_selfsigned},
                                     smtp={"port": lab.ports.smtps_selfsigned, "security": "ssl"}))
    assert result.ok, result.to_json()
    for c in result.certificates:
        assert c.trusted is False and c.not_after == pytest.approx(_not_after(lab.tls.selfsigned_cert))


def test_a_client_rejected_at_mail_or_rcpt_fails_the_test_email(lab, lab_inbox):
    result = CHECKER.check(lab_inbox(smtp={"port": lab.ports.submission_client_rejected}))
    assert result.step(Step.SMTP_LOGIN).status is Status.OK
    assert failure(result, Step.TEST_EMAIL) == (Category.TEST_EMAIL_FAILED, Reason.IP_NOT_ALLOWED)
    assert "Client host rejected" in result.step(Step.TEST_EMAIL).diagnosis.detail


def test_a_rejected_recipient_fails_the_test_email(lab, lab_inbox):
    result = CHECKER.check(lab_inbox(test_email={"to": f"nobody@{lab.domain}"}))
    assert failure(result, Step.TEST_EMAIL) == (Category.TEST_EMAIL_FAILED,
                                                Reason.RECIPIENT_REJECTED)
    assert "5.1.1" in result.step(Step.TEST_EMAIL).diagnosis.detail


def test_a_password_over_plaintext_from_a_remote_address_is_refused_as_tls_required(lab, lab_inbox):
    # Dovecot treats 127.0.0.1 -> 127.0.0.1 as secure; from 127.0.0.2 it behaves as for a
    # remote client and refuses plaintext authentication.
    result = CHECKER.check(lab_inbox(source_address="127.0.0.2",
                                     imap={"port": lab.ports.imap, "security": "none"}))
    assert failure(result, Step.IMAP_LOGIN) == (Category.IMAP_SETTINGS_INCORRECT,
                                                Reason.TLS_REQUIRED)


@pytest.mark.skipif(os.geteuid() != 0, reason="iptables needs root")
def test_a_firewall_dropping_the_connection_is_a_connection_timeout(lab, lab_inbox):
    with lab.blackhole() as port:
        result = CHECKER.check(lab_inbox(timeout="1s", imap={"port": port}, smtp={"port": port}))
    for step, cat in ((Step.IMAP_CONNECT, Category.IMAP_SETTINGS_INCORRECT),
                      (Step.SMTP_CONNECT, Category.SMTP_SETTINGS_INCORRECT)):
        assert failure(result, step) == (cat, Reason.CONNECTION_TIMEOUT)
        assert result.step(step).duration_seconds < 2
    assert "allowlist" in result.step(Step.IMAP_CONNECT).diagnosis.hint


def test_a_password_changed_on_the_server_is_noticed_at_the_next_check(lab, lab_inbox):
    lab.add_user("rotating", "first-password")
    assert CHECKER.check(lab_inbox("rotating")).ok
    lab.set_password("rotating", "second-password")
    result = CHECKER.check(lab_inbox("rotating", password="first-password"))
    assert failure(result, Step.IMAP_LOGIN) == (Category.UNAUTHORIZED, Reason.AUTH_FAILED)


def test_the_check_deadline_bounds_the_whole_check(lab, lab_inbox):
    with lab.blackhole() as port:
        result = CHECKER.check(lab_inbox(timeout="1s", deadline="1500ms",
                                         imap={"port": port}, smtp={"port": port}))
    assert result.duration_seconds < 2.5
    smtp = result.step(Step.SMTP_CONNECT)
    # half a second was left for SMTP: it ran with that budget, then nothing was left
    assert smtp.status is Status.FAILED and smtp.duration_seconds < 0.8
    assert not result.ok


def _trusting(lab):
    import ssl
    return ssl.create_default_context(cafile=str(lab.ca_file))


def _not_after(cert_path) -> float:
    import ssl
    out = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", str(cert_path)],
                         capture_output=True, text=True, check=True).stdout
    return float(ssl.cert_time_to_seconds(out.strip().split("=", 1)[1]))


def test_an_exhausted_deadline_fails_the_steps_never_run_instead_of_passing_them(lab, lab_inbox):
    # IMAP uses up the whole deadline on a silent port: SMTP was never verified, so the check
    # is not a success, and the SMTP chain says why.
    with lab.blackhole() as port:
        result = CHECKER.check(lab_inbox(timeout="1s", deadline="1s", imap={"port": port}))
    smtp = result.step(Step.SMTP_CONNECT)
    assert smtp.status is Status.FAILED and smtp.diagnosis.reason is Reason.TIMEOUT
    assert "deadline" in smtp.diagnosis.detail
    assert result.step(Step.TEST_EMAIL).status is Status.SKIPPED
    assert not result.ok


def test_a_non_ascii_password_logs_in_to_imap_and_smtp(lab, lab_inbox):
    # imaplib's LOGIN takes ASCII only: the probe uses SASL PLAIN (UTF-8) when offered.
    if "umlaut" not in lab.users:
        lab.add_user("umlaut", "Pässwörd-ß-€")
    result = CHECKER.check(lab_inbox("umlaut", password="Pässwörd-ß-€"))
    assert result.ok, result.to_json()
