"""XOAUTH2 and OAUTHBEARER (RFC 7628): the client side of the two SASL mechanisms that carry an
OAuth 2.0 bearer token, for IMAP AUTHENTICATE and SMTP AUTH alike.

A server that refuses the token answers with a challenge holding base64 JSON
(`{"status":"401","schemes":"bearer","scope":"..."}`); the client must then send a dummy
response (XOAUTH2: empty; OAUTHBEARER: a single %x01, RFC 7628 3.2.3) and reads the final
NO / 535. Some servers (Microsoft 365) send no challenge at all and answer NO at once.
"""

from __future__ import annotations

import json
import re

XOAUTH2 = "XOAUTH2"
OAUTHBEARER = "OAUTHBEARER"
MECHANISMS = {"xoauth2": XOAUTH2, "oauthbearer": OAUTHBEARER}

# Fields of the error JSON worth showing; their values are short, token-free tokens of text.
_ERROR_FIELDS = ("status", "schemes", "scope", "error", "error_description")
_SAFE = re.compile(r"[^A-Za-z0-9 ._:/,=@+-]")


def initial_response(mechanism: str, user: str, token: str, host: str, port: int) -> bytes:
    if mechanism == XOAUTH2:
        # https://developers.google.com/gmail/imap/xoauth2-protocol
        return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    # RFC 7628 3.1: a GS2 header naming the authorization identity, then key=value pairs.
    authzid = user.replace("=", "=3D").replace(",", "=2C")
    return f"n,a={authzid},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01".encode()


def dummy_response(mechanism: str) -> bytes:
    """What a client answers to an error challenge, so the server can finish with NO / 535."""
    return b"" if mechanism == XOAUTH2 else b"\x01"


def describe_error(challenge: bytes) -> str:
    """The server's error JSON as `status=401 schemes=bearer scope=...` (never the raw bytes)."""
    try:
        data = json.loads(challenge.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return f"error challenge of {len(challenge)} bytes (not JSON)"
    if not isinstance(data, dict):
        return "error challenge (not a JSON object)"
    parts = [f"{k}={_SAFE.sub('', str(data[k]))[:80]}" for k in _ERROR_FIELDS if k in data]
    return " ".join(parts) or "error challenge (no status)"


class Exchange:
    """One authentication: answers the server's challenges and remembers its error, if any.

    With an initial response (SASL-IR, and always on SMTP) the first challenge is the error;
    without it the first (empty) challenge asks for the initial response."""

    MAX_CHALLENGES = 2  # the initial-response prompt and one error: anything more is a loop

    def __init__(self, mechanism: str, user: str, token: str, host: str, port: int):
        self.mechanism = mechanism
        self._initial = initial_response(mechanism, user, token, host, port)
        self.sent_initial = False
        self.error: str | None = None  # describe_error() of the server's error challenge
        self._challenges = 0

    def first(self) -> bytes:
        self.sent_initial = True
        return self._initial

    def respond(self, challenge: bytes) -> bytes:
        self._challenges += 1
        if self._challenges > self.MAX_CHALLENGES:
            raise ValueError("the server keeps challenging: giving up this authentication")
        if not self.sent_initial:
            return self.first()
        self.error = describe_error(challenge)
        return dummy_response(self.mechanism)
