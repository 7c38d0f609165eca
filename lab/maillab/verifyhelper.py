"""The verifiers' helper process (stdlib only, run as a script by the lab; see deliverability.py).

It runs as root inside the verifiers' private mount namespace, where /etc/resolv.conf names the
lab's nsd and /dev/log is a symlink to `--syslog`.  It does two jobs:

* **syslog receiver.**  OpenDKIM, OpenDMARC and policyd-spf log only through syslog(3), to
  /dev/log.  Every datagram that arrives at `--syslog` is appended to `--log` (priority prefix
  dropped; glibc's own timestamp and `ident[pid]:` kept).
* **policy spawner.**  What Postfix's `spawn` service would do for policyd-spf, but inside the
  namespace (a spawn command runs as an unprivileged user and cannot enter a namespace): every
  connection to the stream socket `--policy` gets one `policyd-spf` process, run as
  `--policy-user`, with the connection as its stdin and stdout.  Postfix keeps the connection for
  further requests; policyd-spf exits at EOF.

Both sockets are bound under a temporary name and renamed into place once they listen, so the
lab takes "the path exists" as "ready".  SIGTERM ends the helper and its policyd-spf children.

    verifyhelper.py --syslog S --log F --policy P --policy-user U -- /usr/bin/policyd-spf CONF
"""
from __future__ import annotations

import argparse
import os
import pwd
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

_PRI = re.compile(rb"^<\d{1,3}>")


def _bind(path: Path, kind: int) -> socket.socket:
    """A unix socket at `path`, listening when it appears there (bound under a temp name)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    for p in (tmp, path):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    s = socket.socket(socket.AF_UNIX, kind)
    s.bind(str(tmp))
    os.chmod(tmp, 0o666)   # Postfix (user postfix) and the milters (their own users) connect
    if kind == socket.SOCK_STREAM:
        s.listen(64)
    os.replace(tmp, path)
    return s


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--syslog", type=Path, required=True)
    ap.add_argument("--log", type=Path, required=True)
    ap.add_argument("--policy", type=Path, required=True)
    ap.add_argument("--policy-user", required=True)
    ap.add_argument("command", nargs="+")
    args = ap.parse_args(argv)
    user = pwd.getpwnam(args.policy_user)

    def on_term(_sig: int, _frame: object) -> None:
        raise SystemExit(0)   # out of select() at once, through the finally below

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    log = open(args.log, "ab", buffering=0)  # noqa: SIM115 - open for the process's lifetime
    syslog_sock = _bind(args.syslog, socket.SOCK_DGRAM)
    policy_sock = _bind(args.policy, socket.SOCK_STREAM)
    sel = selectors.DefaultSelector()
    sel.register(syslog_sock, selectors.EVENT_READ, "syslog")
    sel.register(policy_sock, selectors.EVENT_READ, "policy")
    children: list[subprocess.Popen] = []
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    for name in ("TZ", "MAILLAB_LAB"):
        if name in os.environ:
            env[name] = os.environ[name]
    try:
        while True:
            for key, _ in sel.select(timeout=1.0):
                if key.data == "syslog":
                    data = syslog_sock.recv(65536)
                    log.write(_PRI.sub(b"", data).rstrip(b"\0\n") + b"\n")
                else:
                    conn, _ = policy_sock.accept()
                    try:
                        children.append(subprocess.Popen(
                            args.command, stdin=conn.fileno(), stdout=conn.fileno(), stderr=log,
                            env=env, user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                            close_fds=True, cwd="/"))
                    except OSError as e:
                        log.write(f"verifyhelper: cannot start {args.command[0]}: {e}\n".encode())
                    finally:
                        conn.close()
            children = [c for c in children if c.poll() is None]
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for p in (args.syslog, args.policy):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        for c in children:
            if c.poll() is None:
                c.terminate()
        deadline = time.monotonic() + 2.0
        for c in children:
            try:
                c.wait(timeout=max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
