"""The configuration file: strict parsing, defaults, presets, and one-line errors naming the path.

Two stages, so every error names the path a user can find in their file:
1. pydantic models check the shape and the types of the YAML (unknown keys rejected);
2. `_resolve` merges `defaults`, applies provider presets and default ports, reads the
   passwords and checks cross-field rules, producing one immutable `Inbox` per entry.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, SecretStr, ValidationError

from . import providers
from .providers import Endpoint
from .redact import sasl_plain

NAME_RE = re.compile(r"^[a-z0-9_.-]+$")
_DURATION_RE = re.compile(r"^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?$")


class ConfigError(Exception):
    """A configuration problem, rendered as one line: `FILE: PATH: MESSAGE`."""

    def __init__(self, path: str, message: str, source: str = "config"):
        self.path, self.message, self.source = path, message, source
        super().__init__(f"{source}: {path}: {message}" if path else f"{source}: {message}")


def parse_duration(value: Any) -> float:
    """Prometheus-style duration ("30s", "5m", "1h30m", "500ms") to seconds."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError("must be a duration such as 30s, 5m or 1h")
    m = _DURATION_RE.match(value.strip())
    if not value.strip() or not m or not any(m.groups()):
        raise ValueError(f"invalid duration {value!r}: use e.g. 30s, 5m, 1h")
    h, mi, s, ms = (int(g) if g else 0 for g in m.groups())
    seconds = h * 3600 + mi * 60 + s + ms / 1000
    if seconds <= 0:
        raise ValueError("must be greater than 0s")
    return seconds


def _port(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and not 1 <= value <= 65535:
        raise ValueError("must be 1-65535")
    return value


def _name(value: Any) -> Any:
    if isinstance(value, str) and not NAME_RE.match(value):
        raise ValueError("must match [a-z0-9_.-]+ (it becomes a metric label)")
    return value


def _email(value: Any) -> Any:
    if isinstance(value, str) and not re.fullmatch(r"[^@\s]+@[^@\s]+", value):
        raise ValueError(f"not an email address: {value!r}")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Port = Annotated[int, BeforeValidator(_port)]
Email = Annotated[str, BeforeValidator(_email)]
Security = Literal["ssl", "starttls", "none"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ServerModel(_Strict):
    host: str | None = None
    port: Port | None = None
    security: Security | None = None


def _subject(value: Any) -> Any:
    if isinstance(value, str) and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must be one line without control characters")
    return value


class TestEmailModel(_Strict):
    to: Email
    subject: Annotated[str, BeforeValidator(_subject)] = "inbox-exporter test email"


class DeliveryAccountModel(_Strict):
    """An IMAP account of its own to watch (e.g. the CRM's BCC mailbox)."""

    host: str
    port: Port | None = None
    security: Security | None = None
    username: str
    password_env: str | None = None
    password_file: str | None = None
    password: SecretStr | None = None


class DeliveryModel(_Strict):
    mailbox: Literal["self"] | DeliveryAccountModel = "self"
    timeout: Duration = 120.0
    folders: list[str] = ["INBOX"]
    cleanup: bool = True


class _Overridable(_Strict):
    """Keys that `defaults` sets for every inbox and an inbox may override."""

    interval: Duration | None = None
    timeout: Duration | None = None
    deadline: Duration | None = None
    allow_insecure_certificate: bool | None = None
    ca_file: str | None = None
    source_address: str | None = None
    test_email: TestEmailModel | None = None
    delivery: DeliveryModel | None = None


class DefaultsModel(_Overridable):
    pass


class InboxModel(_Overridable):
    name: Annotated[str, BeforeValidator(_name)]
    email: Email
    username: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    password: SecretStr | None = None
    provider: str | None = None
    imap: ServerModel = ServerModel()
    smtp: ServerModel = ServerModel()


def _positive(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value < 1:
        raise ValueError("must be at least 1")
    return value


Positive = Annotated[int, BeforeValidator(_positive)]


class ChecksModel(_Strict):
    """How the daemon runs checks (process-wide)."""

    concurrency: Positive = 32  # worker threads; read at start-up only
    max_connections_per_host: Positive = 10
    auth_failure_max_interval: Duration = 3600.0


def _url(value: Any) -> Any:
    if isinstance(value, str) and not re.match(r"^https?://[^\s/]+", value):
        raise ValueError(f"not an http(s) URL: {value!r}")
    return value


Url = Annotated[str, BeforeValidator(_url)]


class SentryModel(_Strict):
    dsn_env: str  # the DSN holds a key: from the environment only
    environment: str = "production"


class AlertmanagerModel(_Strict):
    url: Url
    resend_interval: Duration = 60.0


class WebhookModel(_Strict):
    url: Url
    headers_env: dict[str, str] = {}  # header name -> environment variable holding its value


class AlertingModel(_Strict):
    failure_threshold: Positive = 2
    recovery_threshold: Positive = 1
    runbook_url: Url | None = None
    status_page_url: Url | None = None  # linked from alerts (e.g. https://inbox-exporter.example/)
    sentry: SentryModel | None = None
    alertmanager: AlertmanagerModel | None = None
    webhooks: list[WebhookModel] = []


class MetricsModel(_Strict):
    expose_email: bool = False  # the address is personal data: off unless the operator opts in


class ConfigModel(_Strict):
    checks: ChecksModel = ChecksModel()
    metrics: MetricsModel = MetricsModel()
    alerting: AlertingModel = AlertingModel()
    defaults: DefaultsModel = DefaultsModel()
    inboxes: list[InboxModel] = []


# Built-in defaults, shown in config.example.yaml (a test keeps the two in step).
DEFAULT_INTERVAL = 60.0
DEFAULT_TIMEOUT = 15.0
DEADLINE_STEPS = 4  # default deadline: 4 step timeouts, capped at the interval


@dataclass(frozen=True)
class Inbox:
    """One inbox, fully resolved: what a check needs and nothing to look up."""

    name: str
    email: str
    username: str
    password: SecretStr
    provider: str  # label: a preset name or "other"
    imap: Endpoint
    smtp: Endpoint
    interval: float
    timeout: float
    deadline: float
    allow_insecure_certificate: bool
    ca_file: str | None
    source_address: str | None
    test_email_to: str | None
    test_email_subject: str
    delivery: "Delivery | None" = None

    def secrets(self) -> tuple[str, ...]:
        """Every form of the password a server could echo back, for redaction."""
        logins = [(self.username, self.password)]
        if self.delivery is not None:
            logins.append((self.delivery.username, self.delivery.password))
        out: list[str] = []
        for user, secret in logins:
            password = secret.get_secret_value()
            out += [password, sasl_plain(user, password), sasl_plain("", password)]
        return tuple(out)


@dataclass(frozen=True)
class Delivery:
    """Where the test email is looked for after sending."""

    own: bool  # the inbox itself (its IMAP login); else an account of its own
    imap: Endpoint
    username: str
    password: SecretStr
    timeout: float
    folders: tuple[str, ...]
    cleanup: bool


@dataclass(frozen=True)
class Config:
    inboxes: tuple[Inbox, ...]
    source: str
    checks: ChecksModel = ChecksModel()
    metrics: MetricsModel = MetricsModel()
    alerting: "Alerting | None" = None

    def inbox(self, name: str) -> Inbox:
        for i in self.inboxes:
            if i.name == name:
                return i
        raise KeyError(name)


# libyaml's parser when PyYAML has it: the pure-Python one takes seconds and ~150 MB of
# transient memory for a 10,000-inbox file.
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_BaseLoader):
    """A YAML loader that rejects a key given twice (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file; raise ConfigError (one line) on any problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("", f"cannot read: {e.strerror}", path) from None
    return parse_config(text, path, os.environ if environ is None else environ)


def parse_config(text: str, source: str, environ: Mapping[str, str]) -> Config:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("", f"{where}invalid YAML: {problem}", source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", "must be a mapping with `inboxes:`", source)
    try:
        model = ConfigModel.model_validate(data)
    except ValidationError as e:
        raise _first_error(e, data, source) from None
    return Config(_resolve(model, source, environ), source, model.checks, model.metrics,
                  _alerting(model.alerting, source, environ))


def _first_error(exc: ValidationError, data: dict, source: str) -> ConfigError:
    errors = exc.errors()
    err = errors[0]
    path = _render_path(err["loc"], data)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ConfigError(path, _message(err) + more, source)


def _render_path(loc: tuple, data: Any) -> str:
    """('inboxes', 0, 'smtp', 'port') -> 'inboxes[sales].smtp.port' (the inbox's name if it has one)."""
    out, node = "", data
    for part in loc:
        if isinstance(part, int):
            label = part
            if isinstance(node, list) and part < len(node):
                node = node[part]
                if isinstance(node, dict) and isinstance(node.get("name"), str):
                    label = node["name"]
            out += f"[{label}]"
        elif isinstance(part, str) and ("[" in part or part.startswith("function-")):
            continue  # pydantic's internal validator names
        else:
            node = node.get(part) if isinstance(node, dict) else None
            out += f".{part}" if out else str(part)
    return out


_TYPE_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "model_type": "must be a mapping",
    "dict_type": "must be a mapping",
}


def _message(err: dict) -> str:
    kind = err["type"]
    if kind == "literal_error":
        return f"must be one of {err['ctx']['expected'].replace(chr(39), '')}"
    if kind == "value_error":
        return str(err["ctx"]["error"])
    return _TYPE_MESSAGES.get(kind, err["msg"])


def _resolve(model: ConfigModel, source: str, environ: Mapping[str, str]) -> tuple[Inbox, ...]:
    defaults = model.defaults
    if defaults.ca_file is not None:
        _check_ca_file(defaults.ca_file, "defaults.ca_file", source)
    seen: set[str] = set()
    inboxes = []
    for raw in model.inboxes:
        where = f"inboxes[{raw.name}]"

        def fail(key: str, message: str) -> ConfigError:
            return ConfigError(f"{where}.{key}", message, source)

        if raw.name in seen:
            raise fail("name", "duplicate inbox name")
        seen.add(raw.name)

        def pick(key: str, fallback: Any) -> Any:
            value = getattr(raw, key)
            if value is None:
                value = getattr(defaults, key)
            return fallback if value is None else value

        preset = None
        if raw.provider is not None:
            preset = providers.preset(raw.provider)
            if preset is None:
                known = ", ".join(providers.PRESETS)
                raise fail("provider", f"unknown provider {raw.provider!r} (known: {known})")
        imap = _endpoint("imap", raw.imap, preset.imap if preset else None, fail)
        smtp = _endpoint("smtp", raw.smtp, preset.smtp if preset else None, fail)

        password = _password(raw, environ, fail)
        interval = pick("interval", DEFAULT_INTERVAL)
        timeout = pick("timeout", DEFAULT_TIMEOUT)
        deadline = pick("deadline", min(DEADLINE_STEPS * timeout, interval))
        if deadline > interval:
            where_key = "deadline" if raw.deadline is not None or defaults.deadline is None else "interval"
            raise fail(where_key, f"the deadline ({deadline:g}s) must not exceed the interval "
                                  f"({interval:g}s): checks would overlap")
        ca_file = pick("ca_file", None)
        if raw.ca_file is not None:
            _check_ca_file(raw.ca_file, f"{where}.ca_file", source)
        test_email: TestEmailModel | None = pick("test_email", None)
        delivery = _delivery(pick("delivery", None), raw, imap, password, environ,
                             f"{where}.delivery", source)
        if delivery is not None and delivery.own:
            # The probe goes to the inbox itself, where it is looked for.
            test_email = TestEmailModel(to=raw.email, **({"subject": test_email.subject}
                                                          if test_email else {}))
        elif delivery is not None and test_email is None:
            raise fail("test_email", "required with a delivery.mailbox account: the address "
                                     "of the watched account")
        inboxes.append(Inbox(
            name=raw.name,
            email=raw.email,
            username=raw.username or raw.email,
            password=password,
            provider=preset.name if preset else providers.provider_for_host(imap.host),
            imap=imap,
            smtp=smtp,
            interval=interval,
            timeout=timeout,
            deadline=deadline,
            allow_insecure_certificate=pick("allow_insecure_certificate", False),
            ca_file=ca_file,
            source_address=pick("source_address", None),
            test_email_to=test_email.to if test_email else None,
            test_email_subject=test_email.subject if test_email else TestEmailModel.model_fields["subject"].default,
            delivery=delivery,
        ))
    return tuple(inboxes)


@dataclass(frozen=True)
class Alerting:
    """The alerting section, resolved: secrets read from the environment."""

    failure_threshold: int
    recovery_threshold: int
    runbook_url: str | None
    status_page_url: str | None
    sentry_dsn: SecretStr | None
    sentry_environment: str
    alertmanager_url: str | None
    resend_interval: float
    webhooks: tuple[tuple[str, tuple[tuple[str, SecretStr], ...]], ...]  # (url, headers)

    def secrets(self) -> tuple[str, ...]:
        out = [v.get_secret_value() for _, headers in self.webhooks for _, v in headers]
        if self.sentry_dsn:
            out.append(self.sentry_dsn.get_secret_value())
        return tuple(out)


def _alerting(model: AlertingModel, source: str, environ: Mapping[str, str]) -> Alerting:
    def env(var: str, where: str) -> SecretStr:
        value = environ.get(var)
        if not value:
            raise ConfigError(where, f"environment variable {var} is not set", source)
        return SecretStr(value)

    webhooks = tuple(
        (w.url, tuple((name, env(var, f"alerting.webhooks[{i}].headers_env.{name}"))
                      for name, var in w.headers_env.items()))
        for i, w in enumerate(model.webhooks))
    am = model.alertmanager
    return Alerting(
        failure_threshold=model.failure_threshold,
        recovery_threshold=model.recovery_threshold,
        runbook_url=model.runbook_url,
        status_page_url=model.status_page_url,
        sentry_dsn=env(model.sentry.dsn_env, "alerting.sentry.dsn_env") if model.sentry else None,
        sentry_environment=model.sentry.environment if model.sentry else "production",
        alertmanager_url=am.url.rstrip("/") if am else None,
        resend_interval=am.resend_interval if am else 60.0,
        webhooks=webhooks,
    )


def _endpoint(protocol: str, raw: ServerModel, preset: Endpoint | None, fail) -> Endpoint:
    """Explicit keys win; then what the port implies; then the preset; then implicit TLS."""
    host = raw.host or (preset.host if preset else None)
    if not host:
        raise fail(f"{protocol}.host", "required (or set provider)")
    security = (raw.security or providers.SECURITY_BY_PORT.get(raw.port or 0)
                or (preset.security if preset else "ssl"))
    port = raw.port or (preset.port if preset and preset.security == security else None)
    return Endpoint(host, port or providers.DEFAULT_PORTS[(protocol, security)], security)


def _delivery(model: DeliveryModel | None, raw: InboxModel, imap: Endpoint, password: SecretStr,
              environ: Mapping[str, str], where: str, source: str) -> Delivery | None:
    if model is None:
        return None
    common = {"timeout": model.timeout, "folders": tuple(model.folders), "cleanup": model.cleanup}
    if model.mailbox == "self":
        return Delivery(own=True, imap=imap, username=raw.username or raw.email,
                        password=password, **common)
    account = model.mailbox

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"{where}.mailbox.{key}", message, source)

    endpoint = _endpoint("imap", ServerModel(host=account.host, port=account.port,
                                             security=account.security), None, fail)
    return Delivery(own=False, imap=endpoint, username=account.username,
                    password=_password(account, environ, fail), **common)


def _password(raw: InboxModel | DeliveryAccountModel, environ: Mapping[str, str],
              fail) -> SecretStr:
    given = [k for k in ("password_env", "password_file", "password") if getattr(raw, k) is not None]
    if len(given) != 1:
        raise fail("password", "set exactly one of password_env, password_file, password"
                   + (f" (got {', '.join(given)})" if given else ""))
    if raw.password_env is not None:
        value = environ.get(raw.password_env)
        if not value:
            raise fail("password_env", f"environment variable {raw.password_env} is not set")
        return SecretStr(value)
    if raw.password_file is not None:
        try:
            with open(raw.password_file, encoding="utf-8") as f:
                value = f.read().rstrip("\r\n")
        except OSError as e:
            raise fail("password_file", f"cannot read {raw.password_file}: {e.strerror}") from None
        if not value:
            raise fail("password_file", f"{raw.password_file} is empty")
        return SecretStr(value)
    assert raw.password is not None
    return raw.password


def _check_ca_file(path: str, where: str, source: str) -> None:
    """A CA file that would fail at the first check fails here instead, as a config error."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise ConfigError(where, f"{path} holds no PEM certificate", source) from None
    except OSError as e:
        raise ConfigError(where, f"cannot read {path}: {e.strerror}", source) from None
