"""The inbox page's HTML: what a person reads there, rendered from a real status dict."""

from __future__ import annotations

import time

from inbox_exporter import inbox_page
from inbox_exporter.confirm import DeliveryResult
from inbox_exporter.deliverability import Verdict
from inbox_exporter.model import Category, CheckResult, Diagnosis, Reason, Status, Step, StepResult
from inbox_exporter.status import inbox_status
from inbox_exporter.store import InboxState

from .conftest import make_inbox


def failing_delivery() -> dict:
    verdict = Verdict(results={"spf": "pass", "dkim": "pass", "dmarc": "fail"},
                      reasons={"dmarc": 'dmarc=fail reason="p=reject"'},
                      authserv_id="mx.example", source="Authentication-Results")
    diagnosis = Diagnosis(Category.DELIVERY_FAILED, Reason.AUTHENTICATION_FAILED,
                          "align the From domain", "spf=pass dkim=pass dmarc=fail")
    failed = StepResult(Step.DELIVERY, Status.FAILED, 0.5, diagnosis)
    steps = tuple(failed if s is Step.DELIVERY else StepResult(s, Status.OK, 0.01) for s in Step)
    now = time.time()
    state = InboxState(make_inbox(), last=CheckResult("billing", now, 1.0, steps, "p1"),
                       delivery=DeliveryResult("billing", "p1", failed, folder="INBOX",
                                               verdict=verdict))
    return inbox_status(state, now + 60)


def test_a_failing_delivery_shows_its_hint_and_the_receivers_verdict():
    page = inbox_page.render_html(failing_delivery(), [], {"last": None, "last_failure": None})
    latest = page[page.index("Latest result"):page.index("Delivery of the last test email")]
    assert "align the From domain" in latest
    assert "delivery_failed / authentication_failed" in latest
    delivery = page[page.index("Delivery of the last test email"):]
    assert "<dt>dmarc</dt><dd>fail (dmarc=fail reason=&quot;p=reject&quot;)</dd>" in delivery
    assert "Authentication-Results by mx.example" in delivery


def test_an_empty_transcript_is_shown_as_such_and_a_missing_one_not_at_all():
    page = inbox_page.render_html(failing_delivery(), [], {"last": "", "last_failure": None})
    assert "Transcript: last check" in page and "(no lines recorded)" in page
    assert "Transcript: last failure" not in page
