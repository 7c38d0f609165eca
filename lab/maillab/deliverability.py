"""SPF, DKIM and DMARC for real: the deliverability side of the mail lab (lab.deliverability).

What runs (started on first use, stopped with the lab; see ../README.md "Deliverability"):

* **nsd** (authoritative DNS) on port 53 of a loopback address of its own (127.53.x.y, chosen
  per lab), serving the zone `test.`: every scenario domain's SPF TXT, DKIM key
  (`maillab._domainkey.<domain>` TXT) and DMARC TXT (`_dmarc.<domain>`).
* **OpenDKIM, signing** (Mode s): Postfix's submission smtpds sign mail whose From: domain has a
  key in its SigningTable (smtpd_milter_maps names it while the verifiers run).
* **The "mx"**, a second smtpd of the lab's Postfix (lab.ports.mx): mail for
  `rcpt.example.test` is relayed there from 127.0.0.1, like to a receiving provider.  It runs
  policyd-spf (Header_Type = AR) as a policy service, then **OpenDKIM, verifying** (Mode v) and
  **OpenDMARC** as milters, all with authserv-id `mx.lab.example`, and hands the message to
  Dovecot over LMTP, into the mailbox of `mx-inbox@rcpt.example.test` (`receiver`).
* The verifiers must ask nsd, not the machine's resolver.  OpenDMARC and policyd-spf (pyspf
  with pydns) read /etc/resolv.conf and have no resolver option, so they run in a private mount
  namespace (`unshare --mount`) where /etc/resolv.conf is a bind-mounted file naming nsd
  (glibc's resolv.conf has no port: hence nsd on port 53 of an address of its own).  /dev there
  is a small tmpfs whose `log` is the syslog socket of the lab's helper (verifyhelper.py): the
  milters log only to syslog, and their lines land in logs/verifiers.log.  Both OpenDKIMs run in
  the namespace too (for that log); the verifier resolves with libunbound, told by
  `Nameservers` + `ResolverConfiguration` to ask nsd.  Postfix's spawn cannot enter a
  namespace, so the helper also spawns policyd-spf per policy connection.  The machine's
  /etc/resolv.conf and /dev are never changed.
* A sender's own Authentication-Results claiming the mx's id are dropped on the way to the mx
  (smtp_header_checks of the `mxrelay` transport, postfix.py).

Client IP is 127.0.0.1 for everything, so SPF passes iff a domain's record lists 127.0.0.1.
"""
from __future__ import annotations

import base64
import contextlib
import os
import pwd
import random
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import LabError
from .postfix import MxSpec
from .util import ENV_MARKER, is_alive, log_excerpt, tail_file, terminate_tree, wait_until, write_file

if TYPE_CHECKING:
    from .lab import LabUser, MailLab

AUTHSERV_ID = "mx.lab.example"
RECEIVING_DOMAIN = "rcpt.example.test"
RECEIVER_LOCAL = "mx-inbox"
SELECTOR = "maillab"
# The "email service provider" of the unaligned scenario: its bounce address is the envelope
# sender and it signs with its own domain.  Another organizational domain than example.test
# (`.test` is no public suffix, so every *.example.test shares the org domain example.test, and
# DMARC's relaxed alignment would pass).
ESP_DOMAIN = "esp.test"
ESP_BOUNCE = f"bounces@{ESP_DOMAIN}"
ZONE = "test"

SPF_PASS = "v=spf1 ip4:127.0.0.1 -all"
SPF_ELSEWHERE = "v=spf1 ip4:192.0.2.0/24 -all"     # lists another provider, not 127.0.0.1
DMARC_REJECT = "v=DMARC1; p=reject"

NSD = "/usr/sbin/nsd"
OPENDKIM = "/usr/sbin/opendkim"
OPENDMARC = "/usr/sbin/opendmarc"
POLICYD_SPF = "/usr/bin/policyd-spf"
PUBLIC_SUFFIX_LIST = "/usr/share/publicsuffix/public_suffix_list.dat"
_REQUIRED = {NSD: "nsd", OPENDKIM: "opendkim", OPENDMARC: "opendmarc",
             POLICYD_SPF: "postfix-policyd-spf-python", PUBLIC_SUFFIX_LIST: "publicsuffix"}
_HELPER = Path(__file__).with_name("verifyhelper.py")
# not a lab client: lists that must not be empty, and must not hold 127.0.0.1 (TEST-NET-1)
_NOBODY_IP = "192.0.2.1"


@dataclass(frozen=True)
class Scenario:
    """One sender domain with its own DNS records, and the verdict the mx writes for its mail
    (as observed with OpenDKIM 2.11, OpenDMARC 1.4.2 and policyd-spf 3.0.4)."""

    name: str
    domain: str                       # the From: domain of its senders
    spf: str | None                   # its SPF TXT record (None: none)
    dmarc: str | None                 # its _dmarc TXT record
    sign_as: str | None               # DKIM d= of the signature on its mail (None: unsigned)
    published_key: str | None         # key at maillab._domainkey.<domain>: "good", "other"
    expected: dict[str, str]          # method -> result in the mx's Authentication-Results
    description: str = ""
    envelope_sender: str | None = None  # rewritten at submission (an ESP's bounce address)


def _scenario(name: str, *, spf: str | None = SPF_PASS, dmarc: str | None = DMARC_REJECT,
              sign: bool | str = True, key: str | None = "good", expect: str,
              description: str, envelope_sender: str | None = None) -> Scenario:
    domain = f"{name}.example.test"
    spf_r, dkim_r, dmarc_r = expect.split()
    return Scenario(name=name, domain=domain, spf=spf, dmarc=dmarc,
                    sign_as=(sign if isinstance(sign, str) else domain) if sign else None,
                    published_key=key, expected={"spf": spf_r, "dkim": dkim_r, "dmarc": dmarc_r},
                    description=description, envelope_sender=envelope_sender)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    _scenario("pass", expect="pass pass pass",
              description="SPF lists 127.0.0.1, signed with the published key, DMARC p=reject"),
    # OpenDKIM 2.11 says fail (reason="key not found in DNS"), not RFC 8601's permerror
    _scenario("nokey", key=None, expect="pass fail pass",
              description="signed, but no DKIM key in DNS; SPF passes and aligns"),
    _scenario("wrongkey", key="other", expect="pass fail pass",
              description="DNS publishes another key than the signing one; SPF passes"),
    _scenario("nospf", spf=SPF_ELSEWHERE, expect="fail pass pass",
              description="SPF lists another network (-all); DKIM passes and aligns"),
    _scenario("unaligned", spf=SPF_ELSEWHERE, sign=ESP_DOMAIN, key=None,
              expect="pass pass fail", envelope_sender=ESP_BOUNCE,
              description=f"an ESP sends it: envelope {ESP_BOUNCE}, DKIM d={ESP_DOMAIN}; both "
                          "pass but neither aligns with the From: domain (DMARC p=reject)"),
    _scenario("spoof", spf=SPF_ELSEWHERE, sign=False, key=None, expect="fail none fail",
              description="unsigned, SPF excludes 127.0.0.1, DMARC p=reject"),
)}


# ------------------------------------------------------------------ DNS (a tiny stub client)
_QTYPES = {"A": 1, "NS": 2, "SOA": 6, "TXT": 16}


def dns_query(server: str, name: str, qtype: str = "TXT", *, port: int = 53,
              timeout: float = 1.0) -> tuple[int, list[str]]:
    """Ask `server` over UDP: (rcode, answers).  TXT answers are the joined strings, A answers
    dotted quads, others the record type number.  OSError on timeout."""
    qid = secrets.randbits(16)
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack(
        ">HH", _QTYPES[qtype], 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, (server, port))
        while True:
            data = s.recv(65535)
            if len(data) >= 12 and struct.unpack(">H", data[:2])[0] == qid:
                break
    _, flags, qd, an, _, _ = struct.unpack(">HHHHHH", data[:12])
    pos = 12
    for _ in range(qd):
        pos = _skip_name(data, pos) + 4
    answers: list[str] = []
    for _ in range(an):
        pos = _skip_name(data, pos)
        rtype, _, _, rdlen = struct.unpack(">HHIH", data[pos:pos + 10])
        pos += 10
        rdata = data[pos:pos + rdlen]
        pos += rdlen
        if rtype == 16:
            parts, i = [], 0
            while i < len(rdata):
                parts.append(rdata[i + 1:i + 1 + rdata[i]].decode())
                i += 1 + rdata[i]
            answers.append("".join(parts))
        elif rtype == 1:
            answers.append(".".join(str(b) for b in rdata))
        else:
            answers.append(str(rtype))
    return flags & 0xF, answers


def _skip_name(data: bytes, pos: int) -> int:
    while True:
        n = data[pos]
        if n == 0:
            return pos + 1
        if n & 0xC0 == 0xC0:
            return pos + 2
        pos += 1 + n


def _txt(value: str) -> str:
    """A TXT record's rdata in zone-file syntax: quoted strings of at most 255 bytes."""
    chunks = [value[i:i + 250] for i in range(0, len(value), 250)] or [""]
    return " ".join(f'"{c}"' for c in chunks)


# ------------------------------------------------------------------ processes
@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    ready_paths: list[Path] = field(default_factory=list)


class Deliverability:
    """lab.deliverability: scenario senders, the receiving mailbox and the verifiers.

    >>> d = lab.deliverability
    >>> alice = d.add_sender("pass")         # starts the verifiers on first use
    >>> smtplib.SMTP(lab.host, lab.ports.submission) ... send to d.receiver.address
    >>> msg = d.wait_for_message(lambda m: m["Subject"] == "hi")
    >>> msg.get_all("Authentication-Results")   # written by mx.lab.example
    """

    authserv_id = AUTHSERV_ID
    receiving_domain = RECEIVING_DOMAIN
    scenarios = SCENARIOS

    def __init__(self, lab: MailLab):
        self.lab = lab
        self.dir = lab.workdir / "verifiers"
        self.log_path = lab.logs_dir / "verifiers.log"
        self.stderr_path = lab.logs_dir / "verifiers.stderr"
        self.nsd_log_path = lab.logs_dir / "nsd.log"
        self.nameserver: str | None = None
        self._procs: list[_Proc] = []
        self._log_offsets: dict[Path, int] = {}
        self._senders = 0
        self.timings: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<Deliverability {'running' if self.running else 'stopped'} ns={self.nameserver}>"

    # ------------------------------------------------------------ public API
    @property
    def running(self) -> bool:
        return bool(self._procs) and all(p.popen.poll() is None for p in self._procs)

    @property
    def receiver(self) -> LabUser:
        """The receiving mailbox (`mx-inbox@rcpt.example.test`): mail to it passes the mx with
        the verifiers.  Log in over IMAP at lab.host, lab.ports.imaps with its address and
        password, like any lab user.  Starts the verifiers."""
        self.start()
        return self.lab.users[RECEIVER_LOCAL]

    @property
    def plain_recipient(self) -> LabUser:
        """A mailbox reached without the mx (lab.users["bcc"]): no Authentication-Results."""
        return self.lab.users["bcc"]

    def add_sender(self, scenario: str, local: str | None = None,
                   password: str | None = None) -> LabUser:
        """A new lab user whose address is on the scenario's domain (`pass-1@pass.example.test`):
        IMAP login and SMTP AUTH as any lab user, and the From: of its mail is that domain.
        Starts the verifiers."""
        if scenario not in SCENARIOS:
            raise LabError(f"unknown scenario {scenario!r}; choose from {sorted(SCENARIOS)}")
        self.start()
        if local is None:
            while True:
                self._senders += 1
                local = f"{scenario}-{self._senders}"
                if local not in self.lab.users:
                    break
        return self.lab.add_user(local, password or secrets.token_urlsafe(12),
                                 domain=SCENARIOS[scenario].domain)

    def messages(self) -> list[EmailMessage]:
        """The receiving mailbox's messages (lab.messages), oldest first."""
        return list(self.lab.messages(RECEIVER_LOCAL))

    def wait_for_message(self, predicate: Callable[[EmailMessage], bool] | None = None,
                         timeout: float = 15.0) -> EmailMessage:
        """Poll the receiving mailbox (see lab.wait_for_message); the LabError names what the
        verifiers logged too."""
        try:
            return self.lab.wait_for_message(RECEIVER_LOCAL, predicate, timeout)
        except LabError as e:
            raise LabError(f"{e}\n{self.log_excerpt()}") from None

    def log_excerpt(self, lines: int = 30) -> str:
        return "\n".join(log_excerpt(p, self._log_offsets.get(p, 0), lines)
                         for p in (self.log_path, self.stderr_path, self.nsd_log_path))

    def log_tail(self, lines: int = 50) -> str:
        """logs/verifiers.log: OpenDKIM (opendkim-sign, opendkim-verify), OpenDMARC, policyd-spf."""
        return tail_file(self.log_path, lines)

    def zone_text(self) -> str:
        """The zone nsd serves (after start())."""
        return (self.dir / "nsd" / f"{ZONE}.zone").read_text()

    def query(self, name: str, qtype: str = "TXT") -> tuple[int, list[str]]:
        """Ask the lab's nsd (see dns_query)."""
        if self.nameserver is None:
            raise LabError("the deliverability lab is not running (lab.deliverability.start())")
        return dns_query(self.nameserver, name, qtype)

    # ------------------------------------------------------------ start
    def start(self, timeout: float = 20.0) -> Deliverability:
        """Start nsd and the verifiers (no-op while they run) and switch submission signing on.
        The lab must be running."""
        if self.running:
            return self
        lab = self.lab
        if not lab.running or lab.ports is None or lab.run_dir is None:
            raise LabError("start the lab first (lab.start()); the verifiers start on first use")
        if self._procs:      # one of them died: start over
            self._terminate()
        t0 = time.monotonic()
        _preflight()
        postfix = lab._postfix
        assert postfix is not None
        try:
            self._prepare()
            if RECEIVER_LOCAL not in lab.users:
                lab.add_user(RECEIVER_LOCAL, secrets.token_urlsafe(12), domain=RECEIVING_DOMAIN)
            for attempt in range(3):
                self.nameserver = _free_loopback_53()
                self._write_config()
                try:
                    self._launch(time.monotonic() + timeout)
                    break
                except LabError as e:
                    self._terminate()
                    if attempt < 2 and "in use" in str(e):
                        continue
                    raise
            postfix.set_signing(True)
        except BaseException:
            self._terminate()
            raise
        self.timings["start"] = time.monotonic() - t0
        return self

    def _prepare(self) -> None:
        d = self.dir
        for sub in ("", "dkim", "dmarc", "spf", "dev"):
            (d / sub).mkdir(exist_ok=True)
            (d / sub).chmod(0o755)
        nsd_dir = d / "nsd"
        nsd_dir.mkdir(exist_ok=True)
        nsd = pwd.getpwnam("nsd")
        os.chown(nsd_dir, nsd.pw_uid, nsd.pw_gid)   # xfrd writes its state there
        nsd_dir.chmod(0o755)
        run = self.lab.run_dir
        assert run is not None
        for user in ("opendkim", "opendmarc"):
            (run / user).mkdir(exist_ok=True)
            pw = pwd.getpwnam(user)
            os.chown(run / user, pw.pw_uid, pw.pw_gid)
            (run / user).chmod(0o755)
        self._make_keys()

    def _make_keys(self) -> None:
        """Two RSA-2048 keys, once per work directory: `good` signs every signed scenario
        (published where the scenario publishes a key), `other` is only published (wrongkey)."""
        kd = self.dir / "dkim"
        want = [k for k in ("good", "other") if not (kd / f"{k}.key").exists()]
        procs = {k: subprocess.Popen(
            ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
             "-out", str(kd / f"{k}.key.tmp")], stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE) for k in want}
        dkim = pwd.getpwnam("opendkim")
        for k, p in procs.items():
            _, err = p.communicate(timeout=60)
            if p.returncode != 0:
                raise LabError(f"openssl genpkey failed: {err.decode(errors='replace')}")
            tmp = kd / f"{k}.key.tmp"
            # RequireSafeKeys: readable by its owner (the opendkim user) only
            os.chown(tmp, dkim.pw_uid, dkim.pw_gid)
            tmp.chmod(0o600)
            os.replace(tmp, kd / f"{k}.key")

    def public_key(self, which: str) -> str:
        """The base64 DER public key of "good" or "other" (the p= of its DNS record)."""
        r = subprocess.run(["openssl", "pkey", "-in", str(self.dir / "dkim" / f"{which}.key"),
                            "-pubout", "-outform", "DER"], capture_output=True, timeout=30)
        if r.returncode != 0:
            raise LabError(f"openssl pkey failed: {r.stderr.decode(errors='replace')}")
        return base64.b64encode(r.stdout).decode()

    # ------------------------------------------------------------ config
    def _paths(self) -> dict[str, Path]:
        run = self.lab.run_dir
        assert run is not None
        # the milters bind after dropping root: their sockets live in directories they own
        return {"sign": run / "opendkim" / "sign.sock", "verify": run / "opendkim" / "verify.sock",
                "dmarc": run / "opendmarc" / "dmarc.sock", "policy": run / "spf-policy.sock",
                "syslog": run / "syslog.sock"}

    def mx_spec(self, port: int) -> MxSpec:
        """What Postfix needs to know (written into main.cf/master.cf at every lab start)."""
        p = self._paths()
        return MxSpec(port=port, domain=RECEIVING_DOMAIN,
                      milters=[f"unix:{p['verify']}", f"unix:{p['dmarc']}"],
                      policy=f"unix:{p['policy']}", sign_milter=f"unix:{p['sign']}",
                      authserv_id=AUTHSERV_ID,
                      envelope_senders={f"@{s.domain}": s.envelope_sender
                                        for s in SCENARIOS.values() if s.envelope_sender})

    def zone(self) -> str:
        ns = self.nameserver
        keys = {k: self.public_key(k) for k in ("good", "other")}
        rows = [f"$ORIGIN {ZONE}.", "$TTL 60",
                "@ IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 60",
                "@ IN NS ns.example.test.", f"ns.example.test. IN A {ns}"]

        def dkim(domain: str, key: str) -> None:
            rows.append(f"{SELECTOR}._domainkey.{domain}. IN TXT "
                        + _txt(f"v=DKIM1; k=rsa; p={keys[key]}"))

        for s in SCENARIOS.values():
            rows.append(f"; {s.name}: {s.description}")
            if s.spf:
                rows.append(f"{s.domain}. IN TXT {_txt(s.spf)}")
            if s.published_key:
                dkim(s.domain, s.published_key)
            if s.dmarc:
                rows.append(f"_dmarc.{s.domain}. IN TXT {_txt(s.dmarc)}")
        rows.append(f"; {ESP_DOMAIN}: the ESP of the unaligned scenario")
        rows.append(f"{ESP_DOMAIN}. IN TXT {_txt(SPF_PASS)}")
        dkim(ESP_DOMAIN, "good")
        return "\n".join(rows) + "\n"

    def _write_config(self) -> None:
        d, lab, p = self.dir, self.lab, self._paths()
        ns = self.nameserver
        nsd_dir = d / "nsd"
        write_file(nsd_dir / f"{ZONE}.zone", self.zone())
        write_file(nsd_dir / "nsd.conf", f"""\
# Generated by maillab (lab {lab.id}): the lab's DNS, authoritative for {ZONE}.
server:
    ip-address: {ns}
    port: 53
    do-ip6: no
    username: nsd
    chroot: ""
    zonesdir: "{nsd_dir}"
    zonelistfile: "{nsd_dir}/zone.list"
    database: ""
    xfrdfile: "{nsd_dir}/xfrd.state"
    xfrdir: "{nsd_dir}"
    pidfile: "{nsd_dir}/nsd.pid"
    logfile: "{self.nsd_log_path}"
    server-count: 1
    hide-version: yes
    identity: "maillab-{lab.id}"
    verbosity: 1
remote-control:
    control-enable: no
zone:
    name: {ZONE}
    zonefile: {ZONE}.zone
""")
        dk = d / "dkim"
        signing = {s.sign_as for s in SCENARIOS.values() if s.sign_as}
        write_file(dk / "KeyTable", "".join(
            f"{dom} {dom}:{SELECTOR}:{dk / 'good.key'}\n" for dom in sorted(signing)))
        write_file(dk / "SigningTable", "".join(
            f"*@{s.domain} {s.sign_as}\n" for s in SCENARIOS.values() if s.sign_as))
        # RequireSafeKeys no: the key file is 0600 opendkim, but OpenDKIM also checks every
        # directory above it, and a lab under /tmp (1777) fails that check
        common = ("Syslog yes\nSyslogSuccess yes\nLogWhy no\nUMask 0000\n"
                  "UserID opendkim:opendkim\nSoftwareHeader no\nRequireSafeKeys no\n")
        write_file(dk / "sign.conf", f"""\
# Generated by maillab: the submission side's signer (every From: domain in SigningTable).
{common}SyslogName opendkim-sign
Mode s
Socket local:{p['sign']}
KeyTable file:{dk / 'KeyTable'}
SigningTable refile:{dk / 'SigningTable'}
Canonicalization relaxed/relaxed
OversignHeaders From
""")
        # OpenDKIM resolves with libunbound.  Its defaults refuse both of the lab's needs:
        # do-not-query-localhost (no query to 127.0.0.0/8) and the RFC 6761 local zone
        # "test." static (every *.test name NXDOMAIN without asking anyone).
        write_file(dk / "unbound.conf", """\
# Generated by maillab: libunbound settings of the DKIM verifier (ResolverConfiguration).
server:
    do-not-query-localhost: no
    local-zone: "test." nodefault
""")
        write_file(dk / "verify.conf", f"""\
# Generated by maillab: the mx's verifier.  127.0.0.1 is the default InternalHosts (whose
# mail is signed, not verified): replaced by a TEST-NET address, every client is verified.
{common}SyslogName opendkim-verify
Mode v
Socket local:{p['verify']}
AuthservID {AUTHSERV_ID}
Nameservers {ns}
ResolverConfiguration {dk / 'unbound.conf'}
InternalHosts csl:{_NOBODY_IP}
AlwaysAddARHeader yes
LogResults yes
""")
        dm = d / "dmarc"
        write_file(dm / "ignore-hosts", f"{_NOBODY_IP}\n")
        write_file(dm / "opendmarc.conf", f"""\
# Generated by maillab: the mx's DMARC milter.  IgnoreHosts defaults to 127.0.0.1 (every lab
# client): replaced.  SPF comes from policyd-spf's Authentication-Results (same authserv-id).
Syslog true
AuthservID {AUTHSERV_ID}
TrustedAuthservIDs {AUTHSERV_ID}
Socket local:{p['dmarc']}
UMask 0000
UserID opendmarc:opendmarc
IgnoreHosts {dm / 'ignore-hosts'}
IgnoreAuthenticatedClients false
RejectFailures false
RequiredHeaders false
SPFIgnoreResults false
SPFSelfValidate false
FailureReports false
SoftwareHeader false
PublicSuffixList {PUBLIC_SUFFIX_LIST}
""")
        write_file(d / "spf" / "policyd-spf.conf", f"""\
# Generated by maillab: policyd-spf on the mx.  Never rejects (the verdict is the header);
# skip_addresses defaults to 127.0.0.0/8 (every lab client): replaced.
debugLevel = 1
TestOnly = 1
HELO_reject = No_Check
Mail_From_reject = False
PermError_reject = False
TempError_Defer = False
skip_addresses = {_NOBODY_IP}/32
Header_Type = AR
Authserv_Id = {AUTHSERV_ID}
Hide_Receiver = No
Lookup_Time = 5
""")
        write_file(d / "resolv.conf", f"# the lab's nsd (maillab {lab.id})\nnameserver {ns}\n"
                   "options timeout:2 attempts:1\n")
        write_file(d / "ns-setup.sh", f"""\
# Generated by maillab: runs as root in a new mount namespace (unshare --mount, private
# propagation), then execs the helper.  Nothing here is visible outside the namespace.
set -e
dev="{d / 'dev'}"
mount -t tmpfs -o mode=0755,size=64k maillab-dev "$dev"
for f in null zero full random urandom tty; do
    : > "$dev/$f"
    mount --bind "/dev/$f" "$dev/$f"
done
ln -s /proc/self/fd "$dev/fd"
ln -s /proc/self/fd/0 "$dev/stdin"
ln -s /proc/self/fd/1 "$dev/stdout"
ln -s /proc/self/fd/2 "$dev/stderr"
ln -s "{p['syslog']}" "$dev/log"
mount --rbind "$dev" /dev
mount --bind "{d / 'resolv.conf'}" /etc/resolv.conf
exec "$@"
""")

    # ------------------------------------------------------------ run
    def _popen(self, name: str, cmd: list[str], ready: list[Path]) -> None:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TZ": os.environ.get("TZ", "UTC"),
               "LANG": "C", ENV_MARKER: self.lab.id}
        with open(self.stderr_path, "ab") as err:
            err.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {name}: {' '.join(cmd)}\n".encode())
            err.flush()
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                     env=env, close_fds=True, start_new_session=True)
        self._procs.append(_Proc(name, popen, ready))

    def _launch(self, deadline: float) -> None:
        d, p = self.dir, self._paths()
        for path in (self.log_path, self.stderr_path, self.nsd_log_path):
            self._log_offsets[path] = path.stat().st_size if path.exists() else 0
        for sock in p.values():
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        with contextlib.suppress(FileNotFoundError):
            (d / "nsd" / "nsd.pid").unlink()
        self._popen("nsd", [NSD, "-d", "-c", str(d / "nsd" / "nsd.conf")], [])
        self._popen("verifyhelper", [
            shutil.which("unshare") or "/usr/bin/unshare", "--mount", "--propagation", "private",
            "/bin/sh", str(d / "ns-setup.sh"),
            sys.executable, str(_HELPER), "--syslog", str(p["syslog"]), "--log", str(self.log_path),
            "--policy", str(p["policy"]), "--policy-user", "policyd-spf",
            "--", POLICYD_SPF, str(d / "spf" / "policyd-spf.conf")], [p["syslog"], p["policy"]])
        helper = self._procs[-1]
        self._wait("the verifiers' helper (mount namespace, syslog and policy sockets)",
                   lambda: all(x.exists() for x in helper.ready_paths), deadline)
        enter = [shutil.which("nsenter") or "/usr/bin/nsenter", f"--target={helper.popen.pid}",
                 "--mount", "--"]
        self._popen("opendkim-sign", [*enter, OPENDKIM, "-f", "-x", str(d / "dkim" / "sign.conf")],
                    [p["sign"]])
        self._popen("opendkim-verify", [*enter, OPENDKIM, "-f", "-x", str(d / "dkim" / "verify.conf")],
                    [p["verify"]])
        self._popen("opendmarc", [*enter, OPENDMARC, "-f", "-c", str(d / "dmarc" / "opendmarc.conf")],
                    [p["dmarc"]])
        self._wait("the milter sockets", lambda: all(
            x.exists() for pr in self._procs for x in pr.ready_paths), deadline)
        self._wait("nsd answering", self._nsd_answers, deadline)

    def _nsd_answers(self) -> bool:
        assert self.nameserver is not None
        try:
            rcode, answers = dns_query(self.nameserver, "pass.example.test", timeout=0.2)
        except OSError:
            return False
        return rcode == 0 and SPF_PASS in answers

    def _died(self) -> str | None:
        for pr in self._procs:
            if pr.popen.poll() is not None:
                why = f"{pr.name} exited with code {pr.popen.returncode}"
                nsd_log = tail_file(self.nsd_log_path, 5)
                if pr.name == "nsd" and "in use" in nsd_log:
                    why += " (address in use)"
                return why + "\n" + self.log_excerpt()
        return None

    def _wait(self, what: str, check: Callable[[], bool], deadline: float) -> None:
        if not wait_until(check, deadline, 0.01, abort=self._died):
            raise LabError(f"deliverability lab: no {what} in time\n" + self.log_excerpt())

    def popens(self) -> list[subprocess.Popen]:
        return [p.popen for p in self._procs]

    def _terminate(self) -> list[int]:
        left = terminate_tree([p.popen.pid for p in self._procs], popens=self.popens(), timeout=5.0)
        self.forget()
        return left

    def forget(self) -> None:
        """After the lab stopped the processes (lab.stop() stops them with everything else)."""
        self._procs = []
        self.nameserver = None

    def stop(self) -> None:
        """Stop the verifiers and nsd; submitted mail is no longer signed, mail to the receiving
        domain waits in the queue (milter_default_action = tempfail on the mx)."""
        postfix = self.lab._postfix
        if postfix is not None and self.lab.running:
            postfix.set_signing(False)
        left = [p for p in self._terminate() if is_alive(p)]
        if left:
            raise LabError(f"deliverability lab: processes survived SIGKILL: {left}")


def _preflight() -> None:
    missing = sorted({pkg for path, pkg in _REQUIRED.items() if not os.path.exists(path)})
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            missing.append("util-linux/mount")
    if missing:
        raise LabError("the deliverability lab needs the packages " + " ".join(sorted(set(missing)))
                       + " (scripts/setup installs them)")
    for user in ("opendkim", "opendmarc", "policyd-spf", "nsd"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise LabError(f"no user {user!r} (its package creates it; run scripts/setup)") from None


def _free_loopback_53() -> str:
    """A loopback address (127.53.x.y) whose port 53 is free for TCP and UDP."""
    rnd = random.SystemRandom()
    for _ in range(50):
        ip = f"127.53.{rnd.randint(1, 254)}.{rnd.randint(1, 254)}"
        ok = True
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            with socket.socket(socket.AF_INET, kind) as s:
                try:
                    s.bind((ip, 53))
                except OSError:
                    ok = False
                    break
        if ok:
            return ip
    raise LabError("no free port 53 on 127.53.0.0/16")
