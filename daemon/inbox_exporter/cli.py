"""The `inbox-exporter` command line, with flags in the Prometheus style (--config.file)."""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from . import __version__, logs
from .check import Checker
from .config import Config, ConfigError, Inbox, load_config, parse_duration
from .confirm import DeliveryConfirmer
from .limits import ConnectionLimits
from .model import CheckResult, Status, Step, StepResult
from .oauth.tokens import TokenCache
from .output import render_json, render_text
from .probe_id import load_or_create

EXIT_OK, EXIT_FAILING, EXIT_CONFIG = 0, 1, 2
DEFAULT_LISTEN = ":9857"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inbox-exporter",
                                description="Verify connected inboxes over IMAP and SMTP.")
    p.add_argument("--version", action="version", version=f"inbox-exporter {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(cmd: argparse.ArgumentParser, log_level: str = "info") -> None:
        cmd.add_argument("--config.file", dest="config_file", default="config.yaml",
                         metavar="FILE", help="configuration file (default: %(default)s)")
        cmd.add_argument("--log.level", dest="log_level", default=log_level,
                         choices=["debug", "info", "warning", "error"])
        cmd.add_argument("--log.format", dest="log_format", default="logfmt",
                         choices=["logfmt", "json"])

    check = sub.add_parser("check", help="verify each inbox once and print the result")
    common(check, log_level="error")  # the table already shows every failure
    check.add_argument("--inbox", action="append", metavar="NAME",
                       help="only this inbox (repeatable)")
    check.add_argument("--output", choices=["text", "json"], default="text")
    check.add_argument("--transcript", action="store_true",
                       help="show what was said (redacted: no password, token or message body)")
    check.add_argument("--parallel", type=int, default=8, metavar="N",
                       help="inboxes checked at once (default: %(default)s)")
    check.add_argument("--no-test-email", dest="send_test_email", action="store_false",
                       help="verify SMTP connect and login only; send no test email (by "
                            "default `check` sends one, whatever test_email.interval says)")

    cc = sub.add_parser("check-config", help="validate the configuration and exit")
    common(cc, log_level="error")

    oauth = sub.add_parser("oauth", help="OAuth 2.0 for inboxes with auth.method: oauth2")
    oauth_sub = oauth.add_subparsers(dest="oauth_command", required=True, metavar="SUBCOMMAND")
    login = oauth_sub.add_parser("login", help="sign in once for an inbox and write its refresh "
                                               "token to auth.refresh_token_file")
    common(login, log_level="error")
    login.add_argument("--inbox", required=True, metavar="NAME")
    login.add_argument("--timeout", default="5m", metavar="DURATION",
                       help="how long to wait for the browser's redirect (default: %(default)s)")

    run = sub.add_parser("run", help="the exporter: check every inbox on schedule, serve metrics")
    common(run)
    run.add_argument("--web.listen-address", dest="listen", default=DEFAULT_LISTEN,
                     metavar="ADDR", help="address for /metrics and the status page "
                                          "(default: %(default)s)")
    run.add_argument("--web.config.file", dest="web_config_file", default=None, metavar="FILE",
                     help="exporter-toolkit web config: TLS, basic auth, headers, rate limit "
                          "(see README, 'Securing the endpoints')")
    run.add_argument("--web.enable-lifecycle", dest="enable_lifecycle", action="store_true",
                     help="serve POST /-/reload and /-/quit (off: they answer 403; SIGHUP "
                          "reloads)")
    run.add_argument("--web.enable-probe", dest="enable_probe", action="store_true",
                     help="serve POST /probe?inbox=NAME, an on-demand check (at most one per "
                          "inbox per web.probe_min_interval)")
    run.add_argument("--storage.path", dest="storage_path", default=None, metavar="DIR",
                     help="keep the check history (status page strips) in DIR/history.db "
                          "across restarts (default: in memory only)")
    run.add_argument("--shutdown.grace-period", dest="grace", default="20s", metavar="DURATION",
                     help="on SIGTERM, how long checks in flight may finish (default: %(default)s)")
    run.add_argument("--shard.count", dest="shard_count", type=int, default=1, metavar="N",
                     help="replicas sharing the config: each checks its share (default: 1)")
    run.add_argument("--shard.index", dest="shard_index", default="0", metavar="I",
                     help="this replica's index, 0..N-1, or 'hostname' for a StatefulSet "
                          "pod's ordinal (default: 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    if args.command == "run":
        from .run import run
        from .web import WebOptions

        web = WebOptions(enable_probe=args.enable_probe, enable_lifecycle=args.enable_lifecycle,
                         config_file=args.web_config_file)
        return run(args.config_file, args.listen, args.grace, args.shard_count, args.shard_index,
                   web, args.storage_path)
    if args.command == "oauth":
        return _oauth_login(args)
    try:
        config = load_config(args.config_file)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        print(f"{args.config_file}: OK, {len(config.inboxes)} inboxes")
        return EXIT_OK
    return _check(config, args)


def _oauth_login(args: argparse.Namespace) -> int:
    from .oauth.login import LoginError, login

    try:
        timeout = parse_duration(args.timeout)
        config = load_config(args.config_file, strict_secrets=False)  # the token may not exist yet
        inbox = config.inbox(args.inbox)
    except ValueError as e:
        print(f"error: --timeout: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyError:
        print(f"error: {args.config_file}: no inbox named {args.inbox}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        login(inbox, say=lambda text: print(text, flush=True), timeout=timeout)
    except LoginError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILING
    return EXIT_OK


def _check(config: Config, args: argparse.Namespace) -> int:
    inboxes = config.inboxes
    if args.inbox:
        unknown = sorted(set(args.inbox) - {i.name for i in inboxes})
        if unknown:
            print(f"error: {config.source}: no inbox named {', '.join(unknown)}", file=sys.stderr)
            return EXIT_CONFIG
        inboxes = tuple(i for i in inboxes if i.name in args.inbox)
    if not inboxes:
        print(f"error: {config.source}: no inboxes configured", file=sys.stderr)
        return EXIT_CONFIG
    limits = ConnectionLimits(config.checks.max_connections_per_host)
    tokens = TokenCache()
    key = load_or_create(config.probe_key.get_secret_value() if config.probe_key else None,
                         config.checks.probe_key_file)
    checker = Checker(limits, tokens=tokens, probe_key=key)
    confirmer = DeliveryConfirmer(limits, on_result=lambda inbox, result: None, tokens=tokens,
                                  probe_key=key)

    def check(inbox: Inbox) -> CheckResult:
        result = checker.check(inbox, hold_test_email=None if args.send_test_email
                               else "not sent: --no-test-email")
        if result.sent_at is not None and inbox.test_email_cleanup_sent:
            # One attempt: providers file the copy while accepting the mail (the daemon keeps
            # looking for a minute, for servers that file it later).
            confirmer.remove_sent_copy(inbox, result.probe_id, final=True)
        if inbox.delivery is None:
            return result
        if result.sent_at is None:
            step = StepResult(Step.DELIVERY, Status.SKIPPED, note="not run: no test email sent")
        else:
            step = confirmer.confirm_now(inbox, result.probe_id, result.sent_at).step
        return replace(result, steps=(*result.steps, step))

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(args.parallel, len(inboxes)))) as pool:
            results = list(pool.map(check, inboxes))
    finally:
        confirmer.stop()
    print(render_json(results, args.transcript) if args.output == "json"
          else render_text(results, transcript=args.transcript))
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILING


if __name__ == "__main__":
    sys.exit(main())
