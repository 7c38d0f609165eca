"""Opening a connection to a mail server: DNS, TCP, implicit TLS; certificates; TLS contexts.

Both protocols open their sockets here so that each phase is known to the classifier (a
timeout while connecting is a firewall, a timeout after connecting is a silent server) and
the certificate is recorded the same way for IMAP and SMTP.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime
from typing import Any

import idna

from ..model import CertificateInfo, Phase, Protocol


class Connection:
    """The state of one connection attempt that the step runner needs to see."""

    def __init__(self) -> None:
        self.phase = Phase.DNS
        self.sock: socket.socket | None = None
        self.aborted = False

    def abort(self) -> None:
        """Cut the connection now (from another thread): a blocked read fails at once."""
        self.aborted = True
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def open_socket(conn: Connection, host: str, port: int, timeout: float,
                source_address: str | None, tls: ssl.SSLContext | None,
                note: Callable[[str], None] = lambda _: None) -> socket.socket:
    """Resolve, connect (trying each address, like socket.create_connection) and wrap in TLS.

    `note` hears each phase as it ends, failures included: the addresses DNS returned, each
    attempt's outcome. A failed TLS handshake is told by the error (see handshake_failure)."""
    conn.phase = Phase.DNS
    host = ascii_host(host)  # DNS and the certificate both know an IDN by its A-labels
    try:
        infos = resolve(host, port, timeout)
    except OSError as e:
        note(f"DNS lookup of {host} failed: {e}")
        raise
    addresses = dict.fromkeys(str(info[4][0]) for info in infos)
    note(f"connecting to {host} port {port} (addresses: {', '.join(addresses) or 'none'})")
    conn.phase = Phase.CONNECT
    last: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        conn.sock = sock
        try:
            sock.settimeout(timeout)
            if source_address:
                sock.bind((source_address, 0))
            sock.connect(address)
            note(f"connected to {address[0]} port {address[1]}")
            break
        except OSError as e:
            sock.close()
            last = e
            note(f"{address[0]} port {address[1]}: {_attempt_failed(e, timeout, conn)}")
    else:
        assert last is not None
        raise last
    if tls is not None:
        conn.phase = Phase.TLS
        try:
            sock = tls.wrap_socket(sock, server_hostname=host)
        except BaseException:
            conn.sock.close()
            raise
        conn.sock = sock
    conn.phase = Phase.GREETING
    return sock


def _attempt_failed(e: OSError, timeout: float, conn: Connection) -> str:
    if conn.aborted:
        return "timed out: cut when the step's time ran out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, TimeoutError):
        return f"timed out after {timeout:g}s (no answer)"
    return f"failed: {e.strerror or e}"


def ascii_host(host: str) -> str:
    """A host name as DNS and TLS need it: an internationalized one (IDN) in A-labels.

    IDNA 2008 with the UTS 46 mapping, as browsers and mail clients use: `straße.de` is
    `xn--strae-oqa.de`, where Python's own "idna" codec (IDNA 2003, which socket and ssl apply
    to a str) would say `strasse.de`, another domain. Raises `idna.IDNAError` (a UnicodeError)
    for a name that has no A-label form; the config loader reports that as a config error.
    """
    if host.isascii():
        return host
    return idna.encode(host, uts46=True).decode("ascii")


# getaddrinfo() cannot be interrupted, so lookups run on a few threads of their own and the
# step waits at most its timeout. A hung resolver must not grow a queue either: concurrent
# lookups of one name share one call, a lookup given up on is cancelled if it has not started,
# and beyond MAX_PENDING distinct lookups a new one fails at once (as a DNS timeout).
_RESOLVER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dns")
MAX_PENDING = 64
_pending: dict[tuple[str, int], list] = {}  # (host, port) -> [future, waiters]
_pending_lock = threading.Lock()


def resolve(host: str, port: int, timeout: float) -> list:
    try:
        ipaddress.ip_address(host)  # a literal address needs no lookup: no thread hop
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except ValueError:
        pass
    key = (host, port)
    with _pending_lock:
        entry = _pending.get(key)
        if entry is None:
            if len(_pending) >= MAX_PENDING:
                raise TimeoutError(f"DNS lookup of {host} not started: {len(_pending)} lookups "
                                   "are pending (the resolver is not answering)")
            future = _RESOLVER.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
            entry = _pending[key] = [future, 0]
            new = True
        else:
            new = False
        entry[1] += 1
        future = entry[0]
    if new:
        # Outside the lock: a lookup that has already ended runs the callback right here,
        # and _forget takes the lock.
        future.add_done_callback(lambda f: _forget(key, f))
    try:
        return future.result(timeout=timeout)
    except (FutureTimeout, CancelledError):
        raise TimeoutError(f"DNS lookup of {host} took longer than {timeout:g}s") from None
    finally:
        with _pending_lock:
            entry[1] -= 1
            abandoned = entry[1] == 0
        if abandoned:
            future.cancel()  # nobody waits: if still queued, it never runs (outside the lock:
            #                  cancel() runs _forget, which takes it)


def _forget(key: tuple[str, int], future: Future) -> None:
    with _pending_lock:
        entry = _pending.get(key)
        if entry is not None and entry[0] is future:
            del _pending[key]


def pending_lookups() -> int:
    with _pending_lock:
        return len(_pending)


class _TLSSocket(ssl.SSLSocket):
    """An SSLSocket whose failed handshake leaves on the error what a support desk asks for:
    the certificate the server presented, verified or not (see handshake_failure)."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as e:  # a refused certificate, a reset, a timeout: all handshake failures
            presented = presented_certificate(self)
            e.tls_presented = presented  # type: ignore[attr-defined]  # - handshake_failure() reads it
            raise


@functools.lru_cache(maxsize=64)
def tls_context(ca_file: str | None, insecure: bool, _ca_mtime: float = 0.0) -> ssl.SSLContext:
    """A client context; cached, since loading the system trust store costs milliseconds."""
    ctx = ssl.create_default_context()
    ctx.sslsocket_class = _TLSSocket  # implicit TLS and both libraries' starttls() wrap through it
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)  # in addition to the system store
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def context_for(ca_file: str | None, insecure: bool) -> ssl.SSLContext:
    mtime = 0.0
    if ca_file:
        try:
            mtime = os.stat(ca_file).st_mtime  # a renewed CA file is picked up without restart
        except OSError:
            pass
    return tls_context(ca_file, insecure, mtime)


def certificate_info(sock: ssl.SSLSocket, protocol: Protocol) -> CertificateInfo:
    """Expiry from the raw certificate: cheaper than getpeercert()'s dict, and the same code
    whether or not verification was on (with it off, Python exposes only the raw form)."""
    der = sock.getpeercert(binary_form=True)
    return CertificateInfo(protocol=protocol, not_after=der_not_after(der) if der else None,
                           trusted=sock.context.verify_mode != ssl.CERT_NONE)


def presented_certificate(sock: ssl.SSLSocket) -> dict[str, Any] | None:
    """The server's certificate as getpeercert() would give it, whether or not it was
    verified, even after a failed handshake; None when not obtainable.

    getpeercert() says nothing until a handshake has succeeded with verification on. OpenSSL
    keeps the chain the server sent either way (SSL_get_peer_cert_chain); CPython reaches it
    through its private _ssl object since 3.10 (3.13 makes the chain public, as DER only), and
    that object's certificates decode themselves as getpeercert() does. Only read, to describe
    it: the connection is never used unverified."""
    try:
        chain = sock._sslobj.get_unverified_chain()  # type: ignore[attr-defined]  # - see above
        info = chain[0].get_info() if chain else None
    except (AttributeError, ValueError, ssl.SSLError):
        return None
    return info if isinstance(info, dict) else None


def describe_certificate(cert: dict[str, Any]) -> str:
    """subject; issuer; SANs; expiry of getpeercert()'s dict (subject and issuer RDN tuples)."""
    def name(field: str) -> str:
        return ", ".join(f"{k}={v}" for rdn in cert.get(field, ()) for k, v in rdn)

    sans = ", ".join(v for k, v in cert.get("subjectAltName", ()) if k in ("DNS", "IP Address"))
    return (f"subject {name('subject')}; issuer {name('issuer')}; SANs {sans or 'none'}; "
            f"expires {cert.get('notAfter', '?')}")


def tls_facts(sock: ssl.SSLSocket) -> list[str]:
    """What a support desk asks about a TLS connection: version, cipher, the certificate."""
    cipher = sock.cipher()
    facts = [f"TLS {sock.version()}, cipher {cipher[0] if cipher else '?'}"]
    cert: dict[str, Any] | None = dict(sock.getpeercert() or {})  # {} unless verified
    if cert:
        facts.append(f"certificate: {describe_certificate(cert)}")
        return facts
    cert = presented_certificate(sock)
    if cert:
        facts.append(f"certificate (not verified: allow_insecure_certificate): "
                     f"{describe_certificate(cert)}")
        return facts
    der = sock.getpeercert(binary_form=True)
    expires = der_not_after(der) if der else None
    facts.append("certificate: not verified (allow_insecure_certificate)"
                 + (f"; expires {time.strftime('%b %d %H:%M:%S %Y GMT', time.gmtime(expires))}"
                    if expires else ""))
    return facts


def handshake_failure(e: BaseException) -> list[str] | None:
    """What a failed TLS handshake leaves to tell (None: `e` is no handshake failure): the
    error and, when the server sent one, its certificate. Follows the causes, since protocol
    libraries rewrap socket errors."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if hasattr(cause, "tls_presented"):
            cert = cause.tls_presented
            return [f"TLS handshake failed: {getattr(cause, 'verify_message', None) or cause}",
                    f"certificate presented: {describe_certificate(cert)}" if cert
                    else "certificate presented: none received"]
        cause = cause.__cause__ or cause.__context__
    return None


def untrusted_certificate(protocol: Protocol) -> CertificateInfo:
    return CertificateInfo(protocol=protocol, not_after=None, trusted=False)


def der_not_after(der: bytes) -> float | None:
    """notAfter of an X.509 certificate in DER (RFC 5280 4.1), without a crypto library.

    Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber,
    signature, issuer, validity SEQUENCE { notBefore, notAfter }, ... } ... }
    """
    try:
        _, start, _ = _tlv(der, 0)  # Certificate
        _, pos, _ = _tlv(der, start)  # tbsCertificate
        tag, _, end = _tlv(der, pos)
        if tag == 0xA0:  # explicit version
            pos = end
        for _ in range(3):  # serialNumber, signature, issuer
            pos = _tlv(der, pos)[2]
        _, vstart, _ = _tlv(der, pos)  # validity
        after_pos = _tlv(der, vstart)[2]
        tag, s, e = _tlv(der, after_pos)
        text = der[s:e].decode("ascii")
        fmt = "%y%m%d%H%M%SZ" if tag == 0x17 else "%Y%m%d%H%M%SZ"  # UTCTime / GeneralizedTime
        return datetime.strptime(text, fmt).replace(tzinfo=UTC).timestamp()
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def _tlv(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the DER element at pos."""
    tag, length = buf[pos], buf[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(buf[pos:pos + n], "big")
        pos += n
    if pos + length > len(buf):
        raise IndexError("truncated DER")
    return tag, pos, pos + length
