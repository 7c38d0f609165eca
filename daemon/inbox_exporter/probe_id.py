"""Probe ids that are provably ours: a random nonce and its HMAC-SHA256 under the deployment's
key (`checks.probe_key_env` / `checks.probe_key_file`).

Cleanup and the start-up sweep delete a message only when its id verifies under our key: a
probe of another deployment (another key), a forged header, or an id of the old unsigned
format is never touched. The id is one alphanumeric token, since some IMAP servers' header
search splits at punctuation.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets

log = logging.getLogger(__name__)

VERSION = "p1"
_NONCE_HEX, _MAC_HEX = 32, 24  # 128-bit nonce, 96-bit tag
_FORMAT = re.compile(rf"^{VERSION}([0-9a-f]{{{_NONCE_HEX}}})([0-9a-f]{{{_MAC_HEX}}})$")
ANY_FORMAT = re.compile(r"^[0-9a-z]{32,64}$")  # what a search may return: verified after
KEY_BYTES = 32


class ProbeKey:
    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("a probe key needs at least 16 bytes")
        self._key = key

    def __repr__(self) -> str:  # never the key itself
        return "ProbeKey(<redacted>)"

    def _tag(self, nonce: str) -> str:
        return hmac.new(self._key, nonce.encode(), hashlib.sha256).hexdigest()[:_MAC_HEX]

    def new_id(self) -> str:
        nonce = secrets.token_hex(_NONCE_HEX // 2)
        return f"{VERSION}{nonce}{self._tag(nonce)}"

    def verifies(self, probe_id: str) -> bool:
        m = _FORMAT.match(probe_id)
        return m is not None and hmac.compare_digest(m.group(2), self._tag(m.group(1)))

    @classmethod
    def from_text(cls, text: str) -> ProbeKey:
        """A key as written in its file or variable: hex (64 chars), or any secret text."""
        text = text.strip()
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = text.encode()
        return cls(raw if len(raw) >= 16 else hashlib.sha256(text.encode()).digest())

    @classmethod
    def generate(cls) -> ProbeKey:
        return cls(secrets.token_bytes(KEY_BYTES))

    def to_text(self) -> str:
        return self._key.hex()


def load_or_create(value: str | None, path: str | None) -> ProbeKey:
    """The deployment's key: the configured value; else the key file, created (0600) on first
    use when it does not exist; else a key for this process only, with a warning (probe mails
    of an earlier run then stay where they are: never deleted without proof)."""
    if value:
        return ProbeKey.from_text(value)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return ProbeKey.from_text(f.read())
        except FileNotFoundError:
            key = ProbeKey.generate()
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(key.to_text() + "\n")
                log.info("probe key created", extra={"file": path})
                return key
            except FileExistsError:  # another replica made it meanwhile: use theirs
                with open(path, encoding="utf-8") as f:
                    return ProbeKey.from_text(f.read())
            except OSError as e:
                log.warning("probe key file not writable: using a key for this process only",
                            extra={"file": path, "error": e.strerror})
                return key
    log.warning("no checks.probe_key_env / probe_key_file: probe mails are signed with a key "
                "for this process only; after a restart, older probe mails are not removed")
    return ProbeKey.generate()
