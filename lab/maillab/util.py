"""Small process / port / file helpers shared by the lab modules (stdlib only)."""
from __future__ import annotations

import os
import select
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import LabError

# Every process of a lab carries MAILLAB_LAB=<lab id> in its environment:
# Dovecot passes it on through `import_environment`, Postfix through its own
# `import_environment`.  stop() uses it to find stragglers (children that were
# forked after we listed the master's descendants, or processes left behind
# by a crashed earlier run in the same workdir).
ENV_MARKER = "MAILLAB_LAB"

# Only these characters are accepted in the work directory path: the path is
# written unquoted into Dovecot config (where % and $ are expanded, and spaces
# split values), into Postfix main.cf/master.cf (`-o` values can't contain
# spaces) and into openssl config files.
SAFE_PATH_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./+-")


# --------------------------------------------------------------------- files
def tail_file(path: Path, lines: int = 50) -> str:
    """Last `lines` lines of a text file ('' if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max(4096, lines * 400)))
            data = f.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", "replace").replace("\r\n", "\n")
    return "\n".join(text.splitlines()[-lines:])


def tail_since(path: Path, offset: int, lines: int = 30) -> str:
    """Last `lines` lines written to `path` after byte `offset` (what this
    run logged), or the plain tail if nothing was written since."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size <= offset:
                return tail_file(path, lines)
            f.seek(max(offset, size - (1 << 20)))
            data = f.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def log_excerpt(path: Path, offset: int, lines: int = 30) -> str:
    """What a server logged since byte `offset`, headed by the file name (for LabError texts)."""
    t = tail_since(path, offset, lines)
    return f"--- {path} (tail) ---\n{t}" if t.strip() else f"(no output in {path})"


def new_lines_matching(path: Path, offset: int, needles: tuple[str, ...]) -> str | None:
    """First line written to `path` after byte `offset` containing one of
    `needles` (None if there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(1 << 20)
    except FileNotFoundError:
        return None
    for line in data.decode("utf-8", "replace").splitlines():
        if any(n in line for n in needles):
            return line.strip()
    return None


def write_file(path: Path, text: str, mode: int = 0o644, *, backdate: float = 0.0,
               owner: tuple[int, int] | None = None) -> None:
    """Write atomically (temp file + rename, so readers never see half a file
    and inode-watching readers notice the change), optionally backdating the
    mtime (Postfix waits for freshly modified config files to 'settle')."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, mode)
    if owner is not None:
        os.chown(tmp, *owner)
    if backdate:
        t = time.time() - backdate
        os.utime(tmp, (t, t))
    os.replace(tmp, path)


def make_traversable(path: Path) -> list[Path]:
    """Give `path` and every ancestor the o+x bit if it lacks it.

    The unprivileged server processes (Dovecot mail processes running as the
    mail uid, Postfix smtpd as `postfix`) open files below the work directory
    by absolute path after dropping root, so every ancestor must be
    searchable.  pytest's tmp dirs are 0700.  Only the search bit is added
    (not read): directory listings stay private.  Returns what was changed.
    """
    changed = []
    for p in [path, *path.parents]:
        st = p.stat()
        if not st.st_mode & stat.S_IXOTH:
            os.chmod(p, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
            changed.append(p)
    return changed


# --------------------------------------------------------------------- ports
_port_lock = threading.Lock()
_ports_handed_out: set[int] = set()   # never hand out a port twice per process


def allocate_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (bind port 0, close, reuse
    the number).  All sockets are held until every port is chosen so they are
    distinct; a process-wide set keeps two labs in one process apart."""
    socks = []
    ports: list[int] = []
    try:
        with _port_lock:
            while len(ports) < count:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind(("127.0.0.1", 0))
                socks.append(s)
                port = s.getsockname()[1]
                if port in _ports_handed_out:
                    continue
                _ports_handed_out.add(port)
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def port_is_free(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def read_banner(port: int, timeout: float = 1.0) -> bytes:
    """Connect and read the first line the server sends ('' on failure)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(512)
                if not chunk:
                    break
                data += chunk
            return data
    except OSError:
        return b""


def port_accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=timeout).close()
        return True
    except OSError:
        return False


def wait_until(check: Callable[[], bool], deadline: float, interval: float = 0.01,
               abort: Callable[[], str | None] | None = None) -> bool:
    """Poll `check` until it is true or `deadline` (time.monotonic) passes.
    `abort` may return an error text to stop early (e.g. a server died)."""
    while True:
        if check():
            return True
        if abort is not None:
            why = abort()
            if why:
                raise LabError(why)
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# ----------------------------------------------------------------- processes
def run_tty(cmd: list[str], *, env: dict | None = None, timeout: float = 60.0,
            cwd: str | None = None) -> tuple[int, str]:
    """Run a command with stdout/stderr on a pseudo-terminal and return
    (exit code, output).

    Why a pty: the `postfix` command prints its errors to stderr only when
    stderr is a terminal; otherwise it logs them (to maillog_file, through
    the postlog socket, which does not exist yet before the first start),
    and a failing `postfix start` would exit 1 silently.
    The output is read until the command exits, not until EOF: a daemon the
    command started may keep the pty open.
    """
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                                env=env, cwd=cwd, close_fds=True, start_new_session=True)
    finally:
        os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            readable = select.select([master], [], [], 0.02)[0]
            if readable:
                try:
                    chunk = os.read(master, 65536)
                except OSError:          # EIO: every writer closed the pty
                    chunk = b""
                if chunk:
                    out += chunk
                    continue
                # EOF: nobody holds the pty any more; the command is ending
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is not None:
                # drain what is already buffered, without waiting for EOF
                while select.select([master], [], [], 0)[0]:
                    try:
                        chunk = os.read(master, 65536)
                    except OSError:
                        break
                    if not chunk:
                        break
                    out += chunk
                break
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise LabError(f"command timed out after {timeout}s: {' '.join(cmd)}\n"
                               + out.decode("utf-8", "replace"))
    finally:
        os.close(master)
    return proc.returncode, out.decode("utf-8", "replace").replace("\r\n", "\n")


def _proc_table() -> dict[int, int]:
    """pid -> ppid for every process."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # the comm field may contain spaces/parens: ppid follows the last ')'
        rest = data[data.rindex(b")") + 2:].split()
        table[int(entry.name)] = int(rest[1])
    return table


def descendants(pid: int) -> list[int]:
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for p, pp in table.items():
        children.setdefault(pp, []).append(p)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _pids_where(proc_file: str, matches: Callable[[bytes], bool]) -> list[int]:
    """Processes (other than this one) whose /proc/PID/<proc_file> satisfies `matches`."""
    found = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/{proc_file}", "rb") as f:
                data = f.read()
        except OSError:
            continue
        if matches(data):
            found.append(int(entry.name))
    return found


def pids_with_env(key: str, value: str) -> list[int]:
    """Processes whose environment contains KEY=VALUE exactly."""
    needle = f"{key}={value}".encode()
    return _pids_where("environ", lambda env: needle in env.split(b"\0"))


def pids_with_cmdline(*needles: str) -> list[int]:
    """Processes whose command line (args joined by spaces) contains one of
    `needles`.  Needed for Dovecot: its processes overwrite their environment
    area with the process title, so /proc/PID/environ shows no marker."""
    def matches(raw: bytes) -> bool:
        cmd = raw.replace(b"\0", b" ").decode("utf-8", "replace")
        return any(n in cmd for n in needles)

    return _pids_where("cmdline", matches)


def is_alive(pid: int) -> bool:
    """True while the pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2:][:1] != b"Z"


def signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


# ------------------------------------------------------ child subreaper
# Postfix's master, on SIGTERM, signals its process group and exits at once:
# its children are orphaned and, on this machine, sit as <defunct> zombies
# for ~2 s until PID 1 reaps them.  While we are a "child subreaper" such
# orphans are re-parented to us instead, and we reap them ourselves.  The
# flag is only set around `postfix start` (so the daemonised master becomes
# our child) and around stop().
_PR_SET_CHILD_SUBREAPER = 36
_subreaper_lock = threading.Lock()
_subreaper_depth = 0


def _set_subreaper(on: bool) -> None:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class subreaper:  # noqa: N801 - used like a function, `with subreaper():`, as contextlib's are
    """Context manager: be a child subreaper while inside (re-entrant)."""

    def __enter__(self) -> subreaper:
        global _subreaper_depth
        with _subreaper_lock:
            if _subreaper_depth == 0:
                _set_subreaper(True)
            _subreaper_depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        global _subreaper_depth
        with _subreaper_lock:
            _subreaper_depth -= 1
            if _subreaper_depth == 0:
                _set_subreaper(False)


# comm names of Dovecot / Postfix processes: a zombie re-parented to us with
# one of these names (and no Popen of our own) is a lab process; reap it.
_SERVER_COMMS = {
    b"dovecot", b"anvil", b"log", b"config", b"auth", b"stats", b"imap", b"imap-login",
    b"lmtp", b"dict", b"dict-async", b"indexer", b"indexer-worker", b"doveadm-server",
    b"master", b"smtpd", b"pickup", b"qmgr", b"tlsmgr", b"cleanup", b"trivial-rewrite",
    b"bounce", b"proxymap", b"postlogd", b"showq", b"error", b"discard", b"scache",
    b"verify", b"flush", b"virtual", b"local", b"smtp",
}


def _stat(pid: int) -> tuple[bytes, bytes, int] | None:
    """(comm, state, ppid) of a process, None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    comm = data[data.index(b"(") + 1:data.rindex(b")")]
    rest = data[data.rindex(b")") + 2:].split()
    return comm, rest[0], int(rest[1])


def _snapshot() -> dict[int, tuple[bytes, bytes, int]]:
    """pid -> (comm, state, ppid) for every process, from one /proc scan."""
    snap = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                snap[int(entry.name)] = st
    return snap


def terminate_tree(root_pids: Iterable[int], extra: Iterable[int] = (), *,
                   popens: Iterable[subprocess.Popen] = (), timeout: float = 5.0,
                   zombie_grace: float = 3.0, orphaned_root_grace: float = 0.05) -> list[int]:
    """Stop the given processes and all their descendants; return the pids
    still running afterwards (normally none).

    - SIGTERM roots and descendants together.  (Signalling the children too
      matters for Dovecot: a master that gets SIGTERM alone waits 1-6 s for
      its log process before exiting; with everything signalled it is gone
      in ~15 ms.)
    - Keep re-listing the descendants of live roots and SIGTERM newcomers:
      a master may fork (e.g. a Dovecot auth-worker on demand) while we
      signal, and it then waits for that child before exiting.
    - Once every descendant is gone, a root still alive after
      `orphaned_root_grace` gets SIGKILL: Dovecot's master sometimes sits in
      a 1 s sleep in services_monitor_stop() although all its children are
      dead; there is nothing left for it to clean up.
    - Reap zombies re-parented to us (we are a subreaper meanwhile);
      SIGKILL what is left after `timeout`; finally wait up to
      `zombie_grace` until every process is really gone (no <defunct>).
    """
    popens = list(popens)
    popen_pids = {p.pid for p in popens}
    me = os.getpid()
    with subreaper():
        snap = _snapshot()
        roots = {r for r in root_pids if r in snap and snap[r][1] != b"Z"}
        pids = set(extra) | roots
        signalled: set[int] = set()
        kids_gone_at: list[float] = []

        def live(snap: dict[int, tuple[bytes, bytes, int]], p: int) -> bool:
            return p in snap and snap[p][1] != b"Z"

        def step(snap: dict[int, tuple[bytes, bytes, int]]) -> list[int]:
            """Signal newcomers, reap our zombies; return live pids."""
            children: dict[int, list[int]] = {}
            for p, (_, _, pp) in snap.items():
                children.setdefault(pp, []).append(p)
            todo = [r for r in roots if live(snap, r)]
            while todo:
                for c in children.get(todo.pop(), []):
                    if c not in pids:
                        pids.add(c)
                    todo.append(c)
            new = [p for p in pids if p not in signalled and live(snap, p)]
            signal_all(new, signal.SIGTERM)
            signalled.update(new)
            for popen in popens:
                popen.poll()
            for p, (comm, state, pp) in snap.items():
                if (pp == me and state == b"Z" and p not in popen_pids
                        and (p in pids or comm in _SERVER_COMMS)):
                    try:
                        os.waitpid(p, os.WNOHANG)
                    except ChildProcessError:
                        pass
            return [p for p in pids if live(snap, p)]

        deadline = time.monotonic() + timeout
        killed_at: float | None = None
        while True:
            left = step(_snapshot())
            if not left:
                break
            now = time.monotonic()
            if all(p in roots for p in left):
                if not kids_gone_at:
                    kids_gone_at.append(now)
                elif now - kids_gone_at[0] > orphaned_root_grace:
                    signal_all(left, signal.SIGKILL)
            if killed_at is None and now >= deadline:
                signal_all(left, signal.SIGKILL)
                killed_at = now
            elif killed_at is not None and now - killed_at > 2.0:
                break          # unkillable (D state?): report them
            time.sleep(0.005)
        # exited is not gone: wait (bounded) until they are reaped
        grace = time.monotonic() + zombie_grace
        while True:
            snap = _snapshot()
            step(snap)
            if not any(p in snap for p in pids) or time.monotonic() >= grace:
                break
            time.sleep(0.005)
        alive = [p for p in pids if live(snap, p)]
    for p in popens:
        try:
            p.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
    return alive
