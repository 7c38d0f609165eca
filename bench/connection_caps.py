"""Benchmark: the connection caps hold under load, counted outside the daemon (issue #3).

The daemon promises at most ONE IMAP and ONE SMTP connection at a time per account
(protocol, host, login), and at most `checks.max_connections_per_host` connections at a time
per server host, over all inboxes and both protocols. This runs the real `Exporter`
in-process against the lab's real Dovecot and Postfix, with every connection going through a
counting TCP proxy on 127.0.0.1, and checks what the proxies saw:

  A  per account: many inboxes that all log in as alice; IMAP to the lab's `imaps_limited`
     Dovecot (mail_max_userip_connections = 1, stricter than the issue's 2), SMTP to
     submission. At most 1 simultaneous IMAP and 1 SMTP connection, and not one failure
     with reason too_many_connections (nor a refusal in Dovecot's own log).
  B  per host: many inboxes, one lab user each, IMAPS and submission. At most
     max_connections_per_host connections per proxy, and for IMAP+SMTP together (both
     proxies are host 127.0.0.1, and the cap is per host across protocols). A control run
     with the cap raised to 1000 shows that the demand was really there, and that the
     measurement does see an excess when there is one.

The proxies hold every forwarded chunk for a few milliseconds: loopback checks are otherwise
so fast that they hardly overlap and the caps would never be tested. TLS stays end to end
(the proxy only relays bytes), so inboxes keep host 127.0.0.1 and the lab CA verifies.
A connection counts from the proxy's accept until the client closes its side, i.e. for
exactly as long as the monitor holds it.

    .venv/bin/python bench/connection_caps.py [--seconds-a 30] [--seconds-b 30] ...

Needs root (the lab does). About 1.5 minutes with the defaults; exits 1 if any check FAILs.
--alias-logins / --alias-hosts name the same account / server two ways (alice and
alice@example.test; localhost and 127.0.0.1): the caps are keyed by the configured strings,
so these runs show what a server then sees.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import re
import secrets
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlab import Report, version  # first: it puts daemon/ and lab/ on sys.path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from inbox_exporter.daemon import Exporter
from inbox_exporter.store import InboxState
from maillab import MailLab

WINDOW = 5.0  # seconds per "peak per window" column
EOF = None  # the marker a _Pipe forwards as a half-close


# --- counting proxy ---------------------------------------------------------------------

class Concurrency:
    """Simultaneous connections: now, the peak, the peak per time window and the time spent
    at each level. Updated only on the proxy loop's thread; read after the proxies stop."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.current = self.peak = self.opened = 0
        self.time_at: dict[int, float] = collections.defaultdict(float)
        self.window_peaks: dict[int, int] = {}
        self._since = t0

    def change(self, now: float, delta: int) -> None:
        self._advance(now)
        self.current += delta
        if delta > 0:
            self.opened += 1
        self.peak = max(self.peak, self.current)
        w = self._window(now)
        self.window_peaks[w] = max(self.window_peaks.get(w, 0), self.current)

    def finish(self, now: float) -> None:
        self._advance(now)

    def _window(self, now: float) -> int:
        return int((now - self.t0) // WINDOW)

    def _advance(self, now: float) -> None:
        # Time at the current level, and the level carried into windows without a change.
        self.time_at[self.current] += now - self._since
        for w in range(self._window(self._since), self._window(now) + 1):
            self.window_peaks[w] = max(self.window_peaks.get(w, 0), self.current)
        self._since = now

    def describe(self) -> str:
        levels = " ".join(f"{n}:{t:.1f}s" for n, t in sorted(self.time_at.items()) if t >= 0.05)
        peaks = " ".join(str(self.window_peaks[w]) for w in sorted(self.window_peaks))
        return (f"{self.opened} connections, max simultaneous {self.peak}\n"
                f"      time at each level: {levels}\n"
                f"      max per {WINDOW:g} s window: {peaks}")


class _Pipe:
    """One direction of a proxied connection: each chunk (or the EOF) is held `delay` seconds,
    then written in order. A FIFO, not one timer per chunk: equal timers may fire reordered."""

    def __init__(self, end: _End, delay: float):
        self.end, self.delay = end, delay
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None

    def push(self, data: bytes | None) -> None:
        loop = asyncio.get_running_loop()
        self.queue.append((loop.time() + self.delay, data))
        self.schedule()

    def schedule(self) -> None:
        if self.timer is None and self.queue and self.end.transport is not None:
            self.timer = asyncio.get_running_loop().call_at(self.queue[0][0], self._drain)

    def _drain(self) -> None:
        self.timer = None
        transport, now = self.end.transport, asyncio.get_running_loop().time()
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            if transport.is_closing():
                self.queue.clear()
                return
            if data is EOF:
                try:
                    transport.write_eof()
                except OSError:  # the other side is gone already (reset)
                    transport.abort()
                    return
                self.end.write_closed = True
                self.end.maybe_close()
            else:
                transport.write(data)
        self.schedule()


class _End(asyncio.Protocol):
    """One socket of a proxied connection, the client's or the server's. Half-closes are
    relayed (after the delay) like data; a reset cuts the other side at once."""

    def __init__(self, link: _Link, delay: float):
        self.link = link
        self.peer: _End | None = None
        self.transport: asyncio.Transport | None = None
        self.inbound = _Pipe(self, delay)  # data for this socket, from the peer
        self.read_closed = self.write_closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.link.made(self)
        self.inbound.schedule()  # data may have arrived while this end was connecting

    def data_received(self, data: bytes) -> None:
        self.peer.inbound.push(data)

    def eof_received(self) -> bool:
        self.read_closed = True
        self.link.closed_by(self)
        self.peer.inbound.push(EOF)
        self.maybe_close()
        return True  # keep writing: the other direction may still carry data

    def connection_lost(self, exc: Exception | None) -> None:
        self.read_closed = self.write_closed = True
        self.link.closed_by(self)
        if self.inbound.timer is not None:
            self.inbound.timer.cancel()
        peer = self.peer.transport
        if peer is not None and not peer.is_closing():
            if exc is None and not self.peer.write_closed:
                self.peer.inbound.push(EOF)
            elif exc is not None:
                peer.abort()

    def maybe_close(self) -> None:
        if self.read_closed and self.write_closed and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _Link:
    """One client connection and its upstream connection; counts itself open from the
    accept until the client closes its side."""

    def __init__(self, proxy: CountingProxy):
        self.proxy = proxy
        self.client, self.upstream = _End(self, proxy.delay), _End(self, proxy.delay)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.counted = False

    def made(self, end: _End) -> None:
        if end is self.client:
            self.counted = True
            self.proxy.links.add(self)
            self.proxy.count(+1)
            asyncio.get_running_loop().create_task(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: self.upstream, self.proxy.target_host,
                                         self.proxy.target_port)
        except OSError:
            self.client.abort()

    def closed_by(self, end: _End) -> None:
        if end is self.client and self.counted:
            self.counted = False
            self.proxy.count(-1)
        if self.client.read_closed and self.upstream.read_closed:
            self.proxy.links.discard(self)


class CountingProxy:
    """127.0.0.1:<port> -> target; counts simultaneous client connections into its own
    Concurrency and into any shared ones (a per-host total)."""

    def __init__(self, target_port: int, delay: float, shared: list[Concurrency], t0: float,
                 target_host: str = "127.0.0.1"):
        self.target_host, self.target_port, self.delay = target_host, target_port, delay
        self.concurrency = Concurrency(t0)
        self.counters = [self.concurrency, *shared]
        self.links: set[_Link] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    def count(self, delta: int) -> None:
        now = time.monotonic()
        for c in self.counters:
            c.change(now, delta)

    async def start(self) -> None:
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _Link(self).client, "127.0.0.1", 0, backlog=512)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.server.close()
        for link in list(self.links):
            link.client.abort()
            link.upstream.abort()
        await asyncio.sleep(0)  # let connection_lost run


class ProxyLoop:
    """An asyncio loop on a thread of its own, hosting the proxies of one scenario."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="proxies", daemon=True)
        self.thread.start()
        self.proxies: list[CountingProxy] = []

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add(self, proxy: CountingProxy) -> CountingProxy:
        self.run(proxy.start())
        self.proxies.append(proxy)
        return proxy

    def close(self) -> None:
        """Stop every proxy and the loop; the counters then stay as they were."""
        try:
            for p in self.proxies:
                self.run(p.stop())
            now = time.monotonic()
            self.run(self._finish(now))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()

    async def _finish(self, now: float) -> None:
        for c in {id(c): c for p in self.proxies for c in p.counters}.values():
            c.finish(now)


# --- running the exporter ---------------------------------------------------------------

@dataclass
class Outcome:
    checks_total: float = 0.0                  # inbox_exporter_checks_total
    ok: int = 0                                # results recorded in the store
    failed: int = 0
    failures_by_reason: dict[str, float] = field(default_factory=dict)  # category/reason -> n
    too_many: float = 0.0                      # inbox_check_failures_total{reason=too_many_connections}
    failures_by_step: collections.Counter = field(default_factory=collections.Counter)
    failures_by_cause: collections.Counter = field(default_factory=collections.Counter)
    other_details: list[str] = field(default_factory=list)  # a few failures not explained
    max_in_flight: float = 0.0
    clean_stop: bool = True
    inboxes: int = 0                           # configured
    completed: set[str] = field(default_factory=set)  # inboxes with a completed check

    @property
    def never_completed(self) -> int:
        return self.inboxes - len(self.completed)


def queued_out(detail: str, step_timeout: float) -> str | None:
    """Which way a failed step ran out of the check's deadline while it waited for a
    connection slot (the monitor's own queue, not the server); None for any other failure."""
    if "no connection slot was free" in detail:
        return "no slot before the deadline"
    if "deadline" in detail and "exhausted" in detail:
        return "deadline used up before the step"
    m = re.match(r"timed out after ([0-9.e-]+)s", detail)
    if m and float(m.group(1)) < step_timeout - 0.01:
        # The step's budget was what was left of the check's deadline, not its own timeout.
        return "cut short by the deadline"
    return None


def write_config(tmp: Path, lab, inboxes: list[dict], per_host: int, interval: str,
                 concurrency: int) -> Path:
    """Like tests/conftest.write_config: lab CA trusted, test emails to the lab's bcc user."""
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump({
        "checks": {"concurrency": concurrency, "max_connections_per_host": per_host},
        "defaults": {"interval": interval, "timeout": "3s", "ca_file": str(lab.ca_file),
                     "test_email": {"to": lab.users["bcc"].address}},
        "inboxes": inboxes}))
    return path


def entry(name: str, user, imap_port: int, smtp_port: int, login: str | None = None,
          host: str = "127.0.0.1") -> dict:
    e = {"name": name, "email": user.address, "password_env": env_name(name),
         "imap": {"host": host, "port": imap_port, "security": "ssl"},
         "smtp": {"host": host, "port": smtp_port, "security": "starttls"}}
    if login:
        e["username"] = login
    return e


def env_name(inbox_name: str) -> str:
    return "PW_" + inbox_name.upper().replace("-", "_").replace(".", "_")


def run_exporter(config: Path, environ: dict[str, str], seconds: float) -> Outcome:
    """The real Exporter for `seconds`, then stopped; what it recorded and exposed. A check
    is completed when every failure in it (if any) came from the server, none from the
    monitor's own queue (no slot, deadline used up while waiting): each step got its answer."""
    out = Outcome()
    exporter = Exporter(str(config), environ=environ)
    out.inboxes = len(exporter.config.inboxes)
    lock = threading.Lock()

    def on_record(_previous: InboxState | None, state: InboxState) -> None:
        with lock:
            if state.last.ok:
                out.ok += 1
                out.completed.add(state.inbox.name)
                return
            out.failed += 1
            queued = False
            for s in state.last.failures:
                out.failures_by_step[f"{s.step.value}/{s.diagnosis.reason.value}"] += 1
                why = queued_out(s.diagnosis.detail or "", state.inbox.timeout)
                queued = queued or why is not None
                out.failures_by_cause[why or "other"] += 1
                if not why and len(out.other_details) < 5:
                    out.other_details.append(f"{s.step.value}: {s.diagnosis.detail}")
            if not queued:
                out.completed.add(state.inbox.name)

    exporter.store.on_record(on_record)
    exporter.start()
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # bounded: sample checks in flight, nothing else
            value = exporter.registry.get_sample_value("inbox_exporter_checks_in_flight") or 0
            out.max_in_flight = max(out.max_in_flight, value)
            time.sleep(0.05)
    finally:
        # Grace > a check's deadline: checks in flight finish and close their connections.
        out.clean_stop = exporter.stop(grace=15)
    for family in text_string_to_metric_families(metrics_text(exporter)):
        for s in family.samples:
            if s.name == "inbox_exporter_checks_total":
                out.checks_total = s.value
            elif s.name == "inbox_check_failures_total":
                key = f"{s.labels['category']}/{s.labels['reason']}"
                out.failures_by_reason[key] = out.failures_by_reason.get(key, 0) + s.value
                if s.labels["reason"] == "too_many_connections":
                    out.too_many += s.value
    return out


def metrics_text(exporter: Exporter) -> str:
    """The /metrics body as one string, whether render_metrics() gives str, bytes or parts."""
    body = exporter.render_metrics()
    parts = body if isinstance(body, list | tuple) else [body]
    return "".join(p.decode() if isinstance(p, bytes) else p for p in parts)


def describe(out: Outcome) -> list[str]:
    lines = [f"checks completed {out.checks_total:g} (ok {out.ok}, failed {out.failed}); "
             f"max checks in flight {out.max_in_flight:g}; stopped cleanly: {out.clean_stop}",
             f"inboxes with a completed check: {len(out.completed)} of {out.inboxes}"]
    if out.failures_by_reason:
        lines.append("failures by category/reason (inbox_check_failures_total): " + ", ".join(
            f"{k} {v:g}" for k, v in sorted(out.failures_by_reason.items())))
        lines.append("failed steps by step/reason: " + ", ".join(
            f"{k} {v}" for k, v in sorted(out.failures_by_step.items())))
        lines.append("failed steps by cause: " + ", ".join(
            f"{k} {v}" for k, v in sorted(out.failures_by_cause.items())))
        lines += [f"  other: {d}" for d in out.other_details]
    return lines


# --- scenarios ----------------------------------------------------------------------------

def refusals_in_log(path: Path, offset: int) -> tuple[int, int]:
    """Dovecot's own "too many connections" refusals written after `offset`; the new offset."""
    data = path.read_bytes()
    return data[offset:].count(b"Maximum number of connections"), len(data)


def scenario_a(lab, args, tmp: Path, report: Report) -> None:
    alice = lab.users["alice"]
    print(f"\nA  per account: {args.inboxes_a} inboxes, all logging in as {alice.address}"
          f"{' or alice (alias)' if args.alias_logins else ''}; IMAPS -> imaps_limited "
          f"(mail_max_userip_connections=1), submission/STARTTLS; proxies hold each chunk "
          f"{args.delay_a} ms; interval {args.interval}, concurrency 32; {args.seconds_a:g} s",
          flush=True)
    t0 = time.monotonic()
    proxies = ProxyLoop()
    try:
        imap = proxies.add(CountingProxy(lab.ports.imaps_limited, args.delay_a / 1000, [], t0))
        smtp = proxies.add(CountingProxy(lab.ports.submission, args.delay_a / 1000, [], t0))
        # --alias-logins: every other inbox logs in as "alice", which Dovecot takes for the
        # same user as alice@example.test (see lab/README.md).
        inboxes = [entry(f"a{i}", alice, imap.port, smtp.port,
                         login="alice" if args.alias_logins and i % 2 else None)
                   for i in range(args.inboxes_a)]
        config = write_config(tmp, lab, inboxes, per_host=10, interval=args.interval, concurrency=32)
        log = lab.logs_dir / "dovecot-limited.log"
        _, offset = refusals_in_log(log, 0)
        out = run_exporter(config, {env_name(i["name"]): alice.password for i in inboxes},
                           args.seconds_a)
        time.sleep(0.5)  # Dovecot logs a session's end asynchronously
        refused, _ = refusals_in_log(log, offset)
    finally:
        proxies.close()
    for line in describe(out):
        report.info(line)
    report.info(f"IMAP proxy: {imap.concurrency.describe()}")
    report.info(f"SMTP proxy: {smtp.concurrency.describe()}")
    report.info(f"dovecot-limited log: {refused} refusal(s) 'Maximum number of connections'")
    report.check(out.ok > 0 and imap.concurrency.opened > 0 and smtp.concurrency.opened > 0,
                 f"A: the scenario ran: {out.ok} successful checks, {imap.concurrency.opened} IMAP "
                 f"and {smtp.concurrency.opened} SMTP connections through the proxies")
    report.check(imap.concurrency.peak <= 1,
                 f"A: max simultaneous IMAP connections for one account {imap.concurrency.peak} <= 1")
    report.check(smtp.concurrency.peak <= 1,
                 f"A: max simultaneous SMTP connections for one account {smtp.concurrency.peak} <= 1")
    report.check(out.too_many == 0,
                 f"A: failures with reason too_many_connections {out.too_many:g} == 0")
    report.check(refused == 0, f"A: Dovecot's own connection-limit refusals {refused} == 0")
    report.check(out.never_completed == 0,
                 f"A: inboxes without a completed check {out.never_completed} == 0 (of {out.inboxes})")


def scenario_b(lab, args, tmp: Path, report: Report, users: list, cap: int,
               seconds: float, control: bool) -> None:
    what = "control, cap raised" if control else "per host"
    print(f"\nB  {what}: {len(users)} inboxes, one lab user each; IMAPS (main) and "
          f"submission/STARTTLS{'; half of them via localhost (alias)' if args.alias_hosts else ''}; "
          f"proxies hold each chunk {args.delay_b} ms; interval "
          f"{args.interval}, concurrency 32, max_connections_per_host {cap}; {seconds:g} s",
          flush=True)
    t0 = time.monotonic()
    proxies = ProxyLoop()
    host = Concurrency(t0)  # both proxies are host 127.0.0.1 to the daemon: one cap for both
    try:
        imap = proxies.add(CountingProxy(lab.ports.imaps, args.delay_b / 1000, [host], t0))
        smtp = proxies.add(CountingProxy(lab.ports.submission, args.delay_b / 1000, [host], t0))
        # --alias-hosts: every other inbox names the same server "localhost" (the lab
        # certificate is valid for both names).
        inboxes = [entry(f"b{i}", u, imap.port, smtp.port,
                         host="localhost" if args.alias_hosts and i % 2 else "127.0.0.1")
                   for i, u in enumerate(users)]
        sub = tmp / ("b-control" if control else "b")
        sub.mkdir()
        config = write_config(sub, lab, inboxes, per_host=cap, interval=args.interval, concurrency=32)
        passwords = {env_name(i["name"]): u.password for i, u in zip(inboxes, users, strict=True)}
        out = run_exporter(config, passwords, seconds)
    finally:
        proxies.close()
    for line in describe(out):
        report.info(line)
    report.info(f"IMAP proxy: {imap.concurrency.describe()}")
    report.info(f"SMTP proxy: {smtp.concurrency.describe()}")
    report.info(f"host 127.0.0.1, IMAP+SMTP: {host.describe()}")
    report.check(out.never_completed == 0,
                 f"B{' control' if control else ''}: inboxes without a completed check "
                 f"{out.never_completed} == 0 (of {out.inboxes})")
    if control:
        # Not a cap check: proof that this setup produces, and the proxies see, more than
        # `args.per_host` simultaneous connections when the daemon does not hold them back.
        report.check(host.peak > args.per_host,
                     f"B control: without the cap the proxies see {host.peak} simultaneous "
                     f"connections > {args.per_host} (the demand exceeds the cap, and an excess "
                     f"would be seen)")
        return
    report.check(out.ok > 0, f"B: the scenario ran: {out.ok} successful checks, "
                             f"{host.opened} connections through the proxies")
    report.check(out.max_in_flight > cap,
                 f"B: demand above the cap: up to {out.max_in_flight:g} checks in flight > {cap}")
    report.check(imap.concurrency.peak <= cap,
                 f"B: max simultaneous IMAP connections to the host {imap.concurrency.peak} <= {cap}")
    report.check(smtp.concurrency.peak <= cap,
                 f"B: max simultaneous SMTP connections to the host {smtp.concurrency.peak} <= {cap}")
    report.check(host.peak <= cap,
                 f"B: max simultaneous IMAP+SMTP connections to the host {host.peak} <= {cap}")
    report.check(out.too_many == 0, f"B: failures with reason too_many_connections {out.too_many:g} == 0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds-a", type=float, default=30, help="scenario A run time")
    ap.add_argument("--seconds-b", type=float, default=30, help="scenario B run time")
    ap.add_argument("--seconds-control", type=float, default=20,
                    help="B's control run (cap 1000) run time; 0 skips it")
    ap.add_argument("--inboxes-a", type=int, default=40)
    ap.add_argument("--inboxes-b", type=int, default=60)
    ap.add_argument("--delay-a", type=int, default=30, help="ms each proxied chunk is held in A")
    ap.add_argument("--delay-b", type=int, default=50, help="ms each proxied chunk is held in B")
    ap.add_argument("--interval", default="5s", help="every inbox's check interval")
    ap.add_argument("--per-host", type=int, default=10, help="max_connections_per_host in B")
    ap.add_argument("--alias-logins", action="store_true",
                    help="in A, half the inboxes log in as 'alice' instead of alice@example.test "
                         "(the same Dovecot user, a different login string)")
    ap.add_argument("--alias-hosts", action="store_true",
                    help="in B, half the inboxes name the server 'localhost' instead of 127.0.0.1")
    ap.add_argument("--verbose", action="store_true", help="show the daemon's warnings")
    args = ap.parse_args()
    # Every failed step logs a warning; in A many checks wait for the one slot on purpose.
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    report = Report()
    started = time.monotonic()
    print(f"inbox-exporter connection caps: the real Exporter in-process against the lab "
          f"(Dovecot {version('dovecot')} / Postfix), connections counted by TCP proxies "
          f"on 127.0.0.1", flush=True)
    with tempfile.TemporaryDirectory(prefix="inbox-caps-") as tmp, \
            MailLab(Path(tmp) / "lab") as lab:
        scenario_a(lab, args, Path(tmp), report)
        users = [lab.add_user(f"cap{i}", secrets.token_urlsafe(12)) for i in range(args.inboxes_b)]
        scenario_b(lab, args, Path(tmp), report, users, args.per_host, args.seconds_b, control=False)
        if args.seconds_control > 0:
            scenario_b(lab, args, Path(tmp), report, users, 1000, args.seconds_control, control=True)
    print(f"\n{'FAIL' if report.failed else 'PASS'}: {report.failed} check(s) failed; "
          f"{time.monotonic() - started:.0f} s in all")
    sys.exit(1 if report.failed else 0)



if __name__ == "__main__":
    main()
