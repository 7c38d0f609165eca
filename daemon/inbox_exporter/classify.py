"""Classification: a failed step plus its error becomes category, reason, hint and detail.

The principle: the *category* says, in the guide's words, which step broke; the *reason* says
why. Three kinds of failure cut across steps and get their own category on either protocol:
untrusted certificates, rejected credentials, and app-password demands.

The mapping is the ordered table `RULES`: first match wins, the catch-all is last. Python's
socket errors are all `OSError`s (`SSLCertVerificationError` is an `SSLError` is an `OSError`),
so specific rows come before general ones; tests pin that order. Libraries rewrap errors
(IMAPClient's `LoginError(str(e))`, imaplib's `abort('socket error: ...')`), so a row matches
any exception in the `__cause__`/`__context__` chain and the text of all of them.
docs/errors.md is generated from this module (`python -m inbox_exporter.classify`).
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from . import errors, providers
from .model import Category, Diagnosis, Phase, Protocol, Reason, Step
from .redact import one_line

# Without a more specific row, a failure's category is the step that broke.
STEP_CATEGORY: Mapping[Step, Category] = {
    Step.IMAP_CONNECT: Category.IMAP_SETTINGS_INCORRECT,
    Step.IMAP_LOGIN: Category.IMAP_AUTHENTICATION_ERROR,
    Step.IMAP_VALIDATE: Category.IMAP_VALIDATION_ERROR,
    Step.SMTP_CONNECT: Category.SMTP_SETTINGS_INCORRECT,
    Step.SMTP_LOGIN: Category.SMTP_SETTINGS_INCORRECT,
    Step.TEST_EMAIL: Category.TEST_EMAIL_FAILED,
    Step.DELIVERY: Category.DELIVERY_FAILED,
}

# "The server settings are wrong" for the protocol of the step.
SETTINGS = {Protocol.IMAP: Category.IMAP_SETTINGS_INCORRECT,
            Protocol.SMTP: Category.SMTP_SETTINGS_INCORRECT}

CONNECT_STEPS = frozenset({Step.IMAP_CONNECT, Step.SMTP_CONNECT})
LOGIN_STEPS = frozenset({Step.IMAP_LOGIN, Step.SMTP_LOGIN})
OPENING = frozenset({Phase.DNS, Phase.CONNECT, Phase.TLS, Phase.GREETING, Phase.STARTTLS})


@dataclass(frozen=True)
class Rule:
    reason: Reason
    category: Category | Mapping[Protocol, Category] | None = None  # None: STEP_CATEGORY
    steps: frozenset[Step] | None = None  # None: any step
    phases: frozenset[Phase] | None = None
    errors: tuple[type[BaseException], ...] | None = None  # any exception in the chain
    text: str | None = None  # regex, case-insensitive, searched in all the chain's messages

    def matches(self, ev: Evidence) -> bool:
        return ((self.steps is None or ev.step in self.steps)
                and (self.phases is None or ev.phase in self.phases)
                and (self.errors is None or any(isinstance(e, self.errors) for e in ev.chain))
                and (self.text is None or re.search(self.text, ev.text, re.I) is not None))

    def category_for(self, step: Step) -> Category:
        if self.category is None:
            return STEP_CATEGORY[step]
        if isinstance(self.category, Category):
            return self.category
        return self.category[step.protocol]


_CERT = ssl.SSLCertVerificationError
_TOO_MANY = (r"too many (simultaneous |concurrent )?connections|\[LIMIT\]"
             r"|maximum number of connections|mail_max_userip_connections|connection limit")
_APP_PASSWORD = r"application-specific password|app[- ]?password|\b5\.7\.9\b"
_RATE_LIMITED = (r"too many (login|authentication) (attempts|failures)|rate.?limit|throttl"
                 r"|too many (messages|recipients)|sending (quota|limit)|sending limit exceeded"
                 r"|\b4\.7\.28\b|\b5\.4\.5\b|SubmissionQuotaExceeded|\b5\.7\.708\b"
                 r"|message submission rate|exceeded the (rate|message) limit")
_AUTH_FAILED = (r"AUTHENTICATIONFAILED|invalid credentials|authentication failed"
                r"|\b535\b|username and password not accepted|LOGIN failed"
                r"|AUTHENTICATE failed|incorrect password|invalid (login|user)")
# Exchange Online: "535 5.7.139 Authentication unsuccessful, basic authentication is disabled"
# (5.7.139 alone also means wrong credentials),
# "550 5.7.30 Basic authentication is not supported for Client Submission."
_BASIC_AUTH_DISABLED = (r"\b5\.7\.30\b"
                        r"|basic auth\w* (is )?(disabled|blocked|not supported|turned off)"
                        r"|SmtpClientAuthentication is disabled")

RULES: tuple[Rule, ...] = (
    # Getting an OAuth token, before anything about the mail server: the identity provider's
    # errors (its TLS ones included) are not the mail server's.
    Rule(Reason.OAUTH_INVALID_GRANT, Category.UNAUTHORIZED, errors=(errors.OAuthInvalidGrant,)),
    Rule(Reason.OAUTH_INVALID_CLIENT, Category.UNAUTHORIZED, errors=(errors.OAuthInvalidClient,)),
    Rule(Reason.OAUTH_TOKEN_ENDPOINT_UNAVAILABLE, errors=(errors.OAuthEndpointUnavailable,)),
    # Delivery: the mail was sent; was it delivered, and where?
    Rule(Reason.DELIVERY_TIMEOUT, Category.DELIVERY_FAILED, errors=(errors.DeliveryTimeout,)),
    Rule(Reason.DELIVERED_TO_JUNK, Category.DELIVERY_FAILED, errors=(errors.DeliveredToJunk,)),
    Rule(Reason.AUTHENTICATION_FAILED, Category.DELIVERY_FAILED,
         errors=(errors.AuthenticationFailed,)),
    # Certificates: their own category on either protocol.
    Rule(Reason.CERTIFICATE_EXPIRED, Category.CERTIFICATE_UNTRUSTED, errors=(_CERT,),
         text=r"expired"),
    Rule(Reason.CERTIFICATE_HOSTNAME_MISMATCH, Category.CERTIFICATE_UNTRUSTED, errors=(_CERT,),
         text=r"mismatch|doesn't match|not valid for"),
    Rule(Reason.CERTIFICATE_UNTRUSTED, Category.CERTIFICATE_UNTRUSTED, errors=(_CERT,)),
    # Reaching the server.
    Rule(Reason.DNS_ERROR, errors=(socket.gaierror,)),
    Rule(Reason.DNS_ERROR, phases=frozenset({Phase.DNS}), errors=(TimeoutError,)),
    Rule(Reason.CONNECTION_REFUSED, errors=(ConnectionRefusedError,)),
    Rule(Reason.CONNECTION_TIMEOUT, phases=frozenset({Phase.CONNECT}), errors=(TimeoutError,)),
    Rule(Reason.GREETING_TIMEOUT, phases=frozenset({Phase.GREETING}), errors=(TimeoutError,)),
    # Connection limits, wherever the server says so (IMAP: at LOGIN; SMTP: 421 at connect).
    Rule(Reason.TOO_MANY_CONNECTIONS, text=_TOO_MANY),
    Rule(Reason.TLS_ERROR, errors=(errors.StartTLSUnavailable,)),
    Rule(Reason.TLS_ERROR, phases=frozenset({Phase.TLS, Phase.STARTTLS}),
         errors=(ssl.SSLError, ConnectionResetError, errors.UnexpectedReply)),
    # Logging in.
    Rule(Reason.APP_PASSWORD_REQUIRED, Category.APP_PASSWORD_REQUIRED, steps=LOGIN_STEPS,
         text=_APP_PASSWORD),
    Rule(Reason.TLS_REQUIRED, SETTINGS, errors=(errors.PlaintextLoginRefused,)),
    Rule(Reason.TLS_REQUIRED, SETTINGS, steps=LOGIN_STEPS,
         text=r"PRIVACYREQUIRED|plaintext authentication disallowed|must issue a STARTTLS"
              r"|encryption required|\b5\.7\.11\b|TLS required"),
    # The mail server said no to a token (an error challenge's JSON status, or the final NO).
    # Before the basic-auth row: Exchange's "SmtpClientAuthentication is disabled" refuses
    # tokens too (SMTP AUTH is off for the mailbox), and "move to OAuth" would be no help then.
    Rule(Reason.OAUTH_TOKEN_REJECTED, Category.UNAUTHORIZED, errors=(errors.OAuthLoginRefused,),
         text=_AUTH_FAILED + r"|status=40\d|invalid_token|authentication unsuccessful"
              r"|SmtpClientAuthentication is disabled"),
    Rule(Reason.BASIC_AUTH_DISABLED, Category.UNAUTHORIZED, steps=LOGIN_STEPS,
         text=_BASIC_AUTH_DISABLED),
    Rule(Reason.AUTH_FAILED, Category.UNAUTHORIZED, steps=LOGIN_STEPS, text=_AUTH_FAILED),
    Rule(Reason.IP_NOT_ALLOWED, text=r"client host rejected|client host \S+ blocked"
         r"|not (allowed|permitted) from|from this (ip|location|network)"
         r"|ip( address)? \S* ?(is )?(not allowed|blocked|denied|blacklisted)"),
    # Throttling, at login or when sending: backed off like a credential failure. Before the
    # temporary-failure rows: Gmail says "454 4.7.0 Too many login attempts".
    Rule(Reason.RATE_LIMITED, text=_RATE_LIMITED),
    Rule(Reason.AUTH_UNAVAILABLE, errors=(errors.AuthUnavailable,)),
    Rule(Reason.AUTH_UNAVAILABLE, steps=LOGIN_STEPS,
         text=r"\[UNAVAILABLE\]|\[SERVERBUG\]|temporary authentication failure|\b454\b"),
    # Sending the test email: a 4xx is the server's trouble, not a verdict on the message.
    Rule(Reason.SERVER_UNAVAILABLE, errors=(smtplib.SMTPSenderRefused, smtplib.SMTPRecipientsRefused,
                                            smtplib.SMTPDataError), text=r"(^|\| )4\d\d\b"),
    Rule(Reason.INTERNATIONAL_ADDRESS_UNSUPPORTED, errors=(errors.SmtpUtf8Unsupported,)),
    Rule(Reason.SENDER_REJECTED, errors=(smtplib.SMTPSenderRefused,)),
    Rule(Reason.RECIPIENT_REJECTED, errors=(smtplib.SMTPRecipientsRefused,)),
    Rule(Reason.MESSAGE_REJECTED, errors=(smtplib.SMTPDataError,)),
    # What a CRM needs after login.
    Rule(Reason.CAPABILITY_MISSING, errors=(errors.CapabilityMissing,)),
    Rule(Reason.MAILBOX_UNAVAILABLE, errors=(errors.MailboxUnavailable,)),
    # The server went away or spoke something else.
    Rule(Reason.SERVER_UNAVAILABLE, text=r"^421\b|\b421 |service not available|\[UNAVAILABLE\]"),
    Rule(Reason.PROTOCOL_ERROR, errors=(errors.UnexpectedReply,)),
    Rule(Reason.SERVER_UNAVAILABLE,
         errors=(ConnectionResetError, BrokenPipeError, smtplib.SMTPServerDisconnected, EOFError)),
    Rule(Reason.SERVER_UNAVAILABLE, text=r"socket error|connection (closed|reset|lost)|\bEOF\b"),
    Rule(Reason.TIMEOUT, errors=(TimeoutError,)),
    Rule(Reason.TLS_ERROR, errors=(ssl.SSLError,)),
    # The login was refused and the server did not say why: the guide's "IMAP authentication
    # error" (and its SMTP counterpart); the catch-all for everything else.
    Rule(Reason.UNKNOWN),
)


@dataclass(frozen=True)
class Evidence:
    step: Step
    phase: Phase
    chain: tuple[BaseException, ...]
    text: str


def exception_chain(exc: BaseException) -> tuple[BaseException, ...]:
    chain: list[BaseException] = []
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen and len(chain) < 10:
        chain.append(e)
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return tuple(chain)


def reply_text(exc: BaseException) -> str:
    """The server's words in an exception, without Python's decoration."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "; ".join(f"{code} {_text(msg)}" for code, msg in exc.recipients.values())
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"{exc.smtp_code} {_text(exc.smtp_error)}"
    if isinstance(exc, socket.gaierror):
        return f"DNS lookup failed: {exc.strerror}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror
    text = str(exc)
    return text or type(exc).__name__


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Context:
    """What a hint may mention about the inbox."""

    host: str
    port: int
    security: str
    provider: str = providers.OTHER


def classify(step: Step, exc: BaseException, phase: Phase, ctx: Context,
             secrets: Iterable[str] = ()) -> Diagnosis:
    chain = exception_chain(exc)
    texts = [reply_text(e) for e in chain]
    ev = Evidence(step, phase, chain, " | ".join(texts))
    rule = next(r for r in RULES if r.matches(ev))
    return Diagnosis(
        category=rule.category_for(step),
        reason=rule.reason,
        hint=hint(rule.reason, step, ctx),
        detail=one_line(texts[0], secrets),
    )


# --- hints -------------------------------------------------------------------------------

_PORTS = {Protocol.IMAP: "993 (ssl) or 143 (starttls)", Protocol.SMTP: "465 (ssl), 587 (starttls) or 25"}
_ALLOWLIST = ("If your IT team allows only certain IP addresses, ask them to add this exporter's "
              "egress IP to the allowlist.")

HINTS: Mapping[Reason, str] = {
    Reason.DNS_ERROR: "The host name {host} does not resolve. Check the {proto} server name "
                      "for typos, and that this machine's DNS works.",
    Reason.CONNECTION_REFUSED: "Nothing accepts connections on {host}:{port}. Check the {proto} "
                               "server and port: most {proto} ports are {ports}.",
    Reason.CONNECTION_TIMEOUT: "Connecting to {host}:{port} timed out: a firewall is silently "
                               "dropping the connection. " + _ALLOWLIST +
                               " Otherwise check the server and port ({ports}).",
    Reason.GREETING_TIMEOUT: "The connection opened but the {proto} server never greeted. The port "
                             "may expect implicit TLS (security: ssl) — most {proto} ports are "
                             "{ports} — or the server is overloaded.",
    Reason.TLS_ERROR: "The TLS handshake with {host}:{port} failed: the TLS mode probably does not "
                      "match the port (security: {security}). Use ssl for implicit TLS ports "
                      "(993, 465) and starttls for 143 and 587.",
    Reason.TLS_REQUIRED: "The server refuses a password over an unencrypted connection. Set "
                         "security to ssl or starttls for {proto}.",
    Reason.CERTIFICATE_UNTRUSTED: "The {proto} server's certificate is not signed by a trusted "
                                  "authority (self-signed or private CA). Install a certificate "
                                  "from a public CA, add the CA with ca_file, or set "
                                  "allow_insecure_certificate: true (the CRM's \"allow non-secure "
                                  "certificate\" option).",
    Reason.CERTIFICATE_EXPIRED: "The {proto} server's certificate has expired: renew it on the "
                                "server. Until then only allow_insecure_certificate: true "
                                "lets the connection through.",
    Reason.CERTIFICATE_HOSTNAME_MISMATCH: "The {proto} server's certificate is not valid for "
                                          "{host}. Use the host name the certificate names, or "
                                          "fix the certificate.",
    Reason.AUTH_FAILED: "The server rejected the credentials. Confirm the email address and "
                        "password; some servers need a custom username; check whether an "
                        "app-specific password is required. " + _ALLOWLIST,
    Reason.APP_PASSWORD_REQUIRED: "The account requires an app-specific password: create one in "
                                  "the provider's security settings{app_url} and use it as the "
                                  "password.",
    Reason.BASIC_AUTH_DISABLED: "The provider no longer accepts passwords (basic authentication) "
                                "for {proto} on this account. Move this inbox to OAuth 2.0: "
                                "auth.method: oauth2 (docs/oauth.md). Re-enabling basic auth "
                                "is not a fix: the providers are switching it off for good.",
    Reason.OAUTH_INVALID_GRANT: "The identity provider refused the refresh token: revoked, "
                                "expired, or the user's password or MFA changed. Sign in again "
                                "with `inbox-exporter oauth login --inbox <this inbox>` "
                                "(docs/oauth.md).",
    Reason.OAUTH_INVALID_CLIENT: "The identity provider refused the app: check auth.client_id "
                                 "and the client secret (client secrets expire, e.g. in "
                                 "Microsoft Entra ID), and that the app may use this grant and "
                                 "scope.",
    Reason.OAUTH_TOKEN_ENDPOINT_UNAVAILABLE: "The identity provider's token endpoint could not "
                                             "be reached or failed (network, DNS, proxy, TLS or "
                                             "an outage): no token, so no login. The mailbox "
                                             "itself may be fine. Check that this machine "
                                             "reaches auth.token_url and the provider's status "
                                             "page.",
    Reason.OAUTH_TOKEN_REJECTED: "The {proto} server refused a valid access token: it is for "
                                 "another user, lacks the mail scope, or the app was not granted "
                                 "access to this mailbox (Microsoft 365 app-only: a service "
                                 "principal with a mailbox permission, and SMTP AUTH enabled "
                                 "for the mailbox; Google: the scope https://mail.google.com/).",
    Reason.TOO_MANY_CONNECTIONS: "The server limits simultaneous connections to this mailbox (or "
                                 "from this IP) and the limit is reached. Close other clients of "
                                 "the mailbox, or ask your IT team to raise the limit.",
    Reason.IP_NOT_ALLOWED: "The server refused this client's IP address. " + _ALLOWLIST,
    Reason.AUTH_UNAVAILABLE: "The server could not authenticate right now (temporary failure or "
                             "no usable mechanism on this port). Retry later; if it persists, "
                             "ask your IT team or provider.",
    Reason.CAPABILITY_MISSING: "The IMAP server lacks a capability a CRM needs (IMAP4rev1). Check "
                               "that {host}:{port} is really an IMAP server that meets the "
                               "technical requirements.",
    Reason.MAILBOX_UNAVAILABLE: "Logged in, but the INBOX could not be opened or folders could not "
                                "be listed. Check that the mailbox exists and is enabled for IMAP.",
    Reason.SENDER_REJECTED: "The SMTP server refused to send as this address. Check that the "
                            "login may send as the inbox's email address.",
    Reason.RECIPIENT_REJECTED: "The SMTP server refused the test email's recipient. Check "
                               "test_email.to (the BCC address).",
    Reason.MESSAGE_REJECTED: "The SMTP server refused the test email's content. The detail says "
                             "why (policy, spam filter, size).",
    Reason.INTERNATIONAL_ADDRESS_UNSUPPORTED: (
        "An address of the test email (the inbox's or test_email.to) has non-ASCII characters "
        "before the @, and the SMTP server does not offer SMTPUTF8 (RFC 6531), so it cannot "
        "carry it. Use an ASCII address or alias for the mailbox, or a server that supports "
        "internationalized email."),
    Reason.RATE_LIMITED: "The provider is throttling this account (too many logins or too much "
                         "mail): the exporter backs off like after a credential failure. "
                         "Lengthen interval or test_email.interval, check what else logs in "
                         "or sends as this account, or ask the provider about its limits.",
    Reason.SERVER_UNAVAILABLE: "The {proto} server closed the connection or said it is "
                               "unavailable. If it persists, the server may be overloaded or "
                               "blocking this client. " + _ALLOWLIST,
    Reason.PROTOCOL_ERROR: "The server on {host}:{port} did not speak {proto} as expected. Check "
                           "the {proto} server and port: most {proto} ports are {ports}.",
    Reason.TIMEOUT: "The {proto} server stopped answering within the step timeout. Check the "
                    "server's health, or raise timeout if it is just slow.",
    Reason.DELIVERY_TIMEOUT: "The test email was accepted for sending but did not arrive in the "
                             "watched mailbox in time. Check the mail server's queue and logs, "
                             "filters or forwarding rules, and the delivery timeout.",
    Reason.DELIVERED_TO_JUNK: "The test email arrived, but in the Junk folder: the provider flags "
                              "this inbox's mail as spam. Check SPF, DKIM and DMARC for the "
                              "sender's domain and the provider's spam settings.",
    Reason.AUTHENTICATION_FAILED: "The test email arrived, but the receiving server's "
                                  "Authentication-Results say it failed DMARC, or neither SPF nor "
                                  "DKIM passed: receivers will send this inbox's mail to spam or "
                                  "reject it. The detail shows each method's result; fix the "
                                  "sender domain's SPF record, DKIM key or From alignment.",
    Reason.UNKNOWN: "The server refused without saying why. Check the {proto} server and port "
                    "settings ({ports}) and the credentials; ask your IT team or provider what "
                    "the detail means.",
}


def hint(reason: Reason, step: Step, ctx: Context) -> str:
    proto = step.protocol
    app_url = ""
    if reason is Reason.APP_PASSWORD_REQUIRED:
        p = providers.PROVIDERS.get(ctx.provider)
        if p and p.app_password_url:
            app_url = f" ({p.app_password_url})"
    return HINTS[reason].format(proto=proto.value.upper(), host=ctx.host, port=ctx.port,
                                security=ctx.security, ports=_PORTS[proto], app_url=app_url)


# --- documentation -------------------------------------------------------------------------

CATEGORY_DOCS: Mapping[Category, str] = {
    Category.IMAP_SETTINGS_INCORRECT: "Could not connect to the IMAP server on the given port "
                                      "(or its TLS settings are wrong).",
    Category.IMAP_AUTHENTICATION_ERROR: "The IMAP server refused the login for a reason other "
                                        "than the credentials (connection limit, IP not allowed, "
                                        "temporary failure), or did not say why.",
    Category.IMAP_VALIDATION_ERROR: "Logged in, but the mailbox does not offer what a CRM needs "
                                    "(IMAP4rev1, a selectable INBOX, listable folders).",
    Category.SMTP_SETTINGS_INCORRECT: "IMAP worked, but connecting or logging in to the SMTP "
                                      "server failed for a reason other than the credentials.",
    Category.TEST_EMAIL_FAILED: "Logged in to SMTP, but the test email was not accepted.",
    Category.UNAUTHORIZED: "The server says the credentials are wrong (IMAP or SMTP), or the "
                           "identity provider refused the OAuth grant or client.",
    Category.APP_PASSWORD_REQUIRED: "The server demands an app-specific password (IMAP or SMTP).",
    Category.CERTIFICATE_UNTRUSTED: "The server's certificate is self-signed, expired, for "
                                    "another host, or from an unknown authority (IMAP or SMTP).",
    Category.DELIVERY_FAILED: "The test email was sent but not found in the watched mailbox in "
                              "time, or found in Junk (the optional `delivery` step).",
}

GUIDE_NAMES: Mapping[Category, str] = {
    Category.IMAP_SETTINGS_INCORRECT: "IMAP settings incorrect",
    Category.IMAP_AUTHENTICATION_ERROR: "IMAP authentication error",
    Category.IMAP_VALIDATION_ERROR: "IMAP validation error",
    Category.SMTP_SETTINGS_INCORRECT: "SMTP settings incorrect",
    Category.TEST_EMAIL_FAILED: "Test email failed",
    Category.UNAUTHORIZED: "Unauthorized",
    Category.APP_PASSWORD_REQUIRED: "Unauthorized - app password needed",
    Category.CERTIFICATE_UNTRUSTED: "Unauthorized - SSL certificates not trusted",
    Category.DELIVERY_FAILED: "(beyond the guide) delivery not confirmed",
}


def render_docs() -> str:
    """docs/errors.md: categories, reasons with their hints, and the rule table in order."""
    ctx = Context(host="HOST", port=0, security="SECURITY")
    lines = ["# Error categories and reasons", "",
             "Generated by `python -m inbox_exporter.classify` from the classification table; "
             "a test fails when this file and the table disagree.", "",
             "Every failed step gets a **category** (which step broke, in the words of the "
             "CRM troubleshooting guide) and a **reason** (why). Both are closed sets and are "
             "used as metric labels. The *hint* tells an operator what to do; the *detail* "
             "(the server's reply, secrets redacted) is shown to humans only.", "",
             "## Categories", "", "| category | guide's error | meaning |", "|---|---|---|"]
    for c in Category:
        lines.append(f"| `{c.value}` | {GUIDE_NAMES[c]} | {CATEGORY_DOCS[c]} |")
    lines += ["", "## Reasons and hints", "",
              "Hints name the protocol, host and port of the failing step; shown here for IMAP.", "",
              "| reason | hint |", "|---|---|"]
    for r in Reason:
        lines.append(f"| `{r.value}` | {hint(r, Step.IMAP_LOGIN, ctx)} |")
    lines += ["", "## The rules, in order (first match wins)", "",
              "| # | steps | phases | errors | reply matches | category | reason |",
              "|---|---|---|---|---|---|---|"]
    for n, rule in enumerate(RULES, 1):
        steps = ", ".join(sorted(s.value for s in rule.steps)) if rule.steps else "any"
        phases = ", ".join(sorted(p.value for p in rule.phases)) if rule.phases else "any"
        errs = ", ".join(e.__name__ for e in rule.errors) if rule.errors else "any"
        text = f"`{rule.text}`".replace("|", "\\|") if rule.text else "any"
        if rule.category is None:
            cat = "the step's"
        elif isinstance(rule.category, Category):
            cat = f"`{rule.category.value}`"
        else:
            cat = " / ".join(f"`{c.value}`" for c in rule.category.values())
        lines.append(f"| {n} | {steps} | {phases} | {errs} | {text} | {cat} | `{rule.reason.value}` |")
    lines += ["", "Without a more specific row, the category is the step's: "
              + ", ".join(f"`{s.value}` → `{c.value}`" for s, c in STEP_CATEGORY.items()) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_docs(), end="")
