"""What was said during one check: the protocol lines of each connection, timestamped from the
check's start, and the facts a provider's support desk asks for (the addresses DNS returned and
each connection attempt's outcome, TLS version and cipher, the certificate, also one presented
in a failed handshake, SASL mechanism, queue id). Redacted as it is written, never afterwards:

- a login command keeps its verb and mechanism; its arguments (IMAP LOGIN's user name too),
  every client line after it and every server continuation ("+ ..." / "334 ...") until the
  server's final answer become `<redacted N bytes>`, whatever the mechanism (LOGIN, PLAIN,
  XOAUTH2, OAUTHBEARER);
- the test email shows its headers, its body only as a size; IMAP literals (message contents)
  only as a size; from the mailbox only counts, INBOX and the special-use folders (RFC 6154)
  with their attributes, system flags: other folder names and keywords never;
- every line also passes through the secret filter (redact.SecretForms) with the inbox's own
  secrets (and the access token once fetched), as a second net.

Bounded: a transcript stops at MAX_BYTES of text ("... truncated"), lines at MAX_LINE; the store
keeps it zlib-compressed (`packed()`) in at most MAX_PACKED bytes, whatever the text: lines from
the middle are left out until it fits. Two per inbox (the last check's, the last failure's):
10,000 inboxes hold at most 40 MB of transcripts.
"""

from __future__ import annotations

import re
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from .redact import SecretForms, redact_urls

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

MAX_BYTES = 12 * 1024
MAX_LINE = 400
MAX_PACKED = 2 * 1024  # x 2 transcripts x 10,000 inboxes = 40 MB (issue #13: under 50 MB)

# Client lines that start a login: (everything shown, the secret part)
# SMTP first: `AUTH LOGIN <base64 user name>` also reads as an IMAP LOGIN tagged "AUTH".
_LOGINS = (re.compile(rb"^(AUTH \S+)( .*)?$", re.I | re.S),  # SMTP (RFC 4954)
           re.compile(rb"^(\S+ LOGIN)( .*)?$", re.I | re.S),  # IMAP: user name and password
           re.compile(rb"^(\S+ AUTHENTICATE \S+)( .*)?$", re.I | re.S))  # IMAP SASL
_LITERAL = re.compile(rb"\{(\d+)\+?\}$")

# The mailbox beyond counts: folder names (LIST, RFC 3501 7.2.2) but INBOX's and those with a
# special-use attribute (RFC 6154), which support needs to see; keywords (FLAGS, PERMANENTFLAGS
# and FETCH's FLAGS, RFC 3501 2.3.2) but the system flags.
_LIST = re.compile(r'^(\* (?:LIST|LSUB|XLIST) \(([^)]*)\) (?:NIL|"(?:[^"\\]|\\.)*"|\S+) )(.*)$', re.I)
_NAME = re.compile(r'"(?:[^"\\]|\\.)*"|[^\s(]+')
_SPECIAL_USE = frozenset(("\\sent", "\\junk", "\\trash", "\\drafts", "\\archive", "\\all",
                          "\\flagged"))
_FLAGS = re.compile(r"\b((?:PERMANENT)?FLAGS) \(([^)]*)\)", re.I)
_SYSTEM_FLAGS = frozenset(("\\seen", "\\answered", "\\flagged", "\\deleted", "\\draft", "\\recent",
                           "\\*"))


# A preset dictionary (RFC 1950 FDICT) of what every transcript says: a 4 KB transcript packs to
# about a third of what plain zlib makes of it. Changing it makes older packed transcripts
# unreadable: they live in memory only, so that is fine.
DICTIONARY = (
    b" ms imap * connecting to  port  (addresses: ) ms imap * connected to  port : connection "
    b"refused timed out after s (no answer) TLS handshake failed: self-signed certificate "
    b"certificate has expired Hostname mismatch, certificate is not valid for certificate "
    b"presented: <folder> keywords> lines left out "
    b" ms imap * connected to  port  ms imap S * OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS "
    b"ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN AUTH=LOGIN AUTH=XOAUTH2 AUTH=OAUTHBEARER] "
    b" ms imap C CAPABILITY ms imap S * CAPABILITY IMAP4rev1 OK Pre-login capabilities listed, "
    b"post-login capabilities have more. ms imap * TLS TLSv1.3, cipher TLS_AES_256_GCM_SHA384 "
    b"TLS_AES_128_GCM_SHA256 ms imap * certificate: subject commonName=; issuer commonName=; "
    b"organizationName=; SANs ; expires GMT LOGIN <redacted  bytes> NO [AUTHENTICATIONFAILED] "
    b"Authentication failed. OK Logged in EXAMINE INBOX * FLAGS (\\Answered \\Flagged "
    b"\\Deleted \\Seen \\Draft) * OK [PERMANENTFLAGS ()] Read-only mailbox. * EXISTS * RECENT "
    b"* OK [UIDVALIDITY ] UIDs valid * OK [UIDNEXT ] Predicted next UID OK [READ-ONLY] Examine "
    b"completed LIST \"\" \"%\" * LIST (\\HasNoChildren) \"/\" INBOX OK List completed LOGOUT "
    b"* BYE Logging out OK Logout completed. ms smtp * connected to ms smtp S 220 ESMTP "
    b"ms smtp C ehlo ms smtp S 250-PIPELINING 250-SIZE 250-VRFY 250-ETRN 250-STARTTLS "
    b"250-AUTH PLAIN LOGIN XOAUTH2 250-ENHANCEDSTATUSCODES 250-8BITMIME 250-DSN 250-SMTPUTF8 "
    b"250 CHUNKING ms smtp C STARTTLS 220 2.0.0 Ready to start TLS ms smtp C AUTH PLAIN "
    b"<redacted  bytes> 235 2.7.0 Authentication successful 535 5.7.8 Error: authentication "
    b"failed: ms smtp C mail FROM:<> size= 250 2.1.0 Ok rcpt TO:<> 250 2.1.5 Ok data 354 End "
    b"data with <CR><LF>.<CR><LF> From: To: Subject: inbox-exporter test email Date: Message-ID: "
    b"<inbox-exporter.p1@> X-Inbox-Exporter-Probe: p1 Auto-Submitted: auto-generated "
    b"MIME-Version: 1.0 Content-Type: text/plain; charset=us-ascii Content-Transfer-Encoding: "
    b"7bit <body:  bytes not shown> 250 2.0.0 Ok: queued as quit 221 2.0.0 Bye")


def _redacted(data: bytes) -> str:
    return f"<redacted {len(data)} bytes>"


def _counts_only(line: str) -> str:
    """An untagged IMAP reply without what the mailbox holds beyond counts."""
    listed = _LIST.match(line)
    if listed:
        name = _NAME.match(listed.group(3))
        special = _SPECIAL_USE.intersection(listed.group(2).lower().split())
        if not special and not (name and name.group(0).strip('"').upper() == "INBOX"):
            return listed.group(1) + "<folder>"
    return _FLAGS.sub(_system_flags, line)


def _system_flags(flags: re.Match[str]) -> str:
    every = flags.group(2).split()
    shown = [f for f in every if f.lower() in _SYSTEM_FLAGS]
    if len(shown) < len(every):
        n = len(every) - len(shown)
        shown.append(f"<{n} keyword{'s' if n > 1 else ''}>")
    return f"{flags.group(1)} ({' '.join(shown)})"


class Transcript:
    def __init__(self, secrets: Iterable[str] = (), clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._t0 = clock()
        self._lines: list[str] = []
        self._size = 0
        self._full = False
        self._secrets = SecretForms(secrets)
        self._in_login: set[str] = set()  # connections inside a login exchange
        self._in_data: set[str] = set()  # SMTP connections between DATA's 354 and the message
        self._lock = threading.Lock()  # the IMAP and SMTP legs write at the same time

    def secret(self, value: str) -> None:
        """A secret learnt during the check (an access token): never shown either."""
        self._secrets.add(value)

    # --- writing ---------------------------------------------------------------------------

    def fact(self, conn: str, text: str) -> None:
        self._add(conn, "*", text)

    def sent(self, conn: str, data: bytes) -> None:
        """What the client wrote: a command line (or several), a literal, the message."""
        if conn in self._in_data:
            self._in_data.discard(conn)
            self._message(conn, data)
            return
        for line in data.split(b"\r\n"):
            if not line:
                continue
            if conn in self._in_login:
                self._add(conn, "C", _redacted(line))
                continue
            login = next((m for p in _LOGINS if (m := p.match(line))), None)
            if login:
                self._in_login.add(conn)
                shown = login.group(1).decode("utf-8", "replace")
                rest = login.group(2) or b""
                self._add(conn, "C", shown + (f" {_redacted(rest.strip())}" if rest else ""))
                continue
            self._add(conn, "C", line.decode("utf-8", "replace"))

    def received(self, conn: str, line: bytes) -> None:
        """One line from the server (without CRLF)."""
        continuation = line.startswith(b"+") or line.startswith(b"334")
        if conn in self._in_login:
            if continuation:
                self._add(conn, "S", line[:4].decode("ascii", "replace").split(" ")[0] + " "
                          + _redacted(line[2:] if line.startswith(b"+") else line[4:]))
                return
            if not line.startswith(b"*"):  # the tagged / final answer ends the exchange
                self._in_login.discard(conn)
        if line.startswith(b"354"):
            self._in_data.add(conn)
        text = line.decode("utf-8", "replace")
        self._add(conn, "S", _counts_only(text) if text.startswith("* ") else text)

    def literal(self, conn: str, size: int) -> None:
        self._add(conn, "S", f"<literal: {size} bytes not shown>")

    def _message(self, conn: str, data: bytes) -> None:
        head, sep, body = data.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            self._add(conn, "C", line.decode("utf-8", "replace"))
        if sep:
            self._add(conn, "C", f"<body: {len(body)} bytes not shown>")

    def _add(self, conn: str, who: str, text: str) -> None:
        text = self._secrets.redact(redact_urls(text))  # the second net
        if len(text) > MAX_LINE:
            text = text[:MAX_LINE] + f"... ({len(text) - MAX_LINE} more)"
        with self._lock:  # the time taken inside: lines of both legs stay in order
            line = f"{(self._clock() - self._t0) * 1000:7.0f} ms {conn:<4} {who} {text}"
            if self._full:
                return
            if self._size + len(line) > MAX_BYTES:
                self._lines.append("... truncated")
                self._full = True
                return
            self._lines.append(line)
            self._size += len(line) + 1

    # --- reading ---------------------------------------------------------------------------

    def text(self) -> str:
        with self._lock:
            return "\n".join(self._lines)

    def packed(self) -> bytes:
        return pack(self.text())


def pack(text: str) -> bytes:
    """`text` zlib-packed in at most MAX_PACKED bytes: when it does not fit, lines from the
    middle are left out (the beginning says where it connected, the end how it ended), as few
    as fit, found by bisection (a dozen packings at most). Leaving all out always fits."""
    packed = _deflate(text)
    if len(packed) <= MAX_PACKED:
        return packed
    lines = text.split("\n")
    fewest, most = 1, len(lines)
    packed = _deflate(_left_out(lines, most))
    while fewest < most:
        n = (fewest + most) // 2
        candidate = _deflate(_left_out(lines, n))
        if len(candidate) <= MAX_PACKED:
            most, packed = n, candidate
        else:
            fewest = n + 1
    return packed


def _left_out(lines: list[str], n: int) -> str:
    kept = len(lines) - n
    head, tail = lines[:(kept + 1) // 2], lines[len(lines) - kept // 2:]
    return "\n".join([*head, f"\u2026 {n} lines left out \u2026", *tail])


def _deflate(text: str) -> bytes:
    c = zlib.compressobj(6, zdict=DICTIONARY)
    return c.compress(text.encode()) + c.flush()


def unpack(packed: bytes | None) -> str | None:
    if packed is None:
        return None
    d = zlib.decompressobj(zdict=DICTIONARY)
    return (d.decompress(packed) + d.flush()).decode()


class Tap:
    """One connection's end of a transcript, for the protocol library subclasses."""

    __slots__ = ("conn", "transcript")

    def __init__(self, transcript: Transcript, conn: str):
        self.transcript, self.conn = transcript, conn

    def sent(self, data: ReadableBuffer) -> None:
        self.transcript.sent(self.conn, bytes(data))

    def received(self, line: bytes) -> None:
        self.transcript.received(self.conn, line.rstrip(b"\r\n"))

    def literal(self, size: int) -> None:
        self.transcript.literal(self.conn, size)
