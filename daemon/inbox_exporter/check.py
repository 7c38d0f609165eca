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
from .model import CheckResult, Diagnosis, Phase, Status, Step, StepResult
from .oauth.tokens import TokenCache
from .probes.base import CLOSE_TIMEOUT, Probe
from .probes.imap import ImapProbe
from .probes.smtp import SmtpProbe

log = logging.getLogger(__name__)


class Checker:
    """Runs checks; the clock and the watchdog are injected so tests can drive time. OAuth
    inboxes take their access tokens from `tokens` (one cache for the process)."""

    def __init__(self, limits: ConnectionLimits | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, watchdog: Watchdog = WATCHDOG,
                 tokens: TokenCache | None = None):
        self.limits = limits or ConnectionLimits()
        self.tokens = tokens or TokenCache()
        self.clock, self.wall, self.watchdog = clock, wall, watchdog

    def check(self, inbox: Inbox, probe_id: str | None = None) -> CheckResult:
        probe_id = probe_id or uuid.uuid4().hex  # one token: some IMAP searches split at dashes
        started_at, t0 = self.wall(), self.clock()
        deadline = Deadline(inbox.deadline, self.clock)
        steps: list[StepResult] = []

        imap = ImapProbe(inbox, self.tokens)
        steps += self._guarded(inbox, imap, deadline, (
            (Step.IMAP_CONNECT, imap.connect),
            (Step.IMAP_LOGIN, imap.login),
            (Step.IMAP_VALIDATE, imap.validate),
        ))
        smtp = SmtpProbe(inbox, probe_id, self.tokens)
        smtp_steps: list[tuple[Step, Callable[[float], None]]] = [
            (Step.SMTP_CONNECT, smtp.connect), (Step.SMTP_LOGIN, smtp.login)]
        if inbox.test_email_to:
            smtp_steps.append((Step.TEST_EMAIL, smtp.send_test_email))
        steps += self._guarded(inbox, smtp, deadline, smtp_steps)
        if not inbox.test_email_to:
            steps.append(StepResult(Step.TEST_EMAIL, Status.SKIPPED,
                                    note="disabled: no test_email.to configured"))
        certificates = [p.certificate for p in (imap, smtp) if p.certificate]

        return CheckResult(inbox=inbox.name, started_at=started_at,
                           duration_seconds=self.clock() - t0, steps=tuple(steps),
                           probe_id=probe_id, certificates=tuple(certificates),
                           sent_at=smtp.accepted_at)

    def _guarded(self, inbox: Inbox, probe: Probe, deadline: Deadline,
                 chain: Sequence[tuple[Step, Callable[[float], None]]]) -> list[StepResult]:
        """One chain on one connection, within the connection caps; always closed, and the
        close is bounded too (a server may trickle its LOGOUT reply)."""
        # Waiting for a slot is the exporter's own queue, not the server's time: the deadline
        # stands still meanwhile, and the wait is bounded by the interval (the next run is due).
        with deadline.paused():
            slot = self.limits.acquire(probe.protocol.value, probe.endpoint.host,
                                       {inbox.username, inbox.email}, inbox.interval)
        if slot is None:
            return self._not_run(inbox, probe, chain, errors.StepTimeout(
                f"not run: no connection slot was free for {inbox.interval:g}s: the exporter "
                "is over capacity (checks.max_connections_per_host, shared accounts)"))
        try:
            return self._chain(inbox, probe, deadline, chain)
        finally:
            with self.watchdog.guard(CLOSE_TIMEOUT, probe.conn.abort):
                probe.close()
            self.limits.release(slot)

    def _chain(self, inbox: Inbox, probe: Probe, deadline: Deadline,
               chain: Sequence[tuple[Step, Callable[[float], None]]]) -> list[StepResult]:
        results: list[StepResult] = []
        for n, (step, run) in enumerate(chain):
            budget = min(inbox.timeout, deadline.remaining())
            if budget <= 0:
                # Not verified is not a success: the rest of the chain fails as a timeout.
                return results + self._not_run(inbox, probe, chain[n:], errors.StepTimeout(
                    f"not run: the check's deadline ({inbox.deadline:g}s) was exhausted"))
            result = self._step(inbox, probe, step, run, budget)
            results.append(result)
            if result.status is Status.FAILED:
                note = f"not run: {step.value} failed"
                return results + [StepResult(s, Status.SKIPPED, note=note) for s, _ in chain[n + 1:]]
        return results

    def _not_run(self, inbox: Inbox, probe: Probe,
                 chain: Sequence[tuple[Step, Callable[[float], None]]],
                 why: Exception) -> list[StepResult]:
        first = StepResult(chain[0][0], Status.FAILED, 0.0,
                           self._diagnose(inbox, probe, chain[0][0], why, Phase.COMMAND))
        note = f"not run: {chain[0][0].value} failed"
        return [first] + [StepResult(s, Status.SKIPPED, note=note) for s, _ in chain[1:]]

    def _step(self, inbox: Inbox, probe: Probe, step: Step,
              run: Callable[[float], None], budget: float) -> StepResult:
        t0 = self.clock()
        try:
            with self.watchdog.guard(budget, probe.conn.abort):
                run(budget)
            return StepResult(step, Status.OK, self.clock() - t0)
        except Exception as e:  # noqa: BLE001 - a probe reports; only our bugs should escape
            elapsed = self.clock() - t0
            if isinstance(e, TimeoutError) or probe.conn.aborted:
                # A socket timeout, or the watchdog cut the socket: what the library raised
                # then is a symptom. Say what happened, keep the original as the cause.
                timeout = errors.StepTimeout(
                    f"timed out after {budget:g}s (during {probe.conn.phase.value})")
                timeout.__cause__ = e
                e = timeout
            return StepResult(step, Status.FAILED, elapsed, self._diagnose(inbox, probe, step, e))

    def _diagnose(self, inbox: Inbox, probe: Probe, step: Step, exc: Exception,
                  phase: Phase | None = None) -> Diagnosis:
        ep = probe.endpoint
        ctx = Context(ep.host, ep.port, ep.security, inbox.provider)
        secrets = (*inbox.secrets(), *self.tokens.secrets()) if inbox.oauth else inbox.secrets()
        diagnosis = classify(step, exc, phase or probe.conn.phase, ctx, secrets)
        log.warning("step failed", extra={"inbox": inbox.name, "step": step.value,
                                           "category": diagnosis.category.value,
                                           "reason": diagnosis.reason.value,
                                           "detail": diagnosis.detail})
        return diagnosis
