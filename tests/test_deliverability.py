"""Reading the receiving server's verdict (Authentication-Results, RFC 8601) of the probe mail:
which header is believed, what each method said, and when that means the mail goes to spam.
The header texts are of the shape Gmail, Exchange Online and OpenDKIM/OpenDMARC write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from email.parser import HeaderParser
from pathlib import Path

import pytest
import yaml

from inbox_exporter.daemon import Exporter
from inbox_exporter.deliverability import (
    NO_VERDICT,
    PRESET_AUTHSERV_IDS,
    hint,
    read_header,
)
from maillab.deliverability import AUTHSERV_ID, SCENARIOS

from .conftest import check_now, wait_until
from .test_deliverability_lab import fetch_over_imap, submit


def read_verdict(auth_results, arc_results=(), trusted=None):
    """read_header from header values alone, topmost first: no Received fields, so no hop
    boundary (every trusted header counts as the receiving hop's)."""
    return read_header([*(("Authentication-Results", v) for v in auth_results),
                        *(("ARC-Authentication-Results", v) for v in arc_results)], trusted)


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


def test_a_none_after_results_is_not_read_as_a_result():
    v = read_verdict(["mx.lab.example; spf=pass smtp.mailfrom=a.test; none"], trusted=None)
    assert v.results == {"spf": "pass", "dkim": "none", "dmarc": "none"}


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


def test_an_unreadable_receivers_header_is_no_verdict_and_says_so():
    # the topmost trusted header is the receiver's: a readable one lower down never stands in
    v = read_verdict(["mx.lab.example; spf=", OPENDKIM_FAIL], trusted=["mx.lab.example"])
    assert v.results == dict.fromkeys(("spf", "dkim", "dmarc"), "none") and not v.failed
    assert v.unreadable and v.authserv_id == "mx.lab.example"
    assert v.summary() == ("the receiver's header could not be read "
                           "[Authentication-Results by mx.lab.example]")


# --- which headers are the receiving hop's: real layouts, topmost field first ----------------
# Only Received, Authentication-Results and ARC-Authentication-Results count (the delivery step
# fetches those); the others are kept to show the layouts as the providers write them.

LAB = """\
Return-Path: <a@a.test>
Received: from mail.example.test ([127.0.0.1]) by vm with LMTP id MNHAFXMAE2tONAAAg+zDdQ
Authentication-Results: mx.lab.example; dmarc=pass (p=reject dis=none) header.from=a.test
Authentication-Results: mx.lab.example; dkim=pass (2048-bit key; unprotected) header.d=a.test
Authentication-Results: mx.lab.example; spf=pass (sender SPF authorized) smtp.mailfrom=a.test
Received: from mail.example.test (unknown [127.0.0.1]) by mail.example.test (Postfix) with ESMTP
DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=a.test; s=maillab
Received: from [127.0.0.1] (unknown [127.0.0.1]) by mail.example.test (Postfix) with ESMTPSA
{carried}From: a@a.test
"""
LAB_SPF_FAIL_ONLY = "".join(line for line in LAB.splitlines(keepends=True)
                            if "dkim=" not in line and "dmarc=" not in line
                            ).replace("spf=pass", "spf=fail")
# Gmail writes one header, below its own Received line, and the verdict again as ARC i=1.
GMAIL_LAYOUT = """\
Delivered-To: probe@gmail.com
Received: by 2002:a05:7300:5387:b0:10d:8a3f:1c2e with SMTP id j7csp1834392dyb;
        Fri, 4 Dec 2026 10:00:01 -0800 (PST)
ARC-Authentication-Results: i=1; mx.google.com;
       spf=softfail (google.com: domain of transitioning a@example.com does not designate
       203.0.113.7 as permitted sender) smtp.mailfrom=a@example.com
Return-Path: <a@example.com>
Received: from mail.example.com (mail.example.com. [203.0.113.7])
        by mx.google.com with ESMTPS id a1si123456.2026.12.04.10.00.01
Received-SPF: softfail (google.com: domain of transitioning a@example.com does not designate
 203.0.113.7 as permitted sender) client-ip=203.0.113.7;
Authentication-Results: mx.google.com;
       spf=softfail (google.com: domain of transitioning a@example.com does not designate
       203.0.113.7 as permitted sender) smtp.mailfrom=a@example.com
Received: from [10.0.0.2] by mail.example.com (Postfix) with ESMTPSA id 4Q3xYz
{carried}From: a@example.com
"""
# Exchange Online: its header (no authserv-id) above Received-SPF and the Received line of its
# edge, its own internal hops above.
EXCHANGE_LAYOUT = """\
Received: from DM6PR11MB4657.namprd11.prod.outlook.com (2603:10b6:5:1d0::12) by
 SA1PR11MB8278.namprd11.prod.outlook.com with HTTPS; Fri, 4 Dec 2026 18:00:02 +0000
Received: from BN9PR03CA0123.namprd03.prod.outlook.com (2603:10b6:408:fe::8) by
 DM6PR11MB4657.namprd11.prod.outlook.com (2603:10b6:5:1d0::12) with Microsoft SMTP Server
Authentication-Results: spf=fail (sender IP is 203.0.113.7) smtp.mailfrom=example.com;
 dkim=none (message not signed) header.d=none;dmarc=fail action=oreject
 header.from=example.com;compauth=fail reason=000
Received-SPF: Fail (protection.outlook.com: domain of example.com does not designate
 203.0.113.7 as permitted sender) receiver=protection.outlook.com; client-ip=203.0.113.7;
Received: from mail.example.com (203.0.113.7) by
 BN1PEPF00004680.mail.protection.outlook.com (10.167.243.85) with Microsoft SMTP Server
Received: from [10.0.0.2] by mail.example.com (Postfix) with ESMTPSA id 4Q3xYz
{carried}From: a@example.com
"""
PASSES = "spf=pass smtp.mailfrom=a.test; dkim=pass header.d=a.test; dmarc=pass header.from=a.test"


def fields(layout: str, carried: str = "") -> list[tuple[str, str]]:
    """The header fields of a layout, topmost first; `carried`: the sender's own fields."""
    return HeaderParser().parsestr(layout.format(carried=carried)).items()


@pytest.mark.parametrize("layout,carried,trusted,expected", [
    # every verifier's header of the receiving hop is merged; one carried in stays out
    (LAB, f"Authentication-Results: mx.lab.example; {PASSES}\n", ["mx.lab.example"],
     "pass pass pass"),
    # the receiver wrote SPF only; a carried-in header below its Received: must not fill in
    (LAB_SPF_FAIL_ONLY, f"Authentication-Results: mx.lab.example; {PASSES}\n",
     ["mx.lab.example"], "fail none none"),
    (LAB_SPF_FAIL_ONLY, f"Authentication-Results: mx.lab.example; {PASSES}\n", None,
     "fail none none"),
    # Gmail: the single header below its own Received: line is the topmost trusted one
    (GMAIL_LAYOUT, f"Authentication-Results: mx.google.com; {PASSES}\n",
     PRESET_AUTHSERV_IDS["gmail"], "softfail none none"),
    (EXCHANGE_LAYOUT, f"Authentication-Results: {PASSES}\n",
     PRESET_AUTHSERV_IDS["microsoft365"], "fail none fail"),
])
def test_only_the_receiving_hops_headers_are_merged(layout, carried, trusted, expected):
    v = read_header(fields(layout, carried), trusted)
    assert v.results == dict(zip(("spf", "dkim", "dmarc"), expected.split(), strict=True))
    assert v.failed is ("pass" not in expected.split()[:2] or "fail" in expected.split()[2])
    assert v.source == "Authentication-Results" and not v.unreadable


@pytest.mark.parametrize("layout,carried_id,trusted,authserv_id", [
    (LAB.replace("dmarc=pass (p=reject dis=none)", "dmarc=(p=reject"), "mx.lab.example; ",
     ["mx.lab.example"], "mx.lab.example"),
    (EXCHANGE_LAYOUT.replace("203.0.113.7)", "203.0.113.7", 1), "",
     PRESET_AUTHSERV_IDS["microsoft365"], ""),
    (LAB.replace("mx.lab.example; dmarc=pass", "@@ broken"), "mx.lab.example; ", None, ""),
])
def test_an_unreadable_topmost_trusted_header_ends_the_search(layout, carried_id, trusted,
                                                              authserv_id):
    # the receiver's other headers and the carried-in one are readable: none stands in for it
    v = read_header(fields(layout, f"Authentication-Results: {carried_id}{PASSES}\n"), trusted)
    assert set(v.results.values()) == {"none"}
    assert v.unreadable and v.authserv_id == authserv_id and not v.failed
    assert v.summary().startswith("the receiver's header could not be read")


@pytest.mark.parametrize("auth,arcs,trusted,expected", [
    # no configured id: ARC only from the server whose Authentication-Results is trusted
    ([], [f"i=9; evil.test; {PASSES}"], None, None),
    (["mx.lab.example; none"], [f"i=9; evil.test; {PASSES}"], None, "none none none"),
    # a configured id: the highest instance among the trusted ARC sets
    (["relay.example; none"], ["i=1; mx.google.com; spf=fail smtp.mailfrom=a.test",
                               f"i=2; evil.test; {PASSES}"], ["mx.google.com"],
     "fail none none"),
    (["relay.example; none"], [f"i=2; evil.test; {PASSES}"], ["mx.google.com"], None),
    # the highest trusted set unreadable: a lower instance does not stand in for it
    (["relay.example; none"], ["i=1; mx.google.com; spf=pass smtp.mailfrom=a.test",
                               "i=2; mx.google.com; spf=(pass"], ["mx.google.com"],
     "none none none"),
])
def test_arc_results_are_believed_only_from_a_trusted_server(auth, arcs, trusted, expected):
    v = read_verdict(auth, arcs, trusted)
    if expected is None:
        assert v is NO_VERDICT
    else:
        assert v.results == dict(zip(("spf", "dkim", "dmarc"), expected.split(), strict=True))
        assert v.authserv_id != "evil.test"


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
    entry = scenario_entry(lab, scenario, sender, receiver, timeout="10s")
    entry["delivery"]["timeout"] = "30s"
    config.write_text(yaml.safe_dump({"inboxes": [entry]}))
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


def scenario_entry(lab, name: str, sender, receiver, **extra) -> dict:
    """A config entry sending from a scenario's sender to `receiver`, the verdict trusted from
    the lab's verifiers (passwords from SENDER_PW and RECEIVER_PW)."""
    return {
        "name": name, "email": sender.address, "password_env": "SENDER_PW",
        "ca_file": str(lab.ca_file), **extra,
        "imap": {"host": lab.host, "port": lab.ports.imaps, "security": "ssl"},
        "smtp": {"host": lab.host, "port": lab.ports.submission, "security": "starttls"},
        "test_email": {"to": receiver.address},
        "delivery": {"mailbox": {"host": lab.host, "port": lab.ports.imaps, "security": "ssl",
                                 "username": receiver.address, "password_env": "RECEIVER_PW"},
                     "authserv_id": AUTHSERV_ID}}


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
    config.write_text(yaml.safe_dump({"inboxes": [
        scenario_entry(lab, "wrongkey", sender, receiver, interval="1h")]}))
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


@pytest.mark.parametrize("scenario", ["pass", "nokey", "nospf", "unaligned", "spoof"])
def test_the_lab_receivers_headers_in_their_real_order_are_all_merged(lab, verifiers, scenario):
    """OpenDMARC's, OpenDKIM's and policyd-spf's headers sit between Dovecot's and the mx's
    Received lines; a header the sender carried in arrives below the mx's (the relay drops one
    with the mx's id, so it comes in under another and is renamed here, as if it had not)."""
    token = submit(lab, verifiers.add_sender(scenario), verifiers.receiver.address,
                   extra_headers={"Authentication-Results": f"carried.example; {PASSES}"})
    msg = fetch_over_imap(lab, verifiers.receiver, token)
    names = [name.lower() for name, _ in msg.items()]
    carried = len(names) - 1 - names[::-1].index("authentication-results")
    assert "received" in names[names.index("authentication-results"):carried]
    header = [(n, str(v).replace("carried.example", AUTHSERV_ID)) for n, v in msg.items()]
    v = read_header(header, [AUTHSERV_ID])
    assert v.results == SCENARIOS[scenario].expected, msg.get_all("Authentication-Results")
    assert v.authserv_id == AUTHSERV_ID and read_header(header, None).results == v.results


def test_mail_without_authentication_results_is_no_verdict_not_a_failure(lab, verifiers,
                                                                         tmp_path):
    plain = verifiers.plain_recipient  # delivered without the verifiers: no header at all
    doc, _ = check_scenario(lab, verifiers, tmp_path, "pass", receiver=plain)
    assert delivery_step(doc)["status"] == "ok"

