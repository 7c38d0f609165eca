"""One verification of one inbox: the IMAP chain, then the SMTP chain, every step recorded.

The chains are independent (a broken IMAP server must not hide the state of SMTP); inside a
chain the steps after a failure are recorded as skipped. Each step gets the smaller of its
timeout and what is left of the check's deadline, and a watchdog cuts the connection when
that runs out. Connections are closed (LOGOUT / QUIT) whatever happened.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence

from . import errors
from .classify import Context, classify
from .config import Inbox
from .deadline import WATCHDOG, Deadline, Watchdog
from .limits import ConnectionLimits
from .model import CheckResult, Status, Step, StepResult
from .probes.imap import ImapProbe
from .probes.smtp import SmtpProbe

log = logging.getLogger(__name__)

DEADLINE_NOTE = "not run: the check's deadline was exhausted"


class Checker:
    """Runs checks; the clock and the watchdog are injected so tests can drive time."""

    def __init__(self, limits: ConnectionLimits | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, watchdog: Watchdog = WATCHDOG):
        self.limits = limits or ConnectionLimits()
        self.clock, self.wall, self.watchdog = clock, wall, watchdog

    def check(self, inbox: Inbox, probe_id: str | None = None) -> CheckResult:
        probe_id = probe_id or uuid.uuid4().hex  # one token: some IMAP searches split at dashes
        started_at, t0 = self.wall(), self.clock()
        deadline = Deadline(inbox.deadline, self.clock)
        steps: list[StepResult] = []

        imap = ImapProbe(inbox)
        steps += self._guarded(inbox, imap, inbox.imap.host, deadline, (
            (Step.IMAP_CONNECT, imap.connect),
            (Step.IMAP_LOGIN, imap.login),
            (Step.IMAP_VALIDATE, imap.validate),
        ))
        smtp = SmtpProbe(inbox, probe_id)
        smtp_steps: list[tuple[Step, Callable[[float], None]]] = [
            (Step.SMTP_CONNECT, smtp.connect), (Step.SMTP_LOGIN, smtp.login)]
        if inbox.test_email_to:
            smtp_steps.append((Step.TEST_EMAIL, smtp.send_test_email))
        steps += self._guarded(inbox, smtp, inbox.smtp.host, deadline, smtp_steps)
        if not inbox.test_email_to:
            steps.append(StepResult(Step.TEST_EMAIL, Status.SKIPPED,
                                    note="disabled: no test_email.to configured"))
        certificates = [p.certificate for p in (imap, smtp) if p.certificate]

        return CheckResult(inbox=inbox.name, started_at=started_at,
                           duration_seconds=self.clock() - t0, steps=tuple(steps),
                           probe_id=probe_id, certificates=tuple(certificates))

    def _guarded(self, inbox: Inbox, probe: ImapProbe | SmtpProbe, host: str,
                 deadline: Deadline, chain: Sequence[tuple[Step, Callable[[float], None]]]
                 ) -> list[StepResult]:
        """One chain on one connection, within the connection caps; always closed."""
        with self.limits.slot(probe.protocol.value, host, inbox.username,
                              deadline.remaining()) as granted:
            if not granted:
                note = "not run: no connection slot free before the deadline (connection caps)"
                return [StepResult(step, Status.SKIPPED, note=note) for step, _ in chain]
            try:
                return self._chain(inbox, probe, deadline, chain)
            finally:
                probe.close()

    def _chain(self, inbox: Inbox, probe: ImapProbe | SmtpProbe, deadline: Deadline,
               chain: Sequence[tuple[Step, Callable[[float], None]]]) -> list[StepResult]:
        results: list[StepResult] = []
        broken: str | None = None
        for step, run in chain:
            budget = min(inbox.timeout, deadline.remaining())
            if broken is None and budget <= 0:
                broken = DEADLINE_NOTE
            if broken is not None:
                results.append(StepResult(step, Status.SKIPPED, note=broken))
                continue
            result = self._step(inbox, probe, step, run, budget)
            results.append(result)
            if result.status is Status.FAILED:
                broken = f"not run: {step.value} failed"
        return results

    def _step(self, inbox: Inbox, probe: ImapProbe | SmtpProbe, step: Step,
              run: Callable[[float], None], budget: float) -> StepResult:
        t0 = self.clock()
        try:
            with self.watchdog.guard(budget, probe.conn.abort):
                run(budget)
            return StepResult(step, Status.OK, self.clock() - t0)
        except Exception as e:  # noqa: BLE001 - a probe reports; only our bugs should escape
            elapsed = self.clock() - t0
            if isinstance(e, TimeoutError) or elapsed >= budget * 0.98:
                # A socket timeout, or the watchdog cut the socket: what the library raised
                # then is a symptom. Say what happened, keep the original as the cause.
                timeout = errors.StepTimeout(
                    f"timed out after {budget:.1f}s (during {probe.conn.phase.value})")
                timeout.__cause__ = e
                e = timeout
            endpoint = inbox.imap if step.protocol.value == "imap" else inbox.smtp
            ctx = Context(endpoint.host, endpoint.port, endpoint.security, inbox.provider)
            diagnosis = classify(step, e, probe.conn.phase, ctx, inbox.secrets())
            log.warning("step failed", extra={"inbox": inbox.name, "step": step.value,
                                               "category": diagnosis.category.value,
                                               "reason": diagnosis.reason.value,
                                               "detail": diagnosis.detail})
            return StepResult(step, Status.FAILED, elapsed, diagnosis)
