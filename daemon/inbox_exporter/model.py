"""The vocabulary of a verification: steps, statuses, categories, reasons and result values.

Every name here is a stable, user-facing label value (metrics, JSON output, alerts): renaming
one is a breaking change. The documentation in docs/errors.md is checked against these enums
by a test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Protocol(StrEnum):
    IMAP = "imap"
    SMTP = "smtp"


class Step(StrEnum):
    """The guide's five steps, with IMAP validation split out of the login (as CRMs do)."""

    IMAP_CONNECT = "imap_connect"
    IMAP_LOGIN = "imap_login"
    IMAP_VALIDATE = "imap_validate"
    SMTP_CONNECT = "smtp_connect"
    SMTP_LOGIN = "smtp_login"
    TEST_EMAIL = "test_email"
    DELIVERY = "delivery"  # optional: the test email arrived (an IMAP search after sending)

    @property
    def protocol(self) -> Protocol:
        return Protocol.SMTP if self.value.startswith(("smtp", "test")) else Protocol.IMAP


# The two independent chains: a failure inside one skips the rest of that chain only.
IMAP_CHAIN = (Step.IMAP_CONNECT, Step.IMAP_LOGIN, Step.IMAP_VALIDATE)
SMTP_CHAIN = (Step.SMTP_CONNECT, Step.SMTP_LOGIN, Step.TEST_EMAIL)
ALL_STEPS = IMAP_CHAIN + SMTP_CHAIN


class Phase(StrEnum):
    """Where inside a step a failure happened: evidence for the classifier, not a label."""

    DNS = "dns"
    CONNECT = "connect"  # TCP
    TLS = "tls"  # implicit TLS handshake
    GREETING = "greeting"
    STARTTLS = "starttls"
    COMMAND = "command"  # anything after the connection is up


class Status(StrEnum):
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


class Category(StrEnum):
    """The guide's eight error messages: which step broke, in the guide's words."""

    IMAP_SETTINGS_INCORRECT = "imap_settings_incorrect"
    IMAP_AUTHENTICATION_ERROR = "imap_authentication_error"
    IMAP_VALIDATION_ERROR = "imap_validation_error"
    SMTP_SETTINGS_INCORRECT = "smtp_settings_incorrect"
    TEST_EMAIL_FAILED = "test_email_failed"
    UNAUTHORIZED = "unauthorized"
    APP_PASSWORD_REQUIRED = "app_password_required"
    CERTIFICATE_UNTRUSTED = "certificate_untrusted"
    DELIVERY_FAILED = "delivery_failed"  # beyond the guide: sent, but not (properly) delivered


class Reason(StrEnum):
    """Why a step broke: a closed set, so it can be a metric label."""

    DNS_ERROR = "dns_error"
    CONNECTION_REFUSED = "connection_refused"
    CONNECTION_TIMEOUT = "connection_timeout"
    GREETING_TIMEOUT = "greeting_timeout"
    TLS_ERROR = "tls_error"
    TLS_REQUIRED = "tls_required"
    CERTIFICATE_UNTRUSTED = "certificate_untrusted"
    CERTIFICATE_EXPIRED = "certificate_expired"
    CERTIFICATE_HOSTNAME_MISMATCH = "certificate_hostname_mismatch"
    AUTH_FAILED = "auth_failed"
    APP_PASSWORD_REQUIRED = "app_password_required"
    BASIC_AUTH_DISABLED = "basic_auth_disabled"
    OAUTH_INVALID_GRANT = "oauth_invalid_grant"
    OAUTH_INVALID_CLIENT = "oauth_invalid_client"
    OAUTH_TOKEN_ENDPOINT_UNAVAILABLE = "oauth_token_endpoint_unavailable"
    OAUTH_TOKEN_REJECTED = "oauth_token_rejected"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    IP_NOT_ALLOWED = "ip_not_allowed"
    AUTH_UNAVAILABLE = "auth_unavailable"
    CAPABILITY_MISSING = "capability_missing"
    MAILBOX_UNAVAILABLE = "mailbox_unavailable"
    SENDER_REJECTED = "sender_rejected"
    RECIPIENT_REJECTED = "recipient_rejected"
    MESSAGE_REJECTED = "message_rejected"
    INTERNATIONAL_ADDRESS_UNSUPPORTED = "international_address_unsupported"
    RATE_LIMITED = "rate_limited"
    SERVER_UNAVAILABLE = "server_unavailable"
    PROTOCOL_ERROR = "protocol_error"
    TIMEOUT = "timeout"
    DELIVERY_TIMEOUT = "delivery_timeout"
    DELIVERED_TO_JUNK = "delivered_to_junk"
    AUTHENTICATION_FAILED = "authentication_failed"  # delivered, but failed DMARC (or SPF and DKIM)
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Diagnosis:
    """What a human needs about one failed step."""

    category: Category
    reason: Reason
    hint: str
    detail: str  # the server's reply or the error, secrets redacted; never a metric label


@dataclass(frozen=True)
class CertificateInfo:
    """The server certificate seen during a connect step."""

    protocol: Protocol
    not_after: float | None  # Unix time; None when the certificate could not be read
    trusted: bool  # verified against the trust store (False when verification was disabled)


@dataclass(frozen=True)
class StepResult:
    step: Step
    status: Status
    duration_seconds: float = 0.0
    diagnosis: Diagnosis | None = None
    note: str | None = None  # why a step was skipped

    def to_json(self) -> dict:
        d = self.diagnosis
        return {
            "step": self.step.value,
            "status": self.status.value,
            "duration_seconds": round(self.duration_seconds, 6),
            "category": d.category.value if d else None,
            "reason": d.reason.value if d else None,
            "hint": d.hint if d else None,
            "detail": d.detail if d else None,
        }


@dataclass(frozen=True)
class CheckResult:
    """One verification of one inbox: every step, in order, none left out."""

    inbox: str
    started_at: float  # Unix time
    duration_seconds: float
    steps: tuple[StepResult, ...]
    probe_id: str
    certificates: tuple[CertificateInfo, ...] = field(default_factory=tuple)
    sent_at: float | None = None  # when the SMTP server accepted the test email
    # the redacted conversation (transcript.py), zlib-compressed; not part of equality
    transcript: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return not any(s.status is Status.FAILED for s in self.steps) and any(
            s.status is Status.OK for s in self.steps
        )

    @property
    def failures(self) -> tuple[StepResult, ...]:
        return tuple(s for s in self.steps if s.status is Status.FAILED)

    def step(self, step: Step) -> StepResult:
        return next(s for s in self.steps if s.step is step)

    def to_json(self) -> dict:
        return {
            "name": self.inbox,
            "ok": self.ok,
            "steps": [s.to_json() for s in self.steps],
        }
