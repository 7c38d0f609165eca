"""The web config file (`--web.config.file`), in the Prometheus exporter-toolkit's format.

    tls_server_config:   {cert_file, key_file, client_auth_type, client_ca_file, min_version,
                          max_version, cipher_suites, curve_preferences, ...}
    http_server_config:  {http2, headers}
    basic_auth_users:    {user: bcrypt hash}
    rate_limit:          {interval, burst}

As with the toolkit, whether TLS is served is decided when the server starts; everything else
(certificates, client CAs, users, headers, rate limit) follows edits without a restart:
`WebConfigFile.current()` re-reads the file when it, or a certificate, key or CA file it names,
changed (modification time, size, inode; looked at no more than once a second), so a renewal
by certbot or cert-manager is served at the next connection. An edit that breaks the file is
logged once and the last good version stays in force: a typo must not open the endpoints, nor
lock Prometheus out.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator

from ..config import ConfigError, model_error, parse_duration, read_text, yaml_error
from ..config.schema import _Strict

log = logging.getLogger(__name__)

TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}

# Go's names (what exporter-toolkit files hold) -> OpenSSL's. The TLS 1.3 suites are accepted and,
# as in Go, not configurable.
CIPHER_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
}
CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1",
          "X25519": "X25519"}

# The headers exporter-toolkit lets a file add, and their allowed values (None: any).
EXTRA_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}

ClientAuth = Literal["NoClientCert", "RequestClientCert", "RequireAnyClientCert",
                     "RequireClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert"]
# Python's TLS verifies every client certificate it asks for: "ask but do not verify" cannot be
# offered, and refusing the setting beats serving something weaker or stricter than written.
_UNSUPPORTED_CLIENT_AUTH = {"RequestClientCert", "RequireAnyClientCert", "RequireClientCert"}


class TLSServerModel(_Strict):
    cert_file: str | None = None
    key_file: str | None = None
    cert: str | None = None
    key: SecretStr | None = None
    client_auth_type: ClientAuth = "NoClientCert"
    client_ca_file: str | None = None
    client_ca: str | None = None
    client_allowed_sans: list[str] | None = None
    min_version: Literal["TLS10", "TLS11", "TLS12", "TLS13"] = "TLS12"
    max_version: Literal["TLS10", "TLS11", "TLS12", "TLS13"] = "TLS13"
    cipher_suites: list[str] = Field(default_factory=list)
    curve_preferences: list[str] = Field(default_factory=list)
    prefer_server_cipher_suites: bool = True

    @field_validator("client_auth_type")
    @classmethod
    def _supported(cls, value: str) -> str:
        if value in _UNSUPPORTED_CLIENT_AUTH:
            raise ValueError(f"{value} is not supported (client certificates are always "
                             "verified here): use VerifyClientCertIfGiven or "
                             "RequireAndVerifyClientCert")
        return value

    @field_validator("cipher_suites")
    @classmethod
    def _ciphers(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in CIPHER_SUITES:
                raise ValueError(f"unknown cipher: {name}")
        return value

    @field_validator("curve_preferences")
    @classmethod
    def _curves(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in CURVES:
                raise ValueError(f"unknown curve: {name}")
        if len(value) > 1:
            # Python 3.11's ssl module sets one ECDH curve, not a preference list.
            raise ValueError("give one curve (a preference list cannot be set here)")
        return value

    @field_validator("client_allowed_sans")
    @classmethod
    def _sans(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            raise ValueError("not supported: issue client certificates from a CA of their "
                             "own and name it in client_ca_file")
        return value

    def enabled(self) -> bool:
        """As the toolkit: any of these set means TLS."""
        return any((self.cert_file, self.cert, self.key_file, self.key, self.client_ca_file,
                    self.client_ca, self.client_auth_type != "NoClientCert"))


class HTTPServerModel(_Strict):
    http2: bool = True
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, v in value.items():
            if name not in EXTRA_HEADERS:
                raise ValueError(f"HTTP header {name!r} can not be configured")
            allowed = EXTRA_HEADERS[name]
            if allowed is not None and v not in allowed:
                raise ValueError(f"invalid value for {name}: expected one of {list(allowed)}")
            if "\r" in v or "\n" in v:
                raise ValueError(f"{name}: line breaks are not allowed in a header value")
        return value


def _duration_or_zero(value: Any) -> Any:
    return 0.0 if value in (0, "0", "0s") else parse_duration(value)


class RateLimitModel(_Strict):
    interval: Annotated[float, BeforeValidator(_duration_or_zero)] = 0.0  # 0: no limit
    burst: int = 0


def _bcrypt_hash(value: Any) -> Any:
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    if not isinstance(text, str) or not text.startswith(("$2a$", "$2b$", "$2y$")) \
            or len(text) != 60:
        raise ValueError("must be a bcrypt hash ($2y$..., e.g. from `htpasswd -nBC 10 \"\" | "
                         "tr -d ':\\n'`)")
    return value


class WebConfigModel(_Strict):
    tls_server_config: TLSServerModel = TLSServerModel()
    http_server_config: HTTPServerModel = HTTPServerModel()
    basic_auth_users: dict[str, Annotated[SecretStr, BeforeValidator(_bcrypt_hash)]] = Field(
        default_factory=dict)
    rate_limit: RateLimitModel = RateLimitModel()


@dataclass(frozen=True)
class WebConfig:
    """One good version of the file, its TLS context built."""

    tls: ssl.SSLContext | None
    http2: bool
    headers: tuple[tuple[str, str], ...]
    users: dict[str, bytes] = field(repr=False)  # user -> bcrypt hash
    rate_interval: float = 0.0
    rate_burst: int = 0
    files: tuple[str, ...] = ()  # the certificate, key and client CA files it reads


    @property
    def basic_auth(self) -> bool:
        return bool(self.users)


def parse_web_config(path: str) -> WebConfig:
    """Read, validate and build; raise ConfigError (one line naming the key) on any problem."""
    text = read_text(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise yaml_error(e, path) from None
    if not isinstance(data, dict):
        raise ConfigError("", "must be a mapping (tls_server_config, basic_auth_users, ...)", path)
    try:
        model = WebConfigModel.model_validate(data)
    except ValidationError as e:
        raise model_error(e, data, path) from None
    base = Path(path).parent
    tls = None
    if model.tls_server_config.enabled():
        tls = _tls_context(model.tls_server_config, base, path)
        tls.set_alpn_protocols(["h2", "http/1.1"] if model.http_server_config.http2
                               else ["http/1.1"])
    t = model.tls_server_config
    files = tuple(str(base / f) for f in (t.cert_file, t.key_file, t.client_ca_file) if f)
    return WebConfig(
        files=files, tls=tls, http2=model.http_server_config.http2,
        headers=tuple(model.http_server_config.headers.items()),
        users={u: h.get_secret_value().encode() for u, h in model.basic_auth_users.items()},
        rate_interval=model.rate_limit.interval, rate_burst=model.rate_limit.burst)


def _tls_context(t: TLSServerModel, base: Path, source: str) -> ssl.SSLContext:
    def where(name: str | None) -> str | None:
        return None if name is None else str(base / name)  # relative to the file, as the toolkit

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"tls_server_config.{key}", message, source)

    if not (t.cert_file or t.cert):
        raise fail("cert_file", "missing one of cert or cert_file")
    if not (t.key_file or t.key):
        raise fail("key_file", "missing one of key or key_file")
    if TLS_VERSIONS[t.min_version] > TLS_VERSIONS[t.max_version]:
        raise fail("min_version", f"{t.min_version} is above max_version {t.max_version}")
    if (t.client_ca_file or t.client_ca) and t.client_auth_type == "NoClientCert":
        raise fail("client_auth_type", "client CAs are configured without a client auth "
                   "policy (VerifyClientCertIfGiven or RequireAndVerifyClientCert)")
    if t.client_auth_type != "NoClientCert" and not (t.client_ca_file or t.client_ca):
        raise fail("client_ca_file", f"{t.client_auth_type} needs the CA that issues client "
                   "certificates")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[t.min_version]
    ctx.maximum_version = TLS_VERSIONS[t.max_version]
    try:
        _load_chain(ctx, where(t.cert_file), t.cert, where(t.key_file),
                    t.key.get_secret_value() if t.key else None)
    except (OSError, ssl.SSLError, ValueError) as e:
        raise fail("cert_file" if t.cert_file else "cert",
                   f"cannot load the certificate and key: {_reason(e)}") from None
    ciphers = [name for c in t.cipher_suites if (name := CIPHER_SUITES[c])]
    if ciphers:
        ctx.set_ciphers(":".join(ciphers))
    if t.curve_preferences:
        ctx.set_ecdh_curve(CURVES[t.curve_preferences[0]])
    if t.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    if t.client_auth_type != "NoClientCert":
        ctx.verify_mode = (ssl.CERT_REQUIRED if t.client_auth_type == "RequireAndVerifyClientCert"
                           else ssl.CERT_OPTIONAL)
        try:
            ctx.load_verify_locations(cafile=where(t.client_ca_file), cadata=t.client_ca)
        except (OSError, ssl.SSLError) as e:
            raise fail("client_ca_file", f"cannot load: {_reason(e)}") from None
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert_file: str | None, cert: str | None,
                key_file: str | None, key: str | None) -> None:
    """load_cert_chain reads files only: inline PEM goes through a private temporary file."""
    with tempfile.TemporaryDirectory(prefix="inbox-exporter-tls-") as tmp:
        if cert_file is None:
            cert_file = os.path.join(tmp, "cert.pem")
            Path(cert_file).write_text(cert or "")
        if key_file is None:
            key_file = os.path.join(tmp, "key.pem")
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key or "")
        ctx.load_cert_chain(cert_file, key_file)


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e) or type(e).__name__


class WebConfigFile:
    """The file, followed: `current()` is the last good version."""

    CHECK_EVERY = 1.0  # seconds between looks at the file's mtime

    def __init__(self, path: str, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._config = parse_web_config(path)  # ConfigError at start-up: fatal, as the toolkit
        self._stamp = self._stat(self._config.files)
        self._checked = clock()
        self._bad_stamp: tuple | None = None

    def _stat(self, files: tuple[str, ...]) -> tuple:
        def one(path: str) -> tuple | None:
            try:
                st = os.stat(path)
            except OSError:
                return None
            return (st.st_mtime_ns, st.st_size, st.st_ino)

        return tuple(one(p) for p in (self.path, *files))

    def current(self) -> WebConfig:
        """The config to serve this request or handshake with. Never raises."""
        now = self._clock()
        if now - self._checked < self.CHECK_EVERY:
            return self._config
        with self._lock:
            if now - self._checked < self.CHECK_EVERY:
                return self._config
            self._checked = now
            stamp = self._stat(self._config.files)
            if stamp == self._stamp or stamp == self._bad_stamp:
                return self._config
            try:
                config = parse_web_config(self.path)
            except ConfigError as e:
                self._bad_stamp = stamp
                log.error("web config file changed but is not valid; keeping the last good one",
                          extra={"error": str(e)})
                return self._config
            except Exception as e:  # noqa: BLE001 - called per request and TLS handshake: never raise
                self._bad_stamp = stamp
                log.error("web config file changed but could not be loaded; keeping the last "
                          "good one", extra={"file": self.path, "error": type(e).__name__})
                return self._config
            if (config.tls is None) != (self._config.tls is None):
                self._bad_stamp = stamp
                log.error("web config file: turning TLS on or off needs a restart; keeping the "
                          "last good config", extra={"file": self.path})
                return self._config
            self._stamp, self._config = self._stat(config.files), config
            log.info("web config file reloaded", extra={"file": self.path})
            return config
