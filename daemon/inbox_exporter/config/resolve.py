"""Resolution: from the validated file to one immutable `Inbox` per entry.

Merges `defaults`, applies provider presets and default ports, reads secrets from environment
variables and files, and checks the rules that span several keys. Every problem is a
`ConfigError` naming the key a user can find in their file.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from .. import providers
from ..deliverability import PRESET_AUTHSERV_IDS
from ..probes.transport import ascii_host
from ..providers import Endpoint
from ..redact import sasl_plain
from .schema import (
    DEADLINE_STEPS,
    DEFAULT_INTERVAL,
    DEFAULT_TIMEOUT,
    AuthModel,
    ConfigError,
    ConfigModel,
    DeliveryAccountModel,
    DeliveryModel,
    InboxModel,
    ServerModel,
    TestEmailModel,
)

Fail = Callable[[str, str], ConfigError]
PLAINTEXT = "none sends the password in clear: set allow_plaintext_login: true to accept that"


@dataclass(frozen=True)
class OAuth2:
    """How an inbox gets its access tokens (`auth.method: oauth2`)."""

    grant: str  # refresh_token | client_credentials
    token_url: str
    authorization_url: str | None  # for `inbox-exporter oauth login` only
    client_id: str
    client_secret: SecretStr | None  # None: a public client
    refresh_token: SecretStr | None  # None with client_credentials, or before `oauth login`
    refresh_token_file: str | None  # where a rotated refresh token is written back
    refresh_token_source: str  # "env:NAME" / "file:PATH" / "": identifies the grant
    scope: str | None
    mechanism: str  # xoauth2 | oauthbearer
    ca_file: str | None  # trusted for the token endpoint besides the system store
    authorize_params: tuple[tuple[str, str], ...] = ()

    @property
    def account_key(self) -> tuple[str, ...]:
        """Tokens are cached per key: one grant at one identity provider."""
        return (self.token_url, self.client_id, self.grant, self.scope or "",
                self.refresh_token_source)

    def secrets(self) -> tuple[str, ...]:
        return tuple(s.get_secret_value() for s in (self.client_secret, self.refresh_token) if s)


@dataclass(frozen=True)
class Delivery:
    """Where the test email is looked for after sending."""

    own: bool  # the inbox itself (its IMAP login); else an account of its own
    imap: Endpoint
    username: str
    password: SecretStr | None  # None: the inbox's own OAuth login
    timeout: float
    folders: tuple[str, ...]
    cleanup: bool
    oauth: OAuth2 | None = None
    authserv_ids: tuple[str, ...] | None = None  # None: believe the topmost header


@dataclass(frozen=True)
class Inbox:
    """One inbox, fully resolved: what a check needs and nothing to look up."""

    name: str
    email: str
    username: str
    password: SecretStr | None  # None with auth.method: oauth2
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
    test_email_interval: float = 3600.0  # at least `interval`
    test_email_cleanup_sent: bool = True
    delivery: Delivery | None = None
    oauth: OAuth2 | None = None

    def secrets(self) -> tuple[str, ...]:
        """Every form of a configured secret a server could echo back, for redaction. Access
        tokens are not configured: the token cache adds them (`TokenCache.secrets`)."""
        logins = [(self.username, self.password)]
        if self.delivery is not None:
            logins.append((self.delivery.username, self.delivery.password))
        out: list[str] = []
        for user, secret in logins:
            if secret is None:
                continue
            password = secret.get_secret_value()
            out += [password, sasl_plain(user, password), sasl_plain("", password)]
        if self.oauth is not None:
            out += self.oauth.secrets()
        return tuple(out)


def resolve_inboxes(model: ConfigModel, source: str, environ: Mapping[str, str],
                    strict_secrets: bool = True) -> tuple[Inbox, ...]:
    defaults = model.defaults
    if defaults.ca_file is not None:
        check_ca_file(defaults.ca_file, "defaults.ca_file", source)
    seen: set[str] = set()
    return tuple(_inbox(raw, model, source, environ, seen, strict_secrets) for raw in model.inboxes)


def _inbox(raw: InboxModel, model: ConfigModel, source: str, environ: Mapping[str, str],
           seen: set[str], strict_secrets: bool) -> Inbox:
    defaults = model.defaults
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
    imap = endpoint("imap", raw.imap, preset.imap if preset else None, fail)
    smtp = endpoint("smtp", raw.smtp, preset.smtp if preset else None, fail)

    ca_file = pick("ca_file", None)
    if raw.ca_file is not None:
        check_ca_file(raw.ca_file, f"{where}.ca_file", source)
    auth = _merged_auth(defaults.auth, raw.auth)
    oauth = None
    if auth.method == "oauth2":
        given = [k for k in ("password_env", "password_file", "password") if getattr(raw, k) is not None]
        if given:
            raise fail(given[0], "not used with auth.method: oauth2 (the inbox logs in with a token)")
        oauth = _oauth2(auth, preset, ca_file, environ, fail, strict_secrets)
        password = None
    else:
        password = _secret(raw, "password", environ, fail, inline=True, required=True)
    interval = pick("interval", DEFAULT_INTERVAL)
    timeout = pick("timeout", DEFAULT_TIMEOUT)
    deadline = pick("deadline", min(DEADLINE_STEPS * timeout, interval))
    if deadline > interval:
        where_key = "deadline" if raw.deadline is not None or defaults.deadline is None else "interval"
        raise fail(where_key, f"the deadline ({deadline:g}s) must not exceed the interval "
                              f"({interval:g}s): checks would overlap")
    if not pick("allow_plaintext_login", False):  # a password or an OAuth token: a secret
        for protocol, ep in (("imap", imap), ("smtp", smtp)):
            if ep.security == "none":
                raise fail(f"{protocol}.security", PLAINTEXT if password is not None else
                           PLAINTEXT.replace("the password", "the access token"))
    test_email: TestEmailModel | None = pick("test_email", None)
    delivery = _delivery(pick("delivery", None), raw, imap, password, oauth, environ,
                         f"{where}.delivery", source)
    if (delivery is not None and not delivery.own and delivery.imap.security == "none"
            and not pick("allow_plaintext_login", False)):
        raise fail("delivery.mailbox.security", PLAINTEXT)
    if delivery is not None and delivery.own:
        # The probe goes to the inbox itself, where it is looked for.
        test_email = (test_email.model_copy(update={"to": raw.email}) if test_email
                      else TestEmailModel(to=raw.email))
    elif delivery is not None and test_email is None:
        raise fail("test_email", "required with a delivery.mailbox account: the address "
                                 "of the watched account")
    return Inbox(
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
        test_email_subject=(test_email.subject if test_email
                            else TestEmailModel.model_fields["subject"].default),
        test_email_cleanup_sent=test_email.cleanup_sent if test_email else True,
        test_email_interval=max(interval, test_email.interval if test_email
                                else TestEmailModel.model_fields["interval"].default),
        delivery=delivery,
        oauth=oauth,
    )


def _merged_auth(defaults: AuthModel | None, own: AuthModel | None) -> AuthModel:
    """`defaults.auth` and the inbox's `auth`, key by key: the inbox's keys win (so the client
    can be set once and each inbox names only its own refresh token)."""
    merged: dict[str, Any] = {}
    for part in (defaults, own):
        if part is not None:
            merged.update(part.model_dump(exclude_none=True))
    return AuthModel.model_construct(**merged)


def _oauth2(auth: AuthModel, preset: providers.Provider | None, ca_file: str | None,
            environ: Mapping[str, str], fail: Fail, strict_secrets: bool) -> OAuth2:
    def afail(key: str, message: str) -> ConfigError:
        return fail(f"auth.{key}", message)

    grant = auth.grant or "refresh_token"
    oauth_preset = preset.oauth if preset else None
    if auth.tenant is not None and (oauth_preset is None or "{tenant}" not in oauth_preset.token_url):
        raise afail("tenant", "only with a provider whose endpoints name a tenant (outlook)")
    token_url, authorization_url, scope = auth.token_url, auth.authorization_url, auth.scope
    params: tuple[tuple[str, str], ...] = ()
    if oauth_preset is not None:
        assert preset is not None
        if grant == "client_credentials" and oauth_preset.app_scope is None:
            raise afail("grant", f"{preset.name} has no client_credentials grant for mail; use "
                                 "grant: refresh_token")
        tenant = auth.tenant or (oauth_preset.default_tenant if grant == "refresh_token" else None)
        if tenant is None and "{tenant}" in oauth_preset.token_url and token_url is None:
            raise afail("tenant", f"required with grant: client_credentials on {preset.name} "
                                  "(the directory tenant, e.g. contoso.onmicrosoft.com)")
        token_url = token_url or oauth_preset.token_url.format(tenant=tenant)
        authorization_url = authorization_url or oauth_preset.authorization_url.format(tenant=tenant)
        scope = scope or (oauth_preset.app_scope if grant == "client_credentials"
                          else oauth_preset.delegated_scope)
        params = oauth_preset.authorize_params
    if token_url is None:
        raise afail("token_url", "required with method: oauth2 (or set provider: gmail / outlook)")
    if not auth.client_id:
        raise afail("client_id", "required with method: oauth2")
    client_secret = _secret(auth, "client_secret", environ, afail, inline=False, required=False)
    refresh_token, source, refresh_file = None, "", None
    if grant == "client_credentials":
        if client_secret is None:
            raise afail("client_secret_env", "required with grant: client_credentials "
                                             "(set client_secret_env or client_secret_file)")
        for key in ("refresh_token_env", "refresh_token_file"):
            if getattr(auth, key) is not None:
                raise afail(key, "not used with grant: client_credentials")
    else:
        if (auth.refresh_token_env is None) == (auth.refresh_token_file is None):
            raise afail("refresh_token_env", "set exactly one of refresh_token_env, "
                                             "refresh_token_file (grant: refresh_token)")
        if auth.refresh_token_env is not None:
            source = f"env:{auth.refresh_token_env}"
        else:
            refresh_file = auth.refresh_token_file
            source = f"file:{refresh_file}"
        refresh_token = _secret(auth, "refresh_token", environ, afail, inline=False,
                                required=True, readable=strict_secrets,
                                hint="; run `inbox-exporter oauth login` to create it")
    return OAuth2(grant=grant, token_url=token_url, authorization_url=authorization_url,
                  client_id=auth.client_id, client_secret=client_secret,
                  refresh_token=refresh_token, refresh_token_file=refresh_file,
                  refresh_token_source=source, scope=scope, mechanism=auth.mechanism or "xoauth2",
                  ca_file=ca_file, authorize_params=params)


def endpoint(protocol: str, raw: ServerModel, preset: Endpoint | None, fail: Fail) -> Endpoint:
    """Explicit keys win; then what the port implies; then the preset; then implicit TLS."""
    host = raw.host or (preset.host if preset else None)
    if not host:
        raise fail(f"{protocol}.host", "required (or set provider)")
    try:
        ascii_host(host)
    except UnicodeError as e:
        raise fail(f"{protocol}.host", f"not a valid internationalized host name: {e}") from None
    security = (raw.security or providers.SECURITY_BY_PORT.get(raw.port or 0)
                or (preset.security if preset else "ssl"))
    port = raw.port or (preset.port if preset and preset.security == security else None)
    return Endpoint(host, port or providers.DEFAULT_PORTS[(protocol, security)], security)


def _delivery(model: DeliveryModel | None, raw: InboxModel, imap: Endpoint,
              password: SecretStr | None, oauth: OAuth2 | None, environ: Mapping[str, str],
              where: str, source: str) -> Delivery | None:
    if model is None:
        return None
    folders = tuple(model.folders)
    ids = model.authserv_id
    # The preset's id only when the mail lands in the inbox itself (its provider's servers).
    authserv_ids = ((ids,) if isinstance(ids, str) else tuple(ids) if ids is not None
                    else PRESET_AUTHSERV_IDS.get(raw.provider or "")
                    if model.mailbox == "self" else None)
    if model.mailbox == "self":
        return Delivery(own=True, imap=imap, username=raw.username or raw.email,
                        password=password, timeout=model.timeout, folders=folders,
                        cleanup=model.cleanup, oauth=oauth, authserv_ids=authserv_ids)
    account = model.mailbox

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"{where}.mailbox.{key}", message, source)

    ep = endpoint("imap", ServerModel(host=account.host, port=account.port,
                                      security=account.security), None, fail)
    return Delivery(own=False, imap=ep, username=account.username,
                    password=_secret(account, "password", environ, fail, inline=True,
                                     required=True),
                    timeout=model.timeout, folders=folders, cleanup=model.cleanup,
                    authserv_ids=authserv_ids)


def _secret(raw: InboxModel | DeliveryAccountModel | AuthModel, key: str,
            environ: Mapping[str, str], fail: Fail, *, inline: bool, required: bool,
            readable: bool = True, hint: str = "") -> SecretStr | None:
    """A secret from `<key>_env`, `<key>_file` or (where allowed) `<key>` itself: at most one
    of them, exactly one when required. Unless `readable` is False (`oauth login`, which
    creates the file), a source that is named must hold a value."""
    keys = [f"{key}_env", f"{key}_file"] + ([key] if inline else [])
    given = [k for k in keys if getattr(raw, k, None) is not None]
    if len(given) > 1 or (required and not given):
        raise fail(key if inline else keys[0], f"set exactly one of {', '.join(keys)}"
                   + (f" (got {', '.join(given)})" if given else ""))
    if not given:
        return None
    if given[0].endswith("_env"):
        var = getattr(raw, given[0])
        value = environ.get(var)
        if not value:
            if not readable:
                return None
            raise fail(given[0], f"environment variable {var} is not set{hint}")
        return SecretStr(value)
    if given[0].endswith("_file"):
        path = getattr(raw, given[0])
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read().rstrip("\r\n")
        except OSError as e:
            if not readable:
                return None
            raise fail(given[0], f"cannot read {path}: {e.strerror}{hint}") from None
        if not value:
            if not readable:
                return None
            raise fail(given[0], f"{path} is empty{hint}")
        return SecretStr(value)
    secret = getattr(raw, key)
    assert isinstance(secret, SecretStr)
    return secret


def check_ca_file(path: str, where: str, source: str) -> None:
    """A CA file that would fail at the first check fails here instead, as a config error."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise ConfigError(where, f"{path} holds no PEM certificate", source) from None
    except OSError as e:
        raise ConfigError(where, f"cannot read {path}: {e.strerror}", source) from None
