"""MailLab: private Dovecot + Postfix instances for tests (see ../README.md)."""
from __future__ import annotations

import atexit
import contextlib
import email.parser
import email.policy
import fcntl
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING

from . import tls as _tls
from .deliverability import Deliverability
from .dovecot import DovecotInstance, DovecotSpec
from .errors import LabError
from .oauth import OAuthServer
from .oauth import check_installed as _check_oauth_installed
from .postfix import PostfixInstance, SmtpListener
from .util import (
    ENV_MARKER,
    SAFE_PATH_CHARS,
    allocate_ports,
    is_alive,
    make_traversable,
    pids_with_cmdline,
    pids_with_env,
    port_accepts,
    port_is_free,
    read_banner,
    tail_file,
    terminate_tree,
    wait_until,
    write_file,
)

if TYPE_CHECKING:
    import ssl

DOMAIN = "example.test"
HOST = "127.0.0.1"
HOSTNAME = "mail.example.test"
APP_PASSWORD_REASON = ("Application-specific password required: "
                       "https://support.google.com/accounts/answer/185833")
NETUSER_ALLOW_NETS = "10.0.0.0/8"
# the mailbox the `daemon-app` OAuth client (client_credentials) is bound to
DAEMON_APP_USER = "alice"
_LOCAL_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_DOMAIN_RE = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)+$")

# sun_path is 108 bytes; Dovecot's longest socket below base_dir is ~25 chars
_MAX_RUN_DIR_LEN = 60


@dataclass(frozen=True)
class LabUser:
    local: str
    address: str
    password: str


@dataclass
class Ports:
    """All on 127.0.0.1.  imap_* are plain IMAP with STARTTLS offered,
    imaps_* implicit TLS, submission_* STARTTLS (required before AUTH),
    smtps_* implicit TLS (wrapper mode).  *_oauth: XOAUTH2/OAUTHBEARER besides
    passwords; oidc: the OAuth authorization server (http)."""
    imaps: int
    imap: int
    lmtp: int
    imaps_selfsigned: int
    imap_selfsigned: int
    imaps_expired: int
    imap_expired: int
    imaps_wronghost: int
    imap_wronghost: int
    imaps_limited: int
    submission: int
    smtps: int
    smtps_selfsigned: int
    smtps_expired: int
    smtps_wronghost: int
    submission_selfsigned: int
    submission_expired: int
    submission_wronghost: int
    submission_client_rejected: int
    imaps_oauth: int
    imap_oauth: int
    submission_oauth: int
    smtps_oauth: int
    oidc: int
    mx: int   # the deliverability lab's receiving smtpd (lab.deliverability), no AUTH

    def as_dict(self) -> dict[str, int]:
        return asdict(self)



class LabMessage(EmailMessage):
    """A message read from a lab Maildir, and where it lies."""

    maillab_path: Path
    maillab_folder: str  # "INBOX", "Sent", ...

_RUNNING: set[MailLab] = set()


@atexit.register
def _stop_leftover_labs() -> None:   # a fixture that never ran its teardown
    for lab in list(_RUNNING):
        with contextlib.suppress(Exception):
            lab.stop()


class MailLab:
    """Real Dovecot 2.3 + Postfix 3.7 on 127.0.0.1 high ports, under `workdir`.

    >>> with MailLab(tmp_path) as lab:
    ...     imaplib.IMAP4_SSL(lab.host, lab.ports.imaps, ssl_context=lab.ssl_context())
    """

    host = HOST
    domain = DOMAIN
    app_password_reason = APP_PASSWORD_REASON

    def __init__(self, workdir: Path | str, *, startup_timeout: float = 30.0):
        self.workdir = Path(os.path.abspath(workdir))
        bad = set(str(self.workdir)) - SAFE_PATH_CHARS
        if bad:
            raise LabError(f"workdir {str(self.workdir)!r} contains unsupported characters "
                           f"{''.join(sorted(bad))!r} (it is written unquoted into server configs)")
        self.startup_timeout = startup_timeout
        self.id = secrets.token_hex(4)
        self.ports: Ports | None = None
        self.tls: _tls.TlsFiles | None = None
        self.users: dict[str, LabUser] = {}
        self._deny: set[str] = {"appuser"}
        self._allow_nets: dict[str, str] = {"netuser": NETUSER_ALLOW_NETS}
        # sender: its submitted mail is also filed in its Sent folder (see postfix.py)
        for local in ("alice", "bob", "bcc", "appuser", "netuser", "sender"):
            self.users[local] = self._new_user(local, secrets.token_urlsafe(12))
        self.logs_dir = self.workdir / "logs"
        self.users_dir = self.workdir / "users"
        self.mail_dir = self.workdir / "mail"
        self.run_dir: Path | None = None
        self._tmp_run_dir: Path | None = None
        self._lock_fd: int | None = None
        self._dovecots: dict[str, DovecotInstance] = {}
        self._postfix: PostfixInstance | None = None
        self.oauth = OAuthServer(lab_id=self.id, workdir=self.workdir, log_dir=self.logs_dir,
                                 accounts=self._accounts(),
                                 daemon_mailbox=self.users[DAEMON_APP_USER].address)
        # SPF/DKIM/DMARC verifiers and their DNS: started on first use (deliverability.py)
        self.deliverability = Deliverability(self)
        self._running = False
        self.timings: dict[str, float] = {}
        mail = None
        for name in ("mail", "nobody"):
            with contextlib.suppress(KeyError):
                mail = pwd.getpwnam(name)
                break
        if mail is None:
            raise LabError("no `mail` or `nobody` user to own the mailboxes")
        self.mail_uid, self.mail_gid = mail.pw_uid, mail.pw_gid

    # ---------------------------------------------------------------- basics
    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<MailLab {self.id} {state} {self.workdir}>"

    def __enter__(self) -> MailLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._running

    @property
    def ca_file(self) -> Path:
        if self.tls is None:
            raise LabError("TLS material exists only after start()")
        return self.tls.ca

    @property
    def auth_socket(self) -> Path:
        """Dovecot SASL socket used by Postfix."""
        if "main" not in self._dovecots:
            raise LabError("the lab has not been started")
        return self._dovecots["main"].auth_socket_path

    def ssl_context(self) -> ssl.SSLContext:
        """ssl.SSLContext trusting only the lab CA (hostname checking on)."""
        import ssl
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _accounts(self) -> dict[str, str]:
        """Accounts of the OAuth server's login page: every lab user, same password."""
        return {u.address: u.password for u in self.users.values()}

    def _new_user(self, local: str, password: str, domain: str = DOMAIN) -> LabUser:
        if not _LOCAL_RE.match(local):
            raise LabError(f"invalid local part {local!r} (use [a-z0-9._-])")
        if not _DOMAIN_RE.match(domain):
            raise LabError(f"invalid domain {domain!r}")
        if not password or any(c in password for c in "\n\r\0"):
            raise LabError("password must be non-empty and single-line")
        return LabUser(local=local, address=f"{local}@{domain}", password=password)

    # ---------------------------------------------------------------- start
    def start(self) -> MailLab:
        """Generate TLS, write configs, start every server and wait until all
        ports accept.  Calling it on a running lab does nothing."""
        if self._running:
            return self
        t0 = time.monotonic()
        _preflight()
        try:
            self._prepare_workdir()
            if self.tls is None or not self.tls.exists():
                t = time.monotonic()
                self.tls = _tls.generate(self.workdir / "tls", self.id)
                self.timings["tls"] = time.monotonic() - t
            for attempt in range(3):
                ports = self._choose_ports(fresh=attempt > 0)
                try:
                    self._start_servers(ports)
                    break
                except LabError as e:
                    # another process grabbed one of our ports between
                    # allocation and bind: try again with new ports
                    if attempt < 2 and "in use" in str(e) and not self._stop_quietly():
                        continue
                    raise
        except BaseException as e:
            problem = self._stop_quietly()
            self._release_workdir()
            if problem and isinstance(e, LabError):
                raise LabError(f"{e}\n(and while cleaning up: {problem})") from None
            raise
        self._running = True
        _RUNNING.add(self)
        self.timings["start"] = time.monotonic() - t0
        return self

    def _prepare_workdir(self) -> None:
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        # one running lab per workdir (across processes too)
        fd = os.open(w / "lab.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LabError(f"another MailLab is running in {w}") from None
        self._lock_fd = fd
        previous = os.pread(fd, 4096, 0).decode(errors="replace")
        self._kill_leftovers_of(previous)
        # the servers open files below workdir after dropping root
        make_traversable(w)
        for d in (self.logs_dir, self.users_dir, w / "dovecot", w / "postfix", w / "oidc"):
            d.mkdir(exist_ok=True)
            d.chmod(0o755)
        self.mail_dir.mkdir(exist_ok=True)
        os.chown(self.mail_dir, self.mail_uid, self.mail_gid)
        self.mail_dir.chmod(0o750)
        # unix sockets live in the run dir: short path (sun_path limit)
        run = w / "run"
        if run.is_symlink():
            old = Path(os.readlink(run))
            run.unlink()
            if old.name.startswith("maillab-") and old.parent == Path("/tmp"):
                shutil.rmtree(old, ignore_errors=True)
        if len(str(run)) <= _MAX_RUN_DIR_LEN:
            run.mkdir(exist_ok=True)
            self.run_dir = run
        else:
            self._tmp_run_dir = Path(tempfile.mkdtemp(prefix="maillab-", dir="/tmp"))
            run.symlink_to(self._tmp_run_dir)
            self.run_dir = self._tmp_run_dir
        self.run_dir.chmod(0o755)
        make_traversable(self.run_dir)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"lab_id": self.id, "pid": os.getpid()}).encode(), 0)

    def _kill_leftovers_of(self, lock_text: str) -> None:
        """A previous lab in this workdir that died without stop() (its
        servers run in sessions of their own and outlive it): kill them."""
        old_id = None
        try:
            old_id = json.loads(lock_text)["lab_id"]
            if not re.fullmatch(r"[0-9a-f]{8}", old_id):
                old_id = None
        except (ValueError, KeyError, TypeError):
            pass
        pids = set(_lab_pids(old_id, self.workdir))
        pf_pid = self.workdir / "postfix" / "queue" / "pid" / "master.pid"
        try:
            pid = int(pf_pid.read_text().split()[0])
            if os.readlink(f"/proc/{pid}/exe").endswith("/postfix/sbin/master"):
                pids.add(pid)
        except (OSError, ValueError, IndexError):
            pass
        if pids:
            terminate_tree(pids, timeout=5.0)
        if old_id:
            _iptables_cleanup(old_id)

    def _choose_ports(self, fresh: bool) -> Ports:
        names = [f.name for f in fields(Ports)]
        # a restarted lab keeps its ports when they are still free, so a
        # daemon under test can reconnect to the same addresses
        if (self.ports is not None and not fresh
                and all(port_is_free(p) for p in self.ports.as_dict().values())):
            return self.ports
        self.ports = Ports(**dict(zip(names, allocate_ports(len(names)), strict=True)))
        return self.ports

    def _dovecot_specs(self, p: Ports) -> list[DovecotSpec]:
        t = self.tls
        assert t is not None
        return [
            DovecotSpec("main", t.good_cert, t.good_key, imaps_port=p.imaps, imap_port=p.imap,
                        lmtp_port=p.lmtp, auth_socket=True),
            DovecotSpec("limited", t.good_cert, t.good_key, imaps_port=p.imaps_limited,
                        max_userip_connections=1),
            DovecotSpec("selfsigned", t.selfsigned_cert, t.selfsigned_key,
                        imaps_port=p.imaps_selfsigned, imap_port=p.imap_selfsigned),
            DovecotSpec("expired", t.expired_cert, t.expired_key,
                        imaps_port=p.imaps_expired, imap_port=p.imap_expired),
            DovecotSpec("wronghost", t.wronghost_cert, t.wronghost_key,
                        imaps_port=p.imaps_wronghost, imap_port=p.imap_wronghost),
            DovecotSpec("oauth", t.good_cert, t.good_key, imaps_port=p.imaps_oauth,
                        imap_port=p.imap_oauth, auth_socket=True,
                        oauth2_conf=self.oauth.dovecot_conf()),
        ]

    def _smtp_listeners(self, p: Ports) -> list[SmtpListener]:
        t = self.tls
        assert t is not None
        out = [SmtpListener("submission", p.submission, wrapper=False),
               SmtpListener("smtps", p.smtps, wrapper=True),
               SmtpListener("submission_client_rejected", p.submission_client_rejected,
                            wrapper=False, client_rejected=True)]
        oauth_sasl = self._dovecots["oauth"].auth_socket_path
        out += [SmtpListener("submission_oauth", p.submission_oauth, False, sasl_path=oauth_sasl),
                SmtpListener("smtps_oauth", p.smtps_oauth, True, sasl_path=oauth_sasl)]
        for kind in ("selfsigned", "expired", "wronghost"):
            cert, key = t.pair(kind)
            out.append(SmtpListener(f"smtps_{kind}", getattr(p, f"smtps_{kind}"), True, cert, key))
            out.append(SmtpListener(f"submission_{kind}", getattr(p, f"submission_{kind}"),
                                    False, cert, key))
        return out

    def _start_servers(self, p: Ports) -> None:
        assert self.run_dir is not None and self.tls is not None
        self._write_user_db()
        # before the Dovecot configs: the oauth instance's passdb needs the server's URL
        self.oauth.write_config(p.oidc)
        self._dovecots = {}
        for spec in self._dovecot_specs(p):
            inst = DovecotInstance(spec, lab_id=self.id, workdir=self.workdir,
                                   run_dir=self.run_dir, users_dir=self.users_dir,
                                   mail_dir=self.mail_dir, log_dir=self.logs_dir,
                                   mail_uid=self.mail_uid, mail_gid=self.mail_gid)
            inst.write_config()
            self._dovecots[spec.name] = inst
        self._postfix = PostfixInstance(
            lab_id=self.id, workdir=self.workdir, log_dir=self.logs_dir, domain=DOMAIN,
            hostname=HOSTNAME, good_cert=self.tls.good_cert, good_key=self.tls.good_key,
            lmtp_port=p.lmtp, sasl_socket=self._dovecots["main"].auth_socket_path,
            listeners=self._smtp_listeners(p), mx=self.deliverability.mx_spec(p.mx))
        self._postfix.write_config([u.address for u in self.users.values()])

        # Dovecot masters and node start in the background while Postfix starts.
        self.oauth.launch()
        for inst in self._dovecots.values():
            # we hold the workdir lock and killed any leftovers: a master.pid
            # here is stale (its pid may even be reused by now)
            inst.cleanup_pidfile()
            inst.start()
        self._postfix.start()

        deadline = time.monotonic() + self.startup_timeout

        def died() -> str | None:
            for inst in self._dovecots.values():
                why = inst.died()
                if why:
                    return why
            why = self.oauth.died()
            if why:
                return why
            return self._postfix.died() if self._postfix else None

        pending = dict(p.as_dict())

        def all_ports() -> bool:
            for name, port in list(pending.items()):
                if port_accepts(port, timeout=0.2):
                    del pending[name]
            return not pending

        stage = ["ports accepting connections"]
        try:
            ok = wait_until(all_ports, deadline, abort=died)
            if ok:
                # greetings: Dovecot sends "* OK" only once its auth process
                # is up; Postfix's "220" means smtpd runs with the config
                stage[0] = "IMAP greeting and SASL socket"
                ok = wait_until(lambda: read_banner(p.imap).startswith(b"* OK")
                                and self.auth_socket.exists(), deadline, 0.02, abort=died)
            if ok:
                stage[0] = "OAuth server discovery document"
                ok = wait_until(self.oauth.ready, deadline, 0.02, abort=died)
            if ok:
                stage[0] = "SMTP greeting"
                ok = wait_until(lambda: read_banner(p.submission).startswith(b"220"),
                                deadline, 0.02, abort=died)
            if ok:
                # every implicit-TLS port completes a handshake with the
                # certificate it is meant to serve (catches unusable keys)
                self._check_tls(p)
                why = died()
                if why:
                    raise LabError(why)
        except LabError as e:
            raise LabError(f"mail lab failed to start: {e}") from None
        if not ok:
            raise LabError(f"mail lab not ready after {self.startup_timeout}s "
                           f"(waiting for: {stage[0]}; ports not accepting: {pending or 'none'})\n"
                           + self._all_log_excerpts())

    def _check_tls(self, p: Ports) -> None:
        import ssl
        expected = {
            "imaps": "good", "imaps_limited": "good", "smtps": "good",
            "imaps_selfsigned": "selfsigned", "smtps_selfsigned": "selfsigned",
            "imaps_expired": "expired", "smtps_expired": "expired",
            "imaps_wronghost": "wronghost", "smtps_wronghost": "wronghost",
            "imaps_oauth": "good", "smtps_oauth": "good",
        }
        assert self.tls is not None
        pems = {k: ssl.PEM_cert_to_DER_cert(self.tls.pair(k)[0].read_text())
                for k in set(expected.values())}
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        for name, kind in expected.items():
            port = getattr(p, name)
            try:
                with socket.create_connection((HOST, port), timeout=5) as raw, \
                        ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    der = tls.getpeercert(binary_form=True)
            except OSError as e:
                if name.startswith("smtps"):
                    log = self._postfix.log_excerpt() if self._postfix else ""
                else:
                    inst = name.split("_", 1)[1] if "_" in name else "main"
                    log = self._dovecots[inst].log_excerpt()
                raise LabError(f"TLS handshake on {name} (port {port}) failed: {e}\n{log}") from None
            if der != pems[kind]:
                raise LabError(f"{name} (port {port}) does not serve the {kind} certificate")

    def _all_log_excerpts(self) -> str:
        parts = [inst.log_excerpt(15) for inst in self._dovecots.values()]
        parts.append(self.oauth.log_excerpt(15))
        if self._postfix:
            parts.append(self._postfix.log_excerpt(30))
        return "\n".join(parts)

    # ---------------------------------------------------------------- stop
    def stop(self) -> None:
        """Stop every server of this lab and wait until they are gone.
        Safe to call twice, or on a lab that never started."""
        if (not self._running and self._postfix is None and not self._dovecots
                and self.oauth.proc is None and not self.deliverability.popens()):
            return
        t0 = time.monotonic()
        try:
            self._stop_servers()
        finally:
            self._release_workdir()
            self._running = False
            self._postfix = None
            self._dovecots = {}
            _RUNNING.discard(self)
            self.timings["stop"] = time.monotonic() - t0

    def _stop_quietly(self) -> str | None:
        try:
            self._stop_servers()
        except LabError as e:
            return str(e)
        return None

    def _stop_servers(self) -> None:
        errors = []
        # every master (Postfix + the Dovecot instances) and all their
        # children are signalled together: one wait for everything
        procs = [i.proc for i in self._dovecots.values() if i.proc is not None]
        if self.oauth.proc is not None:
            procs.append(self.oauth.proc)
        procs += self.deliverability.popens()
        roots = [p.pid for p in procs]
        if self._postfix is not None:
            pid = self._postfix.master_pid or self._postfix.read_master_pid()
            if pid:
                roots.append(pid)
            self._postfix.master_pid = None
        left = terminate_tree(roots, popens=procs, timeout=5.0)
        if left:
            errors.append(f"processes survived SIGKILL: {left}")
        for inst in self._dovecots.values():
            inst.proc = None
            inst.cleanup_pidfile()
        self.oauth.proc = None
        self.deliverability.forget()
        # stragglers forked after we listed the trees, or orphans; match by
        # workdir only while we hold its lock (it may be another lab's)
        left = _lab_pids(self.id, self.workdir if self._lock_fd is not None else None)
        if left:
            left = terminate_tree(left, timeout=3.0)
        _iptables_cleanup(self.id)
        if left:
            errors.append(f"processes survived SIGKILL: {left}")
        if errors:
            raise LabError("mail lab stop: " + "; ".join(errors))

    def _release_workdir(self) -> None:
        if self._tmp_run_dir is not None:
            with contextlib.suppress(OSError):
                (self.workdir / "run").unlink()
            shutil.rmtree(self._tmp_run_dir, ignore_errors=True)
            self._tmp_run_dir = None
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
                os.close(self._lock_fd)
            self._lock_fd = None

    # ---------------------------------------------------------------- users
    def _write_user_db(self) -> None:
        """users/auth.dict (file: dict read by all Dovecot instances) plus the
        two dict-auth config files; atomic rewrite, see dovecot.py."""
        d = self.users_dir
        d.mkdir(parents=True, exist_ok=True)
        lines = []
        for u in self.users.values():
            pdb = {"password": "{PLAIN}" + u.password, "user": u.address}
            if u.local in self._allow_nets:
                pdb["allow_nets"] = self._allow_nets[u.local]
            lines += [f"shared/passdb/{u.local}", json.dumps(pdb)]
            lines += [f"shared/userdb/{u.local}",
                      json.dumps({"home": str(self.mail_dir / u.local)})]
            if u.local in self._deny:
                # JSON values may contain spaces (passwd-file extra fields can't)
                lines += [f"shared/deny/{u.local}", json.dumps({"reason": APP_PASSWORD_REASON})]
        # auth-worker processes (root) read it; keep passwords from others
        write_file(d / "auth.dict", "\n".join(lines) + "\n", 0o640)
        common = (f"uri = file:{d}/auth.dict\n"
                  "default_pass_scheme = PLAIN\n"
                  "iterate_disable = yes\n")
        users_conf = (common +
                      "key passdb {\n  key = passdb/%Ln\n  format = json\n}\n"
                      "key userdb {\n  key = userdb/%Ln\n  format = json\n}\n"
                      "passdb_objects = passdb\nuserdb_objects = userdb\n")
        deny_conf = (common +
                     "key deny {\n  key = deny/%Ln\n  format = json\n}\n"
                     "passdb_objects = deny\n")
        if not (d / "dict-users.conf").exists() or (d / "dict-users.conf").read_text() != users_conf:
            write_file(d / "dict-users.conf", users_conf, 0o644)
        if not (d / "dict-deny.conf").exists() or (d / "dict-deny.conf").read_text() != deny_conf:
            write_file(d / "dict-deny.conf", deny_conf, 0o644)

    def add_user(self, local: str, password: str, *, domain: str | None = None) -> LabUser:
        """A new mailbox user, usable at once for IMAP login, SMTP AUTH and
        as a recipient (no restart).  `domain`: its address's domain (default
        example.test); Dovecot knows users by local part, so locals stay unique."""
        if local in self.users:
            raise LabError(f"user {local!r} exists already (use set_password)")
        user = self._new_user(local, password, domain or DOMAIN)
        self.users[local] = user
        self.oauth.set_accounts(self._accounts())
        if self._running:
            self._write_user_db()
            assert self._postfix is not None
            self._postfix.write_mailboxes([u.address for u in self.users.values()])
        return user

    def set_password(self, local: str, new_password: str) -> LabUser:
        """Change a password; the next login (IMAP or SMTP AUTH) uses it."""
        if local not in self.users:
            raise LabError(f"no such user {local!r}")
        user = self._new_user(local, new_password, self.users[local].address.split("@", 1)[1])
        self.users[local] = user
        self.oauth.set_accounts(self._accounts())
        if self._running:
            self._write_user_db()
        return user

    # ---------------------------------------------------------------- mail
    def messages(self, local: str) -> list[LabMessage]:
        """Messages in the user's Maildir (new + cur, every folder), oldest
        first.  Each has .maillab_path and .maillab_folder ("INBOX", "Sent"...)."""
        root = self.mail_dir / local
        for _attempt in range(10):
            result, vanished = self._scan_maildir(root)
            if not vanished:
                return result
            time.sleep(0.01)   # Dovecot moved a file new/ -> cur/ meanwhile
        return result

    @staticmethod
    def _scan_maildir(root: Path) -> tuple[list[LabMessage], bool]:
        if not root.is_dir():
            return [], False
        folders = [("INBOX", root)]
        for d in sorted(root.iterdir()):
            if d.name.startswith(".") and d.is_dir() and (d / "cur").is_dir():
                folders.append((d.name[1:].replace(".", "/"), d))
        found = []
        vanished = False
        parser = email.parser.BytesParser(LabMessage, policy=email.policy.default)
        for folder, d in folders:
            for sub in ("new", "cur"):
                try:
                    names = os.listdir(d / sub)
                except FileNotFoundError:
                    continue
                for name in names:
                    path = d / sub / name
                    try:
                        data = path.read_bytes()
                    except FileNotFoundError:
                        vanished = True
                        continue
                    msg = parser.parsebytes(data)
                    assert isinstance(msg, LabMessage)  # the parser's message class
                    msg.maillab_path = path
                    msg.maillab_folder = folder
                    head = name.split(".", 1)[0]
                    found.append(((int(head) if head.isdigit() else 0, name), msg))
        found.sort(key=lambda x: x[0])
        return [m for _, m in found], vanished

    def wait_for_message(self, local: str, predicate: Callable[[EmailMessage], bool] | None = None,
                         timeout: float = 10.0) -> EmailMessage:
        """Poll the Maildir until a message satisfies `predicate` (any message
        if None); LabError on timeout, with the Postfix log tail."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            msgs = self.messages(local)
            seen = len(msgs)
            for m in msgs:
                if predicate is None or predicate(m):
                    return m
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        raise LabError(f"no matching message for {local!r} within {timeout}s "
                       f"({seen} message(s) in the mailbox)\n"
                       + (self._postfix.log_excerpt(20) if self._postfix else ""))

    # ---------------------------------------------------------------- logs
    def log_files(self) -> dict[str, Path]:
        names = {"dovecot": self.logs_dir / "dovecot.log",
                 "postfix": self.logs_dir / "postfix.log"}
        for n in ("limited", "selfsigned", "expired", "wronghost", "oauth"):
            names[f"dovecot-{n}"] = self.logs_dir / f"dovecot-{n}.log"
        names["oidc"] = self.oauth.log_path
        names["verifiers"] = self.deliverability.log_path
        names["nsd"] = self.deliverability.nsd_log_path
        return names

    def log_tail(self, which: str = "dovecot", lines: int = 50) -> str:
        """Tail of a server log: "dovecot", "dovecot-limited", "dovecot-selfsigned",
        "dovecot-expired", "dovecot-wronghost", "dovecot-oauth", "postfix", "oidc",
        "verifiers" (OpenDKIM, OpenDMARC, policyd-spf), "nsd"."""
        files = self.log_files()
        if which == "dovecot-main":
            which = "dovecot"
        if which not in files:
            raise LabError(f"unknown log {which!r}; choose from {sorted(files)}")
        return tail_file(files[which], lines)

    @contextlib.contextmanager
    def held_delivery(self) -> Iterator[None]:
        """Postfix accepts mail but keeps it queued (defer_transports) until the block ends."""
        assert self._postfix is not None
        self._postfix.hold_delivery(True)
        try:
            yield
        finally:
            self._postfix.hold_delivery(False)

    # ---------------------------------------------------------------- firewall
    @contextlib.contextmanager
    def blackhole(self, port: int | None = None) -> Iterator[int]:
        """A 127.0.0.1 port where TCP connects time out: an iptables DROP rule
        on INPUT for that loopback port, removed on exit (always).  Without
        `port`, a free port is picked; with one (e.g. lab.ports.imaps), a live
        server disappears behind the "firewall" for the duration."""
        if port is None:
            port = allocate_ports(1)[0]
        rule = _drop_rule(port, self.id)
        _iptables("-I", *rule)
        try:
            yield port
        finally:
            _iptables("-D", *rule)


def _lab_pids(lab_id: str | None, workdir: Path | None) -> list[int]:
    """Live processes of a lab.  Postfix processes and the OAuth server (node)
    carry MAILLAB_LAB=<id> in their environment; Dovecot blanks its environment
    area (process titles), so its processes are found by command line instead:
    masters by `-c <workdir>/dovecot/`, children by their instance name
    `dovecot-maillab-<id>-<instance>/...`.  node also by its config path."""
    needles = ([f" -c {workdir}/dovecot/", f" {workdir}/oidc/config.json"]
               if workdir is not None else [])
    if lab_id:
        needles.append(f"maillab-{lab_id}-")
    pids = set(pids_with_cmdline(*needles)) if needles else set()
    if lab_id:
        pids.update(pids_with_env(ENV_MARKER, lab_id))
    return sorted(p for p in pids if is_alive(p))


# ---------------------------------------------------------------- checks
_REQUIRED = {
    "/usr/sbin/dovecot": "dovecot-core",
    "/usr/lib/dovecot/imap": "dovecot-imapd",
    "/usr/lib/dovecot/lmtp": "dovecot-lmtpd",
    "/usr/sbin/postfix": "postfix",
    "/usr/sbin/postmap": "postfix",
}


def _preflight() -> None:
    if os.geteuid() != 0:
        raise LabError("the mail lab must run as root (it starts Dovecot/Postfix masters "
                       "and manages iptables rules)")
    missing = sorted({pkg for path, pkg in _REQUIRED.items() if not os.path.exists(path)})
    if shutil.which("openssl") is None:
        missing.append("openssl")
    if missing:
        raise LabError("missing packages: " + " ".join(missing) +
                       " (scripts/setup installs them)")
    _check_oauth_installed()


# ---------------------------------------------------------------- iptables
def _drop_rule(port: int, lab_id: str) -> list[str]:
    return ["INPUT", "-i", "lo", "-p", "tcp", "-d", "127.0.0.1", "--dport", str(port),
            "-m", "comment", "--comment", f"maillab-{lab_id}", "-j", "DROP"]


def _iptables(*args: str, check: bool = True) -> str:
    try:
        r = subprocess.run(["iptables", "-w", "10", *args], capture_output=True, text=True,
                           timeout=30)
    except FileNotFoundError:
        raise LabError("iptables is not installed") from None
    if check and r.returncode != 0:
        raise LabError(f"iptables {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def _iptables_cleanup(lab_id: str) -> None:
    """Remove any DROP rule a lab left (a blackhole() never exited)."""
    tag = f"maillab-{lab_id}"
    try:
        rules = _iptables("-S", "INPUT", check=False)
    except LabError:
        return
    for line in rules.splitlines():
        if tag in line and line.startswith("-A INPUT "):
            args = line.split()[1:]
            args = [a.strip('"') for a in args]
            _iptables("-D", *args, check=False)
