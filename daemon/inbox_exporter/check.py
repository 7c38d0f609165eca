"""One verification of one inbox: the IMAP chain and the SMTP chain, every step recorded.

The chains are independent (a broken IMAP server must not hide the state of SMTP), so a check
is planned as two legs, one connection each, that may run one after the other (`check`) or at
the same time on the daemon's runner (`plan`). Inside a chain the steps after a failure are
recorded as skipped. Each step gets the smaller of its timeout and what is left of the leg's
deadline, and a watchdog cuts the connection when that runs out. Connections are closed
(LOGOUT / QUIT) whatever happened, the close bounded by the watchdog too.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import errors
from .classify import Context, classify
from .config import Inbox
from .deadline import WATCHDOG, Deadline, Watchdog
from .limits import ConnectionLimits
from .model import CheckResult, Diagnosis, Phase, Status, Step, StepResult
from .oauth.tokens import TokenCache
from .probe_id import ProbeKey
from .probes.base import Probe, converse
from .probes.imap import ImapProbe
from .probes.smtp import SmtpProbe
from .transcript import Transcript

if TYPE_CHECKING:
    from .runner import Runner

log = logging.getLogger(__name__)

Chain = Sequence[tuple[Step, Callable[[float], None]]]


@dataclass(eq=False)
class Leg:
    """One chain on one connection: what it takes to schedule it, and its two endings."""

    protocol: str  # imap | smtp
    host: str
    identities: frozenset[str]
    run: Callable[[], list[StepResult]]  # talks to the server (the slot is held); never raises
    not_run: Callable[[str], list[StepResult]]  # it never got a slot: failed as a timeout
    abort: Callable[[], None]  # cut its connection now (shutdown after the grace period)


class Plan:
    """A check of one inbox in two legs; `assemble` makes the result once both have ended."""

    def __init__(self, checker: Checker, inbox: Inbox, probe_id: str,
                 hold_test_email: str | None):
        self.inbox, self.probe_id = inbox, probe_id
        self._checker = checker
        self._deadline: Deadline | None = None
        self._deadline_lock = threading.Lock()
        self.started_at, self._t0 = checker.wall(), checker.clock()
        self.imap = ImapProbe(inbox, checker.tokens)
        self.smtp = SmtpProbe(inbox, probe_id, checker.tokens)
        # Both legs write to one transcript, timed from the check's start.
        self.transcript = Transcript(inbox.secrets(), checker.clock)
        self.imap.transcript = self.smtp.transcript = self.transcript
        smtp_chain: list[tuple[Step, Callable[[float], None]]] = [
            (Step.SMTP_CONNECT, self.smtp.connect), (Step.SMTP_LOGIN, self.smtp.login)]
        self._test_email_note = None
        if not inbox.test_email_to:
            self._test_email_note = "disabled: no test_email.to configured"
        elif hold_test_email is not None:
            self._test_email_note = hold_test_email
        else:
            smtp_chain.append((Step.TEST_EMAIL, self.smtp.send_test_email))
        self.legs = (self._leg(self.imap, (
            (Step.IMAP_CONNECT, self.imap.connect),
            (Step.IMAP_LOGIN, self.imap.login),
            (Step.IMAP_VALIDATE, self.imap.validate))), self._leg(self.smtp, smtp_chain))

    def deadline(self) -> Deadline:
        """One deadline per check, from the moment its first leg starts talking: legs running
        at the same time share it, a leg run after the other gets what is left."""
        with self._deadline_lock:
            if self._deadline is None:
                self._deadline = Deadline(self.inbox.deadline, self._checker.clock)
            return self._deadline

    def _leg(self, probe: Probe, chain: Chain) -> Leg:
        c, inbox = self._checker, self.inbox
        return Leg(probe.protocol.value, probe.endpoint.host,
                   frozenset({inbox.username, inbox.email}),
                   run=lambda: c.run_chain(inbox, probe, chain, self.deadline()),
                   not_run=lambda why: c.not_run(inbox, probe, chain, errors.StepTimeout(why)),
                   abort=probe.conn.abort)

    def assemble(self, imap_steps: list[StepResult], smtp_steps: list[StepResult]) -> CheckResult:
        steps = [*imap_steps, *smtp_steps]
        if self._test_email_note is not None:
            steps.append(StepResult(Step.TEST_EMAIL, Status.SKIPPED, note=self._test_email_note))
        certificates = [p.certificate for p in (self.imap, self.smtp) if p.certificate]
        return CheckResult(inbox=self.inbox.name, started_at=self.started_at,
                           duration_seconds=self._checker.clock() - self._t0, steps=tuple(steps),
                           probe_id=self.probe_id, certificates=tuple(certificates),
                           sent_at=self.smtp.accepted_at, transcript=self.transcript.packed())


class Checker:
    """Runs checks; the clock and the watchdog are injected so tests can drive time. OAuth
    inboxes take their access tokens from `tokens` (one cache for the process)."""

    def __init__(self, limits: ConnectionLimits | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, watchdog: Watchdog = WATCHDOG,
                 tokens: TokenCache | None = None, probe_key: ProbeKey | None = None):
        self.limits = limits or ConnectionLimits()
        self.probe_key = probe_key or ProbeKey.generate()
        self.clock, self.wall, self.watchdog = clock, wall, watchdog
        self.tokens = tokens or TokenCache()

    def plan(self, inbox: Inbox, probe_id: str | None = None,
             hold_test_email: str | None = None) -> Plan:
        """`hold_test_email`: why no test email goes out this time (the step's note)."""
        return Plan(self, inbox, probe_id or self.probe_key.new_id(), hold_test_email)

    def check(self, inbox: Inbox, probe_id: str | None = None,
              hold_test_email: str | None = None) -> CheckResult:
        """The whole check on the caller's thread: each leg waits for its slot (at most the
        interval: then the next run is due) and runs. For the `check` command and tests; the
        daemon runs legs on its runner and never waits for a slot on a thread."""
        plan = self.plan(inbox, probe_id, hold_test_email)
        done: list[list[StepResult]] = []
        for leg in plan.legs:
            # Waiting for a slot is the exporter's own queue, not the server's time.
            with plan.deadline().paused() if done else contextlib.nullcontext():
                slot = self.limits.acquire(leg.protocol, leg.host, leg.identities, inbox.interval)
            if slot is None:
                done.append(leg.not_run(
                    f"not run: no connection slot was free for {inbox.interval:g}s: the exporter "
                    "is over capacity (checks.max_connections_per_host, shared accounts)"))
                continue
            try:
                done.append(leg.run())
            finally:
                self.limits.release(slot)
        return plan.assemble(*done)

    def check_async(self, runner: Runner, inbox: Inbox, on_result: Callable[[CheckResult], None],
                    hold_test_email: str | None = None, expires_in: float | None = None,
                    on_start: Callable[[float], None] = lambda waited: None) -> None:
        """Queue both legs on `runner` (see runner.py); `on_result` gets the check once both
        have ended, on the worker that ended last. A leg not started within `expires_in`
        (default: the interval) fails as not run."""
        from .runner import Job

        plan = self.plan(inbox, hold_test_email=hold_test_email)
        ended: dict[str, list[StepResult]] = {}
        lock = threading.Lock()

        def end(protocol: str, steps: list[StepResult]) -> None:
            with lock:
                ended[protocol] = steps
                if len(ended) < 2:
                    return
            on_result(plan.assemble(ended["imap"], ended["smtp"]))

        expires_at = self.clock() + (expires_in or inbox.interval)

        def submit(leg: Leg) -> None:
            runner.submit(Job(
                leg.protocol, leg.host, leg.identities,
                run=lambda: end(leg.protocol, leg.run()),
                expire=lambda why: end(leg.protocol, leg.not_run(why)),
                expires_at=expires_at, on_start=on_start, abort=leg.abort))

        for leg in plan.legs:
            submit(leg)

    # --- one chain ---------------------------------------------------------------------------

    def run_chain(self, inbox: Inbox, probe: Probe, chain: Chain,
                  deadline: Deadline) -> list[StepResult]:
        """The chain on one connection (the slot is held); always closed, under the watchdog."""
        return converse(probe, lambda: self._chain(inbox, probe, deadline, chain), self.watchdog)

    def _chain(self, inbox: Inbox, probe: Probe, deadline: Deadline,
               chain: Chain) -> list[StepResult]:
        results: list[StepResult] = []
        for n, (step, run) in enumerate(chain):
            budget = min(inbox.timeout, deadline.remaining())
            if budget <= 0:
                # Not verified is not a success: the rest of the chain fails as a timeout.
                return results + self.not_run(inbox, probe, chain[n:], errors.StepTimeout(
                    f"not run: the check's deadline ({inbox.deadline:g}s) was exhausted"))
            result = self._step(inbox, probe, step, run, budget)
            results.append(result)
            if result.status is Status.FAILED:
                note = f"not run: {step.value} failed"
                return results + [StepResult(s, Status.SKIPPED, note=note) for s, _ in chain[n + 1:]]
        return results

    def not_run(self, inbox: Inbox, probe: Probe, chain: Chain, why: Exception) -> list[StepResult]:
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
