"""The alerting section, resolved: thresholds, sinks, and their secrets read from the environment."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import SecretStr

from ..redact import split_userinfo
from .schema import AlertingModel, ConfigError


@dataclass(frozen=True)
class Alerting:
    failure_threshold: int
    recovery_threshold: int
    runbook_url: str | None
    status_page_url: str | None
    sentry_dsn: SecretStr | None
    sentry_environment: str
    alertmanager_url: str | None  # never with user:password: those are in the headers
    resend_interval: float
    webhooks: tuple[tuple[str, tuple[tuple[str, SecretStr], ...]], ...]  # (url, headers)
    alertmanager_headers: tuple[tuple[str, SecretStr], ...] = ()

    def secrets(self) -> tuple[str, ...]:
        headers = [*self.alertmanager_headers, *(h for _, hs in self.webhooks for h in hs)]
        out = [v.get_secret_value() for _, v in headers]
        for _, v in headers:  # Basic credentials from a URL: the password alone, too
            scheme, _, token = v.get_secret_value().partition(" ")
            if scheme == "Basic":
                out.append(base64.b64decode(token).decode().partition(":")[2])
        if self.sentry_dsn:
            out.append(self.sentry_dsn.get_secret_value())
        return tuple(out)


def no_alerting() -> Alerting:
    """The alerting section of a file without one: no sinks, default thresholds."""
    return resolve_alerting(AlertingModel(), "config", {})


def resolve_alerting(model: AlertingModel, source: str, environ: Mapping[str, str]) -> Alerting:
    def env(var: str, where: str) -> SecretStr:
        value = environ.get(var)
        if not value:
            raise ConfigError(where, f"environment variable {var} is not set", source)
        return SecretStr(value)

    def sink(url: str, headers: tuple[tuple[str, SecretStr], ...]
             ) -> tuple[str, tuple[tuple[str, SecretStr], ...]]:
        bare, authorization = split_userinfo(url)
        if authorization is not None:
            headers = (("Authorization", SecretStr(authorization)), *headers)
        return bare, headers

    webhooks = tuple(
        sink(w.url, tuple((name, env(var, f"alerting.webhooks[{i}].headers_env.{name}"))
                          for name, var in w.headers_env.items()))
        for i, w in enumerate(model.webhooks))
    am = model.alertmanager
    am_url, am_headers = sink(am.url.rstrip("/"), ()) if am else (None, ())
    return Alerting(
        failure_threshold=model.failure_threshold,
        recovery_threshold=model.recovery_threshold,
        runbook_url=model.runbook_url,
        status_page_url=model.status_page_url,
        sentry_dsn=env(model.sentry.dsn_env, "alerting.sentry.dsn_env") if model.sentry else None,
        sentry_environment=model.sentry.environment if model.sentry else "production",
        alertmanager_url=am_url,
        alertmanager_headers=am_headers,
        resend_interval=am.resend_interval if am else 60.0,
        webhooks=webhooks,
    )
