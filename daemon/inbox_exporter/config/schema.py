"""The shape of the configuration file: strict pydantic models, value checks, built-in defaults.

Only what can be checked without I/O lives here: types, ranges, enums, unknown keys. Reading
environment variables and files, presets and cross-field rules are `resolve.py`'s job.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, SecretStr

from ..probes.transport import ascii_host
from ..redact import redact_urls

NAME_RE = re.compile(r"^[a-z0-9_.-]+$")
_DURATION_RE = re.compile(r"^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?$")

# Built-in defaults, shown in config.example.yaml (a test keeps the two in step).
DEFAULT_INTERVAL = 60.0
DEFAULT_TIMEOUT = 15.0
DEADLINE_STEPS = 4  # default deadline: 4 step timeouts, capped at the interval


class ConfigError(Exception):
    """A configuration problem, rendered as one line: `FILE: PATH: MESSAGE`."""

    def __init__(self, path: str, message: str, source: str = "config"):
        message = redact_urls(message)  # a URL's user:password never reaches a log or a reply
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
    if isinstance(value, str):
        _idn(value.rpartition("@")[2])
    return value


def _idn(host: str) -> None:
    """An internationalized domain must have an A-label form (what DNS and SMTP see)."""
    try:
        ascii_host(host)
    except UnicodeError as e:
        raise ValueError(f"not a valid internationalized domain name {host!r}: {e}") from None


def _subject(value: Any) -> Any:
    if isinstance(value, str) and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must be one line without control characters")
    return value


def _positive(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value < 1:
        raise ValueError("must be at least 1")
    return value


_ENCODE_HINT = "a password in it must be percent-encoded (/ ? # @ : as %2F %3F %23 %40 %3A)"


def _shown(value: str) -> str:
    """The URL for an error message, or nothing when it may carry a password (user:pw@host):
    a URL that failed to parse cannot be trusted to show where its credentials are."""
    return "" if "@" in value else f": {value!r}"


def _split_url(value: str) -> SplitResult:
    """The URL's parts; ValueError when it cannot be one (the URL shown only when it cannot
    hold a password)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number or out of range
    except ValueError:
        hint = f" ({_ENCODE_HINT})" if "@" in value else _shown(value)
        raise ValueError(f"not a valid URL{hint}") from None
    if parts.netloc and "@" in parts.path + parts.query + parts.fragment:
        # `user:pa/ss@host`: the password's `/` ended the host early
        raise ValueError(f"an @ after the host: {_ENCODE_HINT}")
    return parts


def _url(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    parts = _split_url(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL{_shown(value)}")
    return value


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _oauth_url(value: Any) -> Any:
    """https, or plain http on a loopback address only (a local identity server): a token
    request carries the client secret and the refresh token."""
    if not isinstance(value, str):
        return value
    parts = _split_url(value)
    if parts.scheme == "https" and parts.hostname:
        return value
    if parts.scheme == "http" and parts.hostname and is_loopback_host(parts.hostname):
        return value
    if parts.scheme == "http" and parts.hostname:
        raise ValueError(f"must be https (plain http only on a loopback address){_shown(value)}")
    raise ValueError(f"not an https URL{_shown(value)}")


Duration = Annotated[float, BeforeValidator(parse_duration)]
Port = Annotated[int, BeforeValidator(_port)]
Email = Annotated[str, BeforeValidator(_email)]
Positive = Annotated[int, BeforeValidator(_positive)]
Url = Annotated[str, BeforeValidator(_url)]
OAuthUrl = Annotated[str, BeforeValidator(_oauth_url)]
Security = Literal["ssl", "starttls", "none"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ServerModel(_Strict):
    host: str | None = None
    port: Port | None = None
    security: Security | None = None


DEFAULT_TEST_EMAIL_INTERVAL = 3600.0


class TestEmailModel(_Strict):
    to: Email
    subject: Annotated[str, BeforeValidator(_subject)] = "inbox-exporter test email"
    # How often the test email goes out (never more often than the inbox is checked): the SMTP
    # connect and login are verified at every check; sending at every one would be 1,440 mails
    # a day per inbox at 60s, past consumer sending limits.
    interval: Duration = DEFAULT_TEST_EMAIL_INTERVAL
    # Remove the provider's copy in the account's Sent folder (only-ours rules, as cleanup).
    cleanup_sent: bool = True


class AuthModel(_Strict):
    """How the inbox logs in. `defaults.auth` and an inbox's `auth` merge key by key."""

    method: Literal["password", "oauth2"] | None = None  # default: password
    grant: Literal["refresh_token", "client_credentials"] | None = None  # default: refresh_token
    token_url: OAuthUrl | None = None
    authorization_url: OAuthUrl | None = None  # only for `inbox-exporter oauth login`
    tenant: str | None = None
    client_id: str | None = None
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    refresh_token_env: str | None = None
    refresh_token_file: str | None = None
    scope: str | None = None
    mechanism: Literal["xoauth2", "oauthbearer"] | None = None  # default: xoauth2


class _PasswordSource(_Strict):
    """Where a password comes from: exactly one of these (resolve.py checks and reads it)."""

    password_env: str | None = None
    password_file: str | None = None
    password: SecretStr | None = None


class DeliveryAccountModel(_PasswordSource):
    """An IMAP account of its own to watch (e.g. the CRM's BCC mailbox)."""

    host: str
    port: Port | None = None
    security: Security | None = None
    username: str


class DeliveryModel(_Strict):
    mailbox: Literal["self"] | DeliveryAccountModel = "self"
    timeout: Duration = 120.0
    folders: list[str] = ["INBOX"]
    cleanup: bool = True
    # Whose Authentication-Results to believe (RFC 8601 authserv-id); default: the provider
    # preset's, else the topmost header.
    authserv_id: str | list[str] | None = None


class _Overridable(_Strict):
    """Keys that `defaults` sets for every inbox and an inbox may override."""

    interval: Duration | None = None
    timeout: Duration | None = None
    deadline: Duration | None = None
    allow_insecure_certificate: bool | None = None
    # Required with `security: none` and a password: the password then crosses the network
    # in clear, which must be a decision, not a default.
    allow_plaintext_login: bool | None = None
    ca_file: str | None = None
    source_address: str | None = None
    test_email: TestEmailModel | None = None
    delivery: DeliveryModel | None = None
    auth: AuthModel | None = None


class DefaultsModel(_Overridable):
    pass


class InboxModel(_Overridable, _PasswordSource):
    name: Annotated[str, BeforeValidator(_name)]
    email: Email
    username: str | None = None
    provider: str | None = None
    imap: ServerModel = ServerModel()
    smtp: ServerModel = ServerModel()


class ChecksModel(_Strict):
    """How the daemon runs checks (process-wide)."""

    concurrency: Positive = 32  # worker threads; read at start-up only
    max_connections_per_host: Positive = 10
    auth_failure_max_interval: Duration = 3600.0
    # The key that signs probe ids (probe_id.py): only mail whose id verifies is ever deleted.
    probe_key_env: str | None = None
    probe_key_file: str | None = None  # created (0600) on first start when missing


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


class WebModel(_Strict):
    # On-demand checks (POST /probe, with --web.enable-probe): at most one per inbox this often.
    probe_min_interval: Duration = 60.0


class ConfigModel(_Strict):
    checks: ChecksModel = ChecksModel()
    metrics: MetricsModel = MetricsModel()
    web: WebModel = WebModel()
    alerting: AlertingModel = AlertingModel()
    defaults: DefaultsModel = DefaultsModel()
    inboxes: list[InboxModel] = []
