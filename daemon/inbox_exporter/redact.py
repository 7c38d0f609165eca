"""Turning an error or a server reply into a one-line detail a human may see, secrets removed."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable

MAX_DETAIL = 400
REDACTED = "<redacted>"


def _forms(secret: str) -> set[str]:
    """The ways a secret may show up in text: as is, quoted, base64 (SASL), and as bytes repr."""
    forms = {secret, repr(secret)[1:-1], repr(secret.encode())[2:-1]}
    raw = secret.encode()
    forms.add(base64.b64encode(raw).decode())
    return {f for f in forms if len(f) >= 3}


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if not secret:
            continue
        for form in sorted(_forms(secret), key=len, reverse=True):
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
