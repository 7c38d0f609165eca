"""The long-running exporter: config, store, checker, scheduler and metrics wired together.

Reload is atomic: the new file is parsed and validated completely before anything changes;
a bad one is logged as one line, the old config keeps running, and
inbox_exporter_config_last_reload_successful goes to 0.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import replace

import sentry_sdk
from prometheus_client import CollectorRegistry

from .alerts.pipeline import AlertPipeline
from .check import Checker
from .config import Config, ConfigError, Inbox, load_config
from .confirm import DeliveryConfirmer, DeliveryResult
from .deadline import WATCHDOG
from .exposition import InboxExposition, deflate, gzip_member
from .history import History
from .limits import ConnectionLimits
from .metrics import ExporterMetrics, render_inbox
from .model import CheckResult
from .oauth.tokens import TokenCache
from .ondemand import OnDemand
from .probe_id import load_or_create
from .providers import Endpoint
from .runner import Runner
from .scheduler import Scheduler
from .sharding import Shard
from .status import SHOWN, inbox_status
from .storage import HistoryStorage
from .store import InboxState, Store
from .svg import run_strip
from .transcript import unpack

log = logging.getLogger(__name__)



class Exporter:
    def __init__(self, config_path: str, registry: CollectorRegistry | None = None,
                 environ: Mapping[str, str] | None = None, shard: Shard | None = None,
                 storage_path: str | None = None):
        self.config_path = config_path
        self._environ = environ
        self.shard = shard or Shard()
        self.registry = registry or CollectorRegistry()
        self.metrics = ExporterMetrics(self.registry)
        self.store = Store()
        self.history = History()
        self._strips: dict[str, tuple[int, str]] = {}  # name -> (history version, svg)
        self.storage = HistoryStorage(storage_path, self.history) if storage_path else None
        self._reload_lock = threading.Lock()
        config = self._load()  # raises ConfigError: a bad config at start-up is fatal
        self.config: Config = config
        self.limits = ConnectionLimits(config.checks.max_connections_per_host)
        # One per process: checks and delivery polls share tokens.
        self.tokens = TokenCache(
            on_request=lambda outcome: self.metrics.oauth_token_requests.labels(outcome).inc())
        # Read (or created) once: a reload keeps the key, so our probes stay provably ours.
        self.probe_key = load_or_create(
            config.probe_key.get_secret_value() if config.probe_key else None,
            config.checks.probe_key_file)
        self.checker = Checker(self.limits, tokens=self.tokens, probe_key=self.probe_key)
        self.confirmer = DeliveryConfirmer(self.limits, on_result=self._delivered,
                                           tokens=self.tokens, probe_key=self.probe_key)
        self.runner = Runner(self.limits, workers=config.checks.concurrency)
        self.metrics.waiting.set_function(lambda: self.runner.waiting)
        self.metrics.connections.set_function(lambda: self.runner.running)
        self.scheduler = Scheduler(self.store, self.checker, self.metrics, self.runner,
                                   auth_failure_max_interval=config.checks.auth_failure_max_interval,
                                   on_error=_report,  # to Sentry: a no-op without a DSN
                                   backoff_after=config.alerting.failure_threshold,
                                   on_sent=self._sent)
        self.exposition = InboxExposition(config.metrics.expose_email)
        self.ondemand = OnDemand(self.scheduler, self.store, config.web.probe_min_interval)
        self.alerts = AlertPipeline(config.alerting, self.metrics.alerts_sent, self._secrets)
        self.metrics.alerts_firing.set_function(lambda: len(self.alerts.transitions.firing()))
        self.store.on_record(self.alerts.on_record)
        # /metrics is rendered (and compressed) as results arrive, not when Prometheus asks.
        self.store.on_record(lambda _old, new: self.exposition.update(new))
        self.store.on_record(self._remember)
        self._adopt(config)

    def _remember(self, _old: InboxState | None, new: InboxState) -> None:
        if new.last is not None:
            self.history.add(new.inbox.name, new.last)

    def _secrets(self) -> list[str]:
        """Everything the Sentry scrubber must never let through."""
        config = self.config
        out = [s for inbox in config.inboxes for s in inbox.secrets()]
        out += [config.probe_key.get_secret_value()] if config.probe_key else []
        return out + list(config.alerting.secrets()) + self.tokens.secrets()

    def _load(self) -> Config:
        """The config, with this replica's share of the inboxes (the whole file is validated)."""
        config = load_config(self.config_path, self._environ)
        return replace(config, inboxes=tuple(i for i in config.inboxes if self.shard.owns(i.name)))

    def _adopt(self, config: Config) -> None:
        self.config = config
        self.metrics.reload_success.set(1)
        self.metrics.reload_timestamp.set(time.time())
        release_memory()

    def _sent(self, inbox: Inbox, result: CheckResult) -> None:
        """A test email went out: confirm its delivery, and remove its Sent copy."""
        assert result.sent_at is not None
        if inbox.delivery is not None:
            self.confirmer.expect(inbox, result.probe_id, result.sent_at)
        if inbox.test_email_cleanup_sent:
            self.confirmer.expect_sent_copy(inbox, result.probe_id, result.sent_at)

    def _delivered(self, inbox: Inbox, result: DeliveryResult) -> None:
        state = self.store.record_delivery(result, inbox)
        self.exposition.update(state)
        if state is not None and result.step.status.value == "ok":
            self.metrics.observe_delivery(result.step.duration_seconds, inbox.provider)

    def start(self) -> None:
        if self.storage is not None:
            restored = self.storage.load()
            self.history.keep(i.name for i in self.config.inboxes)
            log.info("history restored", extra={"inboxes": restored, "path": str(self.storage.path)})
            self.storage.start()
        self.scheduler.start()
        self.scheduler.apply(self.config)
        self.exposition.layout(self.store.snapshot())
        # Stale probe mails of ours (a crash, a restart mid-delivery): once per watched mailbox.
        accounts: dict[tuple[Endpoint, str], Inbox] = {}
        for inbox in self.config.inboxes:
            if inbox.delivery is not None:
                accounts.setdefault((inbox.delivery.imap, inbox.delivery.username), inbox)
        for inbox in accounts.values():
            self.confirmer.sweep(inbox)

    def stop(self, grace: float) -> bool:
        clean = self.scheduler.stop(grace)
        if self.storage is not None:
            self.storage.stop()  # the last batch of history, after the last results
        self.confirmer.stop()
        self.alerts.stop()
        WATCHDOG.stop()
        return clean

    def reload(self) -> str | None:
        """Re-read the config file; returns None on success, else the one-line error. Never
        raises: SIGHUP and /-/reload must not stop the checks already running."""
        with self._reload_lock:
            try:
                config = self._load()
            except ConfigError as e:
                return self._reload_failed(str(e))
            except Exception as e:  # noqa: BLE001 - a bug in loading must not stop the checks
                # Only the type here: the message of an unforeseen error may quote the file
                # (Sentry gets it through its scrubber).
                _report(e)
                return self._reload_failed(
                    f"{self.config_path}: could not be loaded ({type(e).__name__}); please report it")
            try:
                self._apply(config)
            except Exception as e:  # noqa: BLE001 - same; what was applied so far stays
                _report(e)
                return self._reload_failed(f"{self.config_path}: loaded, but applying it failed "
                                           f"({type(e).__name__}); please report it")
            return None

    def _reload_failed(self, error: str) -> str:
        self.metrics.reload_success.set(0)
        log.error("config reload failed; keeping the running config", extra={"error": error})
        return error

    def _apply(self, config: Config) -> None:
        old = self.config
        if old is not None and old.checks.concurrency != config.checks.concurrency:
            log.warning("checks.concurrency changes take effect after a restart")
        self.limits.per_host = config.checks.max_connections_per_host
        self.scheduler.auth_failure_max_interval = config.checks.auth_failure_max_interval
        self.scheduler.backoff_after = config.alerting.failure_threshold
        self.exposition.set_expose_email(config.metrics.expose_email)
        self.ondemand.min_interval = config.web.probe_min_interval
        self.alerts.configure(config.alerting)
        if old is not None:
            self.alerts.forget({i.name for i in old.inboxes} - {i.name for i in config.inboxes})
        self.scheduler.apply(config)
        self.exposition.layout(self.store.snapshot())
        names = {i.name for i in config.inboxes}
        self.history.keep(names)
        for name in list(self._strips):  # list(): a snapshot; pages may draw meanwhile
            if name not in names:
                self._strips.pop(name, None)
        self.tokens.forget({i.oauth.account_key for i in config.inboxes if i.oauth})
        self._adopt(config)
        log.info("config reloaded", extra={"inboxes": len(config.inboxes)})

    # --- what the HTTP endpoints show ---------------------------------------------------

    def render_metrics(self, gzip: bool = False) -> list[bytes]:
        """The /metrics body in parts (see exposition.py); with `gzip`, a gzip member."""
        own = self.metrics.render()
        raw, packed = self.exposition.render(self.store.snapshot())
        if not gzip:
            return [own, *raw]
        return gzip_member([*deflate([own]), *packed], [own, *raw])

    def statuses(self) -> list[dict]:
        out = []
        for s in self.store.snapshot():
            name = s.inbox.name
            status = inbox_status(s, self.scheduler.next_run(name),
                                  self.history.entries(name, last=SHOWN),
                                  self.history.older_failures(name))
            up = self.history.uptime(name)
            status["uptime"] = None if up is None else round(up, 4)
            out.append(status)
        return out

    def strips(self) -> dict[str, str]:
        """Each inbox's history strip for the status page (runs merged: one element per run),
        drawn again only when the inbox has a new check."""
        out = {}
        for s in self.store.snapshot():
            name, version = s.inbox.name, self.history.version(s.inbox.name)
            hit = self._strips.get(name)
            if hit is None or hit[0] != version:
                hit = (version, run_strip(self.history.runs(name)))
                self._strips[name] = hit
            out[name] = hit[1]
        return out

    def inbox(self, name: str) -> tuple[dict, list, dict[str, str | None]] | None:
        """One inbox's page: its status, its history entries, its transcripts."""
        state = self.store.get(name)
        if state is None:
            return None
        entries = self.history.entries(name)
        status = inbox_status(state, self.scheduler.next_run(name), entries,
                              self.history.older_failures(name))
        last = state.last.transcript if state.last else None
        failure = state.failure_transcript
        return status, entries, {
            "last": unpack(last), "last_failure": None if failure is last else unpack(failure)}

    def probe_body(self, name: str) -> str:
        """After an on-demand check: the inbox's metrics, as text."""
        state = self.store.get(name)
        if state is None:
            return ""  # removed by a reload while it ran
        return "".join(render_inbox(state, self.exposition.expose_email).values())

    def load(self) -> dict:
        """How busy the exporter is (status page and API): saturation is visible, never a
        reason to be unhealthy."""
        return {"connections_active": self.runner.running,
                "connections_waiting": self.runner.waiting}

    def healthy(self) -> bool:
        """Alive, not idle: answered from state, never queued behind checks."""
        return self.scheduler.alive()

    def ready(self) -> bool:
        return self.config is not None


def _report(error: BaseException) -> None:
    sentry_sdk.capture_exception(error)


def release_memory() -> None:
    """Give the heap freed by a (re)load back to the OS.

    Parsing a 10,000-inbox file peaks at ~100 MB of short-lived YAML nodes and models, and
    glibc keeps freed heap mapped: RSS would stay at the peak for the process's life.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do
