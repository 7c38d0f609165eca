"""Reading the receiving server's verdict (Authentication-Results, RFC 8601) of the probe mail:
which header is believed, what each method said, and when that means the mail goes to spam.
The header texts are of the shape Gmail, Exchange Online and OpenDKIM/OpenDMARC write."""

from __future__ import annotations

import pytest

from inbox_exporter.deliverability import NO_VERDICT, PRESET_AUTHSERV_IDS, hint, read_verdict

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
