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
                source_address: str | None, tls: ssl.SSLContext | None) -> socket.socket:
    """Resolve, connect (trying each address, like socket.create_connection) and wrap in TLS."""
    conn.phase = Phase.DNS
    host = ascii_host(host)  # DNS and the certificate both know an IDN by its A-labels
    infos = resolve(host, port, timeout)
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
            break
        except OSError as e:
            sock.close()
            last = e
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


@functools.lru_cache(maxsize=64)
def tls_context(ca_file: str | None, insecure: bool, _ca_mtime: float = 0.0) -> ssl.SSLContext:
    """A client context; cached, since loading the system trust store costs milliseconds."""
    ctx = ssl.create_default_context()
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


def tls_facts(sock: ssl.SSLSocket) -> list[str]:
    """What a support desk asks about a TLS connection: version, cipher, the certificate."""
    cipher = sock.cipher()
    facts = [f"TLS {sock.version()}, cipher {cipher[0] if cipher else '?'}"]
    cert = sock.getpeercert()  # parsed only when verified (else {}): then the DER's expiry
    if cert:
        def name(field: str) -> str:
            # typeshed types every value of the dict alike; subject and issuer are RDN tuples
            rdns: Any = cert.get(field, ())
            return ", ".join(f"{k}={v}" for rdn in rdns for k, v in rdn)

        # (type, value) pairs: typeshed types every value of the dict alike
        alt_names: Any = cert.get("subjectAltName", ())
        sans = ", ".join(v for k, v in alt_names if k in ("DNS", "IP Address"))
        facts.append(f"certificate: subject {name('subject')}; issuer {name('issuer')}; "
                     f"SANs {sans or 'none'}; expires {cert.get('notAfter', '?')}")
    else:
        der = sock.getpeercert(binary_form=True)
        expires = der_not_after(der) if der else None
        facts.append("certificate: not verified (allow_insecure_certificate)"
                     + (f"; expires {time.strftime('%b %d %H:%M:%S %Y GMT', time.gmtime(expires))}"
                        if expires else ""))
    return facts


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
