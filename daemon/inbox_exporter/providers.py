"""Mail provider presets (server, port, security) and the provider label derived from a host.

The label is a closed set (the preset names plus "other") so that provider reliability can be
graphed without the cardinality of free-form host names.
"""

from __future__ import annotations

from dataclasses import dataclass

OTHER = "other"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    security: str  # ssl | starttls | none


@dataclass(frozen=True)
class OAuthPreset:
    """A provider's OAuth 2.0 endpoints and scopes. `{tenant}` is filled from `auth.tenant`."""

    token_url: str
    authorization_url: str
    delegated_scope: str  # grant: refresh_token (a user signed in)
    app_scope: str | None  # grant: client_credentials; None: the provider has no such grant
    authorize_params: tuple[tuple[str, str], ...] = ()  # extra query parameters for `oauth login`
    default_tenant: str | None = None  # used for the delegated grant when no tenant is set


@dataclass(frozen=True)
class Provider:
    name: str
    imap: Endpoint | None
    smtp: Endpoint | None
    host_suffixes: tuple[str, ...]
    app_password_url: str | None = None
    oauth: OAuthPreset | None = None


# Hosts and ports from each provider's published client settings.
PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider(
            "gmail",
            Endpoint("imap.gmail.com", 993, "ssl"),
            Endpoint("smtp.gmail.com", 587, "starttls"),
            ("gmail.com", "googlemail.com", "google.com"),
            "https://support.google.com/accounts/answer/185833",
            # https://developers.google.com/gmail/imap/xoauth2-protocol: one scope for IMAP and
            # SMTP; a refresh token is only issued with access_type=offline (and on a re-consent
            # only with prompt=consent). Google has no client_credentials grant for Gmail.
            OAuthPreset("https://oauth2.googleapis.com/token",
                        "https://accounts.google.com/o/oauth2/v2/auth",
                        "https://mail.google.com/", None,
                        (("access_type", "offline"), ("prompt", "consent"))),
        ),
        Provider(
            "outlook",
            Endpoint("outlook.office365.com", 993, "ssl"),
            Endpoint("smtp.office365.com", 587, "starttls"),
            ("office365.com", "outlook.com", "hotmail.com", "live.com"),
            "https://support.microsoft.com/account-billing/app-passwords-for-a-work-or-school-account-d6dc8c6d-4bf7-4851-ad95-6d07799387e9",
            # https://learn.microsoft.com/exchange/client-developer/legacy-protocols/how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth
            OAuthPreset("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
                        "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize",
                        "https://outlook.office.com/IMAP.AccessAsUser.All "
                        "https://outlook.office.com/SMTP.Send offline_access",
                        "https://outlook.office365.com/.default",
                        # select_account, not consent: in tenants where only an admin may
                        # consent, prompt=consent would block the sign-in.
                        (("prompt", "select_account"),),
                        default_tenant="organizations"),
        ),
        Provider(
            "yahoo",
            Endpoint("imap.mail.yahoo.com", 993, "ssl"),
            Endpoint("smtp.mail.yahoo.com", 465, "ssl"),
            ("yahoo.com", "yahoo.co.uk", "ymail.com"),
            "https://help.yahoo.com/kb/SLN15241.html",
        ),
        Provider(
            "icloud",
            Endpoint("imap.mail.me.com", 993, "ssl"),
            Endpoint("smtp.mail.me.com", 587, "starttls"),
            ("me.com", "icloud.com", "mac.com"),
            "https://support.apple.com/en-us/102654",
        ),
        Provider(
            "fastmail",
            Endpoint("imap.fastmail.com", 993, "ssl"),
            Endpoint("smtp.fastmail.com", 465, "ssl"),
            ("fastmail.com", "messagingengine.com"),
            "https://www.fastmail.help/hc/en-us/articles/360058752854",
        ),
        Provider(
            "zoho",
            Endpoint("imap.zoho.com", 993, "ssl"),
            Endpoint("smtp.zoho.com", 465, "ssl"),
            ("zoho.com", "zoho.eu", "zoho.in", "zoho.com.au", "zohomail.com"),
            "https://www.zoho.com/mail/help/adminconsole/two-factor-authentication.html#alink5",
        ),
        # Recognised for the label only: no preset hosts.
        Provider("aol", None, None, ("aol.com",)),
        Provider("gmx", None, None, ("gmx.com", "gmx.net", "gmx.de")),
        Provider("yandex", None, None, ("yandex.com", "yandex.ru")),
    )
}

ALIASES = {"office365": "outlook", "microsoft365": "outlook", "hotmail": "outlook", "google": "gmail"}

PRESETS = tuple(name for name, p in PROVIDERS.items() if p.imap is not None)
PROVIDER_LABELS = (*PROVIDERS, OTHER)

DEFAULT_PORTS = {("imap", "ssl"): 993, ("imap", "starttls"): 143, ("imap", "none"): 143,
                 ("smtp", "ssl"): 465, ("smtp", "starttls"): 587, ("smtp", "none"): 587}
# The well-known ports say which TLS mode is meant when only a port is given.
SECURITY_BY_PORT = {993: "ssl", 465: "ssl", 143: "starttls", 587: "starttls", 25: "starttls"}


def preset(name: str) -> Provider | None:
    """The preset called `name` (or one of its aliases); None when unknown."""
    p = PROVIDERS.get(ALIASES.get(name, name))
    return p if p is not None and p.imap is not None else None


def provider_for_host(host: str) -> str:
    """The provider label for a server host name: a preset name or "other"."""
    host = host.lower().rstrip(".")
    for p in PROVIDERS.values():
        if any(host == s or host.endswith("." + s) for s in p.host_suffixes):
            return p.name
    return OTHER
