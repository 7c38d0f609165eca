"""Turning an error or a server reply into a one-line detail a human may see, secrets removed."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable

MAX_DETAIL = 400
REDACTED = "<redacted>"


# A server may echo the command it refuses: never show what follows AUTH or LOGIN <user>.
_COMMANDS = re.compile(
    r"""(\bAUTH(?:ENTICATE)?\s+[A-Z0-9-]+\s+)\S+"""  # AUTH <mechanism> <initial response>
    r"""|(\bLOGIN\s+(?:"(?:[^"\\]|\\.)*"|\S+)\s+)("(?:[^"\\]|\\.)*"|\S+)""",  # LOGIN <user> <password>
    re.I)


def _forms(secret: str) -> set[str]:
    """The ways a secret may show up in text: as is, IMAP-quoted, base64 (SASL LOGIN), as a
    Python str or bytes repr."""
    quoted = secret.replace("\\", "\\\\").replace('"', '\\"')
    forms = {base64.b64encode(secret.encode()).decode()}
    for text in (secret, quoted):  # a server may echo the quoted form inside a bytes repr
        forms |= {text, repr(text)[1:-1], repr(text.encode())[2:-1]}
    return {f for f in forms if len(f) >= 3}


def sasl_plain(username: str, password: str) -> str:
    """The SASL PLAIN initial response (RFC 4616), which carries the password in base64."""
    return base64.b64encode(f"\0{username}\0{password}".encode()).decode()


# scheme://user:password@host: the userinfo of any URL, wherever it shows up in text.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#@\s\"']*@")


def redact_urls(text: str) -> str:
    """`https://user:pass@host/` -> `https://<redacted>@host/` (also mid-sentence, in reprs)."""
    return _USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", text)


def split_userinfo(url: str) -> tuple[str, str | None]:
    """A URL's credentials as an Authorization header value (what curl does with them), and the
    URL without them: only the header, a secret, carries them from here on."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    return urlunsplit(parts._replace(netloc=host)), f"Basic {token}"


def redact(text: str, secrets: Iterable[str]) -> str:
    """Text from a server or an exception: login commands it echoes, URL credentials, and
    every form of the known secrets."""
    text = redact_urls(text)
    # The known secrets first: the command pattern stops at an escaped quote, and what it
    # left behind of a password would no longer match the password's forms.
    text = redact_secrets(text, secrets)
    return _COMMANDS.sub(lambda m: (m.group(1) or m.group(2)) + REDACTED, text)


def redact_secrets(text: str, secrets: Iterable[str]) -> str:
    """Every form of the known secrets (plain, quoted, base64, repr) in `text`."""
    return SecretForms(secrets).redact(text)


class SecretForms:
    """The forms of known secrets, computed once: for redacting many lines (a transcript
    redacts every line it records; recomputing the forms per line was a third of its cost)."""

    def __init__(self, secrets: Iterable[str] = ()):
        self._forms: list[str] = []
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        if secret:  # longest first: a form inside a longer one must not break the longer up
            self._forms = sorted(set(self._forms) | _forms(secret), key=len, reverse=True)

    def redact(self, text: str) -> str:
        for form in self._forms:
            if form in text:
                text = text.replace(form, REDACTED)
        return text


def one_line(text: str, secrets: Iterable[str] = ()) -> str:
    """Collapse whitespace, unwrap b'...' reprs, redact, and cap the length."""
    text = redact(text, secrets)  # before unwrapping too: a repr may escape the secret
    text = re.sub(r"""\bb(['"])(.*?)\1""", r"\2", text)
    text = " ".join(text.split())
    text = redact(text, secrets)
    if len(text) > MAX_DETAIL:
        text = text[: MAX_DETAIL - 1] + "…"
    return text
