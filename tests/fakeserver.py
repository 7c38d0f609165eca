"""A scripted IMAP/SMTP server on 127.0.0.1 port 0, only for faults real servers won't produce:
a greeting that never comes, garbage bytes, a connection cut mid-command, and exact replies
from public reports (Gmail, Microsoft, older Dovecot) to run through the real client code.

A script is a list of (expect, send) pairs applied in order to each connection:
`expect` is a regex the client's next line must match (None: don't read), `send` the bytes to
answer (None: say nothing; CUT: close the connection). `{tag}` in `send` is replaced by the
IMAP tag of the command in progress (the last non-empty line read).
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass, field

CUT = object()
SILENT = object()  # keep the connection open and say nothing more


@dataclass(frozen=True)
class Trickle:
    """Send `text` one byte at a time, `every` seconds apart: alive, but never done."""

    text: str
    every: float = 0.2


@dataclass
class FakeServer:
    script: list[tuple[str | None, object]]
    host: str = "127.0.0.1"
    port: int = 0
    transcripts: list[list[str]] = field(default_factory=list)
    echo: bool = False  # replace {line} in replies with the client's line (a careless server)

    def __post_init__(self) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.host, 0))
        self._sock.listen(8)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> FakeServer:
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sock.close()
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=5)

    def _accept(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        transcript: list[str] = []
        self.transcripts.append(transcript)
        reader = conn.makefile("rb")
        conn.settimeout(30)
        tag = ""
        try:
            for expect, send in self.script:
                line = ""
                if expect is not None:
                    line = reader.readline().decode("utf-8", "replace").rstrip("\r\n")
                    transcript.append(line)
                    if not re.search(expect, line, re.I):
                        conn.sendall(b"500 unexpected command\r\n")
                        break
                    if line:  # a continuation line (SASL) carries no tag: keep the command's
                        tag = line.split(" ", 1)[0]
                if send is CUT:
                    break
                if send is SILENT:
                    self._stop.wait(30)
                    break
                if isinstance(send, Trickle):
                    for ch in send.text:
                        if self._stop.wait(send.every):
                            break
                        conn.sendall(ch.encode())
                    break
                if send is not None:
                    reply = str(send).replace("{tag}", tag)
                    if self.echo:
                        reply = reply.replace("{line}", line)
                    conn.sendall(reply.encode())
            else:
                # Script done: answer LOGOUT/QUIT politely if asked, then close.
                line = reader.readline().decode("utf-8", "replace").rstrip("\r\n")
                if line:
                    transcript.append(line)
                    tag = line.split(" ", 1)[0]
                    if "LOGOUT" in line.upper():
                        conn.sendall(f"* BYE\r\n{tag} OK LOGOUT\r\n".encode())
                    elif "QUIT" in line.upper():
                        conn.sendall(b"221 2.0.0 Bye\r\n")
        except OSError:
            pass
        finally:
            conn.close()


IMAP_GREETING = "* OK fake ready\r\n"
# imaplib always asks for CAPABILITY right after the greeting.
IMAP_CAPABILITY = (r"CAPABILITY", "* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n{tag} OK done\r\n")
SMTP_GREETING = "220 fake.example.test ESMTP\r\n"
SMTP_EHLO = "250-fake.example.test\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"
