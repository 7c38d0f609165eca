"""The optional `delivery` step: confirm the test email arrived, off the check workers.

A check ends when the test email is accepted; the confirmation is a separate, later result.
A check worker therefore never waits minutes for a mail: pending deliveries sit in one heap
ordered by their next poll, and a small pool polls them. A poll is one short IMAP session
(connect, login, SEARCH HEADER on the probe id in the watched folders and Junk, cleanup,
LOGOUT), taken within the same per-account and per-host caps as the checks, then released:
the account is never held between polls. Polls back off (0.5 s doubling to 15 s) until the
delivery timeout. At 1,000 inboxes that is a few polls per delivery on 4 threads, instead of
1,000 threads blocked in waits.

After a miss, a poll waits in IDLE (where the server offers it) for up to IDLE_WINDOW seconds
and searches again when new mail is announced: the delivery is seen as it lands. IDLE for the
whole timeout would hold the account's one connection for minutes, and the checks of that
account would queue behind it; so the wait is short, and polling with backoff covers the rest
(and servers without IDLE).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from imapclient import IMAPClient

from . import errors
from .classify import Context, classify
from .config import Inbox
from .deadline import WATCHDOG
from .deliverability import Verdict, read_header
from .deliverability import hint as deliverability_hint
from .limits import ConnectionLimits
from .model import Phase, Status, Step, StepResult
from .oauth.tokens import TokenCache
from .probe_id import ProbeKey
from .probes import delivery
from .probes.base import converse
from .probes.imap import ImapProbe

log = logging.getLogger(__name__)

FIRST_POLL = 0.5
MAX_POLL = 15.0
SWEEP_AGE = 3600.0  # probe mails of ours older than this are removed at start
# After a miss, a poll waits in IDLE (RFC 2177) this long at most for the mail to arrive: the
# delivery is seen the moment it lands, yet the account's single connection is never held
# for long (the checks of the same account queue behind it).
IDLE_WINDOW = 5.0
SENT_COPY_FIRST = 2.0  # the copy in the Sent folder is looked for this long after sending...
SENT_COPY_TIMEOUT = 10.0  # ...and once more at this point, the last
SWEEP_RETRY = 30.0  # seconds before a sweep that found its account busy tries again
SWEEP_ATTEMPTS = 10


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


@dataclass(frozen=True)
class DeliveryResult:
    inbox: str
    probe_id: str
    step: StepResult  # duration_seconds: found - accepted by the SMTP server
    received_seconds: float | None = None  # last Received: header - accepted, when present
    folder: str | None = None
    verdict: Verdict | None = None  # SPF/DKIM/DMARC where it landed (None: not found)


@dataclass(order=True)
class _Pending:
    due: float
    seq: int
    inbox: Inbox
    probe_id: str = ""
    accepted_at: float = 0.0
    deadline: float = 0.0
    backoff: float = FIRST_POLL
    sent_copy: bool = False  # remove the copy in the sender's Sent folder (not a delivery)


def watched(inbox: Inbox) -> Inbox:
    """The inbox as seen by the watcher: the watched account's server and login."""
    d = inbox.delivery
    assert d is not None
    return replace(inbox, imap=d.imap, username=d.username, password=d.password, oauth=d.oauth)


def _logged_in(inbox: Inbox, probe: ImapProbe) -> IMAPClient:
    """The watched account's session, for a poll or the sweep (the slot is held)."""
    probe.connect(inbox.timeout)
    probe.login(inbox.timeout)
    assert probe.client is not None
    return probe.client


class DeliveryConfirmer:
    def __init__(self, limits: ConnectionLimits, on_result: Callable[[Inbox, DeliveryResult], None],
                 workers: int = 4, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, tokens: TokenCache | None = None,
                 probe_key: ProbeKey | None = None):
        self.limits, self.on_result = limits, on_result
        self.tokens = tokens or TokenCache()
        # Cleanup removes only mail signed with this key (the checker's: the same object).
        self.probe_key = probe_key or ProbeKey.generate()
        self._clock, self._wall = clock, wall
        self._heap: list[_Pending] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="delivery")
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="delivery-confirmer", daemon=True)
        self._thread.start()

    def expect(self, inbox: Inbox, probe_id: str, accepted_at: float) -> None:
        """A test email was accepted: start looking for it."""
        assert inbox.delivery is not None
        now = self._clock()
        p = _Pending(now + FIRST_POLL, next(self._seq), inbox, probe_id, accepted_at,
                     now + inbox.delivery.timeout)
        with self._cond:
            heapq.heappush(self._heap, p)
            self._cond.notify()

    def expect_sent_copy(self, inbox: Inbox, probe_id: str, accepted_at: float) -> None:
        """A test email was accepted: remove the copy the provider files in the account's Sent
        folder (Gmail and Microsoft 365 keep one of SMTP-submitted mail), once it appears."""
        now = self._clock()
        # Two looks, not a poll: providers file the copy while accepting the mail, and every
        # look is a login on the account.
        p = _Pending(now + SENT_COPY_FIRST, next(self._seq), inbox, probe_id, accepted_at,
                     now + SENT_COPY_TIMEOUT, backoff=SENT_COPY_TIMEOUT, sent_copy=True)
        with self._cond:
            heapq.heappush(self._heap, p)
            self._cond.notify()

    def sweep(self, inbox: Inbox, attempt: int = 0) -> None:
        """At start: remove stale probe mails of ours from the watched folders."""
        with self._cond:
            if self._stopped:
                return
        self._pool.submit(self.sweep_now, inbox, attempt)

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                now = self._clock()
                if not self._heap or self._heap[0].due > now:
                    self._cond.wait(None if not self._heap else self._heap[0].due - now)
                    continue
                p = heapq.heappop(self._heap)
            self._pool.submit(self._poll, p)

    def _again(self, p: _Pending) -> None:
        p.backoff = min(p.backoff * 2, MAX_POLL)
        p.due = min(self._clock() + p.backoff, p.deadline)
        with self._cond:
            heapq.heappush(self._heap, p)
            self._cond.notify()

    def _poll(self, p: _Pending) -> None:
        if p.sent_copy:
            if not self.remove_sent_copy(p.inbox, p.probe_id, final=self._clock() >= p.deadline):
                self._again(p)
            return
        try:
            now = self._clock()
            result = self.poll_once(p.inbox, p.probe_id, p.accepted_at, final=now >= p.deadline,
                                    idle_for=min(IDLE_WINDOW, p.deadline - now))
        except Exception:  # our bug: report it, do not lose the worker
            log.exception("delivery poll crashed", extra={"inbox": p.inbox.name})
            return
        if result is None:
            self._again(p)
        else:
            self.on_result(p.inbox, result)

    def confirm_now(self, inbox: Inbox, probe_id: str, accepted_at: float) -> DeliveryResult:
        """Synchronous (the `check` command): poll with backoff until found or timed out."""
        assert inbox.delivery is not None
        deadline, backoff = self._clock() + inbox.delivery.timeout, FIRST_POLL
        while True:
            time.sleep(min(backoff, max(0.0, deadline - self._clock())))
            now = self._clock()
            result = self.poll_once(inbox, probe_id, accepted_at, final=now >= deadline,
                                    idle_for=min(IDLE_WINDOW, deadline - now))
            if result is not None:
                return result
            backoff = min(backoff * 2, MAX_POLL)

    def poll_once(self, inbox: Inbox, probe_id: str, accepted_at: float,
                  final: bool, idle_for: float = 0.0) -> DeliveryResult | None:
        """One look; after a miss, wait up to `idle_for` seconds in IDLE (when offered) for new
        mail and look again. None: not there yet (and not final)."""
        d = inbox.delivery
        assert d is not None
        target = watched(inbox)
        # Never wait for a slot on a worker: a busy account or server means "look again later".
        slot = self.limits.try_acquire("imap", d.imap.host, {d.username})
        if slot is None:
            return None if not final else self._failed(
                inbox, probe_id, errors.DeliveryTimeout("no connection slot for the watcher"),
                Phase.COMMAND, accepted_at)
        probe = ImapProbe(target, self.tokens)
        try:
            # One bound for the whole session (a server may trickle): the steps' deadline
            # plus the IDLE window.
            with WATCHDOG.guard(inbox.deadline + max(0.0, idle_for), probe.conn.abort):
                return converse(probe, lambda: self._look(inbox, probe, probe_id, accepted_at,
                                                          final, idle_for))
        except Exception as e:  # noqa: BLE001 - the watched server's trouble: a failed step
            return self._failed(inbox, probe_id, e, probe.conn.phase, accepted_at)
        finally:
            self.limits.release(slot)

    def _look(self, inbox: Inbox, probe: ImapProbe, probe_id: str, accepted_at: float,
              final: bool, idle_for: float) -> DeliveryResult | None:
        d = inbox.delivery
        assert d is not None
        client = _logged_in(inbox, probe)
        junk = delivery.junk_folder(client)
        folders = [f for f in (*d.folders, junk) if f]
        hits = self._search(client, folders, probe_id)
        if not hits and idle_for > 0 and delivery.wait_for_new_mail(client, d.folders[0], idle_for):
            hits = self._search(client, folders, probe_id)
        for folder, found in hits:
            now = self._wall()
            if d.cleanup:
                delivery.remove(client, folder, probe_id, delivery.trash_folder(client),
                                self.probe_key)
            received = found.received[0] - accepted_at if found.received else None
            verdict = read_header(found.verdict_fields, d.authserv_ids)
            if folder == junk:
                return self._failed(inbox, probe_id, errors.DeliveredToJunk(
                    f"found in {folder} after {now - accepted_at:.1f}s; {verdict.summary()}"),
                    Phase.COMMAND, accepted_at, folder=folder, verdict=verdict)
            if verdict.failed:
                return self._failed(inbox, probe_id, errors.AuthenticationFailed(
                    verdict.summary()), Phase.COMMAND, accepted_at, folder=folder,
                    verdict=verdict, hint=deliverability_hint(verdict, _domain(inbox.email)))
            step = StepResult(Step.DELIVERY, Status.OK, max(0.0, now - accepted_at))
            return DeliveryResult(inbox.name, probe_id, step, received, folder, verdict)
        if not final:
            return None
        return self._failed(inbox, probe_id, errors.DeliveryTimeout(
            f"not found in {', '.join(dict.fromkeys(folders))} within "
            f"{d.timeout:g}s"), Phase.COMMAND, accepted_at)

    def remove_sent_copy(self, inbox: Inbox, probe_id: str, final: bool) -> bool:
        """One attempt; True when done (removed, no Sent folder, or given up), False: the copy
        may still come, try again later."""
        slot = self.limits.try_acquire("imap", inbox.imap.host, {inbox.username, inbox.email})
        if slot is None:
            return final
        probe = ImapProbe(inbox, self.tokens)
        try:
            with WATCHDOG.guard(inbox.deadline, probe.conn.abort):
                removed = converse(probe, lambda: self._remove_sent(inbox, probe, probe_id))
        except Exception as e:  # noqa: BLE001 - best effort: the sweep of the next start retries
            log.warning("removing the test email's Sent copy failed",
                        extra={"inbox": inbox.name, "error": type(e).__name__})
            return True
        finally:
            self.limits.release(slot)
        if removed is None:
            return True  # no Sent folder: nothing to clean
        if removed:
            log.debug("Sent copy of the test email removed", extra={"inbox": inbox.name})
        return removed > 0 or final

    def _remove_sent(self, inbox: Inbox, probe: ImapProbe, probe_id: str) -> int | None:
        client = _logged_in(inbox, probe)
        sent = delivery.sent_folder(client)
        if sent is None:
            return None
        return delivery.remove(client, sent, probe_id, delivery.trash_folder(client),
                               self.probe_key)

    def _search(self, client: IMAPClient, folders: list[str],
                probe_id: str) -> list[tuple[str, delivery.Found]]:
        out = []
        for folder in dict.fromkeys(folders):
            found = delivery.find(client, folder, probe_id, self.probe_key)
            if found is not None:
                out.append((folder, found))
        return out

    def _failed(self, inbox: Inbox, probe_id: str, exc: BaseException, phase: Phase,
                accepted_at: float, folder: str | None = None, verdict: Verdict | None = None,
                hint: str | None = None) -> DeliveryResult:
        d = inbox.delivery
        assert d is not None
        ctx = Context(d.imap.host, d.imap.port, d.imap.security, inbox.provider)
        diagnosis = classify(Step.DELIVERY, exc, phase, ctx,
                             (*inbox.secrets(), *self.tokens.secrets()))
        if hint is not None:  # what this verdict needs fixed, rather than the general advice
            diagnosis = replace(diagnosis, hint=hint)
        log.warning("step failed", extra={"inbox": inbox.name, "step": Step.DELIVERY.value,
                                           "category": diagnosis.category.value,
                                           "reason": diagnosis.reason.value,
                                           "detail": diagnosis.detail})
        step = StepResult(Step.DELIVERY, Status.FAILED, max(0.0, self._wall() - accepted_at),
                          diagnosis)
        return DeliveryResult(inbox.name, probe_id, step, None, folder, verdict)

    def sweep_now(self, inbox: Inbox, attempt: int = 0) -> None:
        d = inbox.delivery
        if d is None or not d.cleanup:
            return
        slot = self.limits.try_acquire("imap", d.imap.host, {d.username})
        if slot is None:
            # Busy (the checks run first at start): try again later, without holding a worker.
            if attempt < SWEEP_ATTEMPTS:
                timer = threading.Timer(SWEEP_RETRY, self.sweep, args=(inbox, attempt + 1))
                timer.daemon = True
                timer.start()
            return
        probe = ImapProbe(watched(inbox), self.tokens)
        try:
            with WATCHDOG.guard(inbox.deadline, probe.conn.abort):
                converse(probe, lambda: self._sweep(inbox, probe))
        except Exception as e:  # noqa: BLE001 - a sweep is best effort; the next start retries
            log.warning("sweep failed", extra={"inbox": inbox.name, "error": type(e).__name__})
        finally:
            self.limits.release(slot)

    def _sweep(self, inbox: Inbox, probe: ImapProbe) -> None:
        d = inbox.delivery
        assert d is not None
        client = _logged_in(inbox, probe)
        trash = delivery.trash_folder(client)
        for folder in dict.fromkeys(f for f in (*d.folders, delivery.junk_folder(client)) if f):
            removed = delivery.remove(client, folder, None, trash, self.probe_key,
                                      older_than=self._wall() - SWEEP_AGE)
            if removed:
                log.info("stale probe mails removed", extra={"inbox": inbox.name,
                                                             "folder": folder, "count": removed})
