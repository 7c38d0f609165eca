"""Failures a probe detects itself: the server answered, but not what a CRM needs.

Socket, TLS and protocol-library errors are not wrapped: the classifier reads them (and their
`__cause__`/`__context__`) directly. These few exist for conditions no library raises.
"""


class ProbeError(Exception):
    """Base class of the failures a probe detects itself."""


class StepTimeout(ProbeError, TimeoutError):
    """The step's own timeout or the check's deadline ran out (the socket was cut)."""


class StartTLSUnavailable(ProbeError):
    """`security: starttls` but the server does not offer STARTTLS."""


class PlaintextLoginRefused(ProbeError):
    """The server refuses a password over this unencrypted connection (LOGINDISABLED, no AUTH)."""


class AuthUnavailable(ProbeError):
    """The server offers no authentication mechanism we can use."""


class SmtpUtf8Unsupported(ProbeError):
    """An address of the test email needs SMTPUTF8 (a non-ASCII local part, RFC 6531) and the
    server does not offer it."""


class CapabilityMissing(ProbeError):
    """A capability a CRM needs (IMAP4rev1) is not advertised."""


class MailboxUnavailable(ProbeError):
    """INBOX cannot be opened read-only, or folders cannot be listed."""


class UnexpectedReply(ProbeError):
    """The server sent something that is not the protocol (garbage, wrong service on the port)."""


class DeliveryTimeout(ProbeError):
    """The test email was not found in the watched mailbox before the delivery timeout."""


class DeliveredToJunk(ProbeError):
    """The test email arrived, but in the Junk folder."""


class AuthenticationFailed(ProbeError):
    """The test email arrived, but the receiving server's SPF/DKIM/DMARC verdict failed it."""


class OAuthTokenError(ProbeError):
    """Getting an access token from the identity provider failed."""


class OAuthInvalidGrant(OAuthTokenError):
    """The refresh token was revoked or has expired (`invalid_grant`), or there is none."""


class OAuthInvalidClient(OAuthTokenError):
    """The client id or secret is wrong, or the client may not use this grant or scope."""


class OAuthEndpointUnavailable(OAuthTokenError):
    """The token endpoint is unreachable, timed out or answered 5xx / not JSON."""


class OAuthLoginRefused(ProbeError):
    """The mail server answered our OAuth token with NO / an error reply (the original error is
    the cause; the server's decoded error challenge, if any, is in the text)."""
