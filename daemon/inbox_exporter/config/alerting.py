"""The alerting section, resolved: thresholds, sinks, and their secrets read from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import SecretStr

from .schema import AlertingModel, ConfigError


@dataclass(frozen=True)
class Alerting:
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


def resolve_alerting(model: AlertingModel, source: str, environ: Mapping[str, str]) -> Alerting:
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
