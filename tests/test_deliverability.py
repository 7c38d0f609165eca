"""Reading the receiving server's verdict (Authentication-Results, RFC 8601) of the probe mail:
which header is believed, what each method said, and when that means the mail goes to spam.
The header texts are of the shape Gmail, Exchange Online and OpenDKIM/OpenDMARC write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from inbox_exporter.daemon import Exporter
from inbox_exporter.deliverability import NO_VERDICT, PRESET_AUTHSERV_IDS, hint, read_verdict
from maillab.deliverability import AUTHSERV_ID, SCENARIOS

from .conftest import check_now, wait_until

GMAIL = ("mx.google.com; dkim=pass header.i=@example.com header.s=s1 header.b=AbCd; "
         "spf=pass (google.com: domain of a@example.com designates 203.0.113.7 as permitted "
         "sender) smtp.mailfrom=a@example.com; dmarc=pass (p=REJECT sp=REJECT dis=NONE) "
         "header.from=example.com")
EXCHANGE = ("spf=fail (sender IP is 203.0.113.7) smtp.mailfrom=example.com; dkim=none (message "
            "not signed) header.d=none;dmarc=fail action=oreject header.from=example.com;"
            "compauth=fail reason=000")
OPENDKIM_FAIL = ('mx.lab.example; dkim=fail reason="signature verification failed" (256-bit '
                 "key; unprotected) header.d=example.test header.i=@example.test header.b=XyZ")
FORGED = "mx.lab.example; spf=pass smtp.mailfrom=example.test; dkim=pass; dmarc=pass"


def test_a_gmail_verdict_is_read_with_every_method():
    v = read_verdict([GMAIL], trusted=PRESET_AUTHSERV_IDS["gmail"])
    assert v.results == {"spf": "pass", "dkim": "pass", "dmarc": "pass"}
    assert v.authserv_id == "mx.google.com" and not v.failed


def test_exchange_online_writes_no_authserv_id_and_its_preset_trusts_that():
    v = read_verdict([EXCHANGE], trusted=PRESET_AUTHSERV_IDS["microsoft365"])
    assert v.results == {"spf": "fail", "dkim": "none", "dmarc": "fail"}
    assert v.authserv_id == "" and v.failed
    assert "unnamed server" in v.summary()


def test_the_reason_text_of_the_header_is_kept():
    v = read_verdict([OPENDKIM_FAIL], trusted=["mx.lab.example"])
    assert v.results["dkim"] == "fail"
    assert v.reasons == {"dkim": "signature verification failed"}
    assert "dkim=fail (signature verification failed)" in v.summary()


def test_a_header_the_sender_forged_below_the_receivers_is_not_believed():
    # the receiver (mx.lab.example) wrote the top one; the sender added one claiming passes
    v = read_verdict([OPENDKIM_FAIL, FORGED], trusted=["mx.lab.example"])
    assert v.results["dkim"] == "fail"
    untrusted = read_verdict([FORGED.replace("mx.lab.example", "evil.example")],
                             trusted=["mx.lab.example"])
    assert untrusted is NO_VERDICT and not untrusted.failed


def test_one_header_per_verifier_is_merged_and_the_topmost_result_wins():
    # Postfix + OpenDMARC + OpenDKIM + policyd-spf: three headers with the receiver's id
    headers = ["mx.lab.example; dmarc=pass (p=reject dis=none) header.from=a.test",
               'mx.lab.example; dkim=fail reason="key not found in DNS" header.d=a.test',
               "mx.lab.example; spf=pass (sender SPF authorized) smtp.mailfrom=a.test",
               "mx.lab.example; dkim=pass header.d=a.test"]  # further down: does not overrule
    v = read_verdict(headers, trusted=["mx.lab.example"])
    assert v.results == {"spf": "pass", "dkim": "fail", "dmarc": "pass"}
    assert v.reasons == {"dkim": "key not found in DNS"} and not v.failed


def test_without_a_trusted_id_the_topmost_header_is_the_receivers():
    v = read_verdict([OPENDKIM_FAIL, FORGED], trusted=None)
    assert v.results["dkim"] == "fail" and v.authserv_id == "mx.lab.example"


def test_a_forwarded_message_is_judged_by_its_highest_arc_instance():
    arcs = ["i=1; mx.google.com; spf=pass smtp.mailfrom=a.test; dkim=pass header.i=@a.test; "
            "dmarc=pass header.from=a.test",
            "i=2; mx.google.com; spf=fail smtp.mailfrom=fwd.test; dkim=pass header.i=@a.test; "
            "dmarc=pass header.from=a.test"]
    v = read_verdict(["relay.example; none"], arcs, trusted=["mx.google.com"])
    assert v.source == "ARC-Authentication-Results"
    assert v.results == {"spf": "fail", "dkim": "pass", "dmarc": "pass"} and not v.failed


def test_one_passing_dkim_signature_of_several_is_a_pass():
    header = ("mx.lab.example; dkim=fail reason=\"bad signature\" header.d=old.test; "
              "dkim=pass header.d=example.test; spf=pass smtp.mailfrom=example.test")
    assert read_verdict([header], trusted=["mx.lab.example"]).results["dkim"] == "pass"


def test_no_header_at_all_is_no_verdict_not_a_failure():
    v = read_verdict([], [], trusted=["mx.lab.example"])
    assert v is NO_VERDICT and v.authserv_id is None and not v.failed
    assert v.summary() == "no Authentication-Results from a trusted server"


@pytest.mark.parametrize("results,failed", [
    ({"spf": "pass", "dkim": "none", "dmarc": "none"}, False),    # SPF alone passes
    ({"spf": "softfail", "dkim": "fail", "dmarc": "none"}, True),  # neither passes
    ({"spf": "pass", "dkim": "pass", "dmarc": "fail"}, True),      # unaligned: DMARC fails
    ({"spf": "none", "dkim": "none", "dmarc": "none"}, False),     # nothing checked
])
def test_when_a_verdict_means_spam(results, failed):
    header = "mx.lab.example; " + "; ".join(f"{m}={r}" for m, r in results.items() if r != "none")
    if all(r == "none" for r in results.values()):
        header = "mx.lab.example; none"
    assert read_verdict([header], trusted=None).failed is failed


def test_the_hint_names_what_to_fix():
    v = read_verdict([EXCHANGE], trusted=[""])
    text = hint(v, "example.com")
    assert "SPF record of example.com" in text and "DKIM key for example.com" in text
    assert "align the From domain" in text


def test_unparseable_headers_are_skipped_not_fatal():
    v = read_verdict(["mx.lab.example; spf=", OPENDKIM_FAIL], trusted=["mx.lab.example"])
    assert v.results["dkim"] == "fail"


# --- against the lab's real verifiers (nsd, OpenDKIM, OpenDMARC, policyd-spf) ----------------


ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def verifiers(lab):
    yield lab.deliverability.start()
    lab.deliverability.stop()


def check_scenario(lab, verifiers, tmp_path, scenario: str, receiver=None,
                   transcript: bool = False) -> tuple[dict, str]:
    """`inbox-exporter check` of an inbox on the scenario's domain, its test email sent to the
    lab's receiving mailbox (behind the verifiers) and looked for there."""
    sender = verifiers.add_sender(scenario)
    receiver = receiver or verifiers.receiver
    config = tmp_path / f"{scenario}.yaml"
    config.write_text(yaml.safe_dump({"inboxes": [{
        "name": scenario, "email": sender.address, "password_env": "SENDER_PW",
        "ca_file": str(lab.ca_file), "timeout": "10s",
        "imap": {"host": lab.host, "port": lab.ports.imaps, "security": "ssl"},
        "smtp": {"host": lab.host, "port": lab.ports.submission, "security": "starttls"},
        "test_email": {"to": receiver.address},
        "delivery": {"mailbox": {"host": lab.host, "port": lab.ports.imaps, "security": "ssl",
                                 "username": receiver.address, "password_env": "RECEIVER_PW"},
                     "timeout": "30s", "authserv_id": AUTHSERV_ID}}]}))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "daemon"), "SENDER_PW": sender.password,
           "RECEIVER_PW": receiver.password}
    base = [sys.executable, "-m", "inbox_exporter", "check", f"--config.file={config}"]
    out = subprocess.run([*base, "--output", "json"], capture_output=True, text=True, env=env,
                         timeout=120)
    doc = json.loads(out.stdout)["inboxes"][0]
    text = ""
    if transcript:
        text = subprocess.run(base, capture_output=True, text=True, env=env, timeout=120).stdout
    return doc, text


def delivery_step(doc: dict) -> dict:
    return next(s for s in doc["steps"] if s["step"] == "delivery")


@pytest.mark.parametrize("scenario", ["pass", "nokey", "wrongkey", "nospf", "unaligned"])
def test_the_delivery_step_reads_the_verdict_of_the_real_verifiers(lab, verifiers, tmp_path,
                                                                   scenario):
    doc, _ = check_scenario(lab, verifiers, tmp_path, scenario)
    step = delivery_step(doc)
    expected = SCENARIOS[scenario].expected
    failing = expected["dmarc"] == "fail" or "pass" not in (expected["spf"], expected["dkim"])
    if failing:
        assert step["status"] == "failed", step
        assert (step["category"], step["reason"]) == ("delivery_failed", "authentication_failed")
        assert "Receivers will send this inbox's mail to spam" in step["hint"]
    else:
        assert step["status"] == "ok", step
    # the detail of a failure, or nothing: the verdict itself is in the metrics and status API
    if failing:
        for method in ("spf", "dkim", "dmarc"):
            assert f"{method}={expected[method]}" in step["detail"], (method, step["detail"])
        assert f"by {AUTHSERV_ID}" in step["detail"]


def test_the_daemon_exports_the_verdict_per_method_and_shows_the_reason(lab, verifiers,
                                                                        tmp_path):
    sender = verifiers.add_sender("wrongkey")
    receiver = verifiers.receiver
    config = tmp_path / "daemon.yaml"
    config.write_text(yaml.safe_dump({"inboxes": [{
        "name": "wrongkey", "email": sender.address, "password_env": "SENDER_PW",
        "ca_file": str(lab.ca_file), "interval": "1h",
        "imap": {"host": lab.host, "port": lab.ports.imaps, "security": "ssl"},
        "smtp": {"host": lab.host, "port": lab.ports.submission, "security": "starttls"},
        "test_email": {"to": receiver.address},
        "delivery": {"mailbox": {"host": lab.host, "port": lab.ports.imaps, "security": "ssl",
                                 "username": receiver.address, "password_env": "RECEIVER_PW"},
                     "authserv_id": AUTHSERV_ID}}]}))
    exporter = Exporter(str(config), environ={"SENDER_PW": sender.password,
                                              "RECEIVER_PW": receiver.password})
    exporter.start()
    try:
        check_now(exporter, "wrongkey")
        state = wait_until(lambda: (s := exporter.store.get("wrongkey")) and s.delivery and s,
                           timeout=40, what="the delivery result")
        metrics = b"".join(exporter.render_metrics()).decode()
        page = exporter.inbox("wrongkey")
    finally:
        exporter.stop(5)
    assert state.delivery.verdict.results == {"spf": "pass", "dkim": "fail", "dmarc": "pass"}
    for method, result in (("spf", "pass"), ("dkim", "fail"), ("dmarc", "pass")):
        assert (f'inbox_delivery_auth_result{{inbox="wrongkey",method="{method}",'
                f'result="{result}"}} 1') in metrics
    assert page is not None
    auth = page[0]["delivery"]["authentication"]
    assert auth["reasons"]["dkim"] == "signature verification failed"
    assert auth["authserv_id"] == AUTHSERV_ID


def test_mail_without_authentication_results_is_no_verdict_not_a_failure(lab, verifiers,
                                                                         tmp_path):
    plain = verifiers.plain_recipient  # delivered without the verifiers: no header at all
    doc, _ = check_scenario(lab, verifiers, tmp_path, "pass", receiver=plain)
    assert delivery_step(doc)["status"] == "ok"
