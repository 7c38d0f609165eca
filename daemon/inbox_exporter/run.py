"""`inbox-exporter run`: start the exporter, serve HTTP, handle signals, stop cleanly.

Signals only enqueue a command; the main thread does the work, so a reload or a shutdown
never runs inside a signal handler while another thread holds a lock.
"""

from __future__ import annotations

import logging
import queue
import signal
import sys

from . import __version__
from .config import ConfigError, parse_duration
from .daemon import Exporter
from .sharding import parse_shard
from .web import WebOptions, WebServer, parse_listen_address
from .web.webconfig import parse_web_config

log = logging.getLogger(__name__)

EXIT_OK, EXIT_CONFIG, EXIT_UNCLEAN = 0, 2, 3


def run(config_file: str, listen: str, grace: str, shard_count: int = 1,
        shard_index: str = "0", web: WebOptions | None = None,
        storage_path: str | None = None) -> int:
    try:
        grace_seconds = parse_duration(grace)
        address = parse_listen_address(listen)
        shard = parse_shard(shard_count, shard_index)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if web is not None and web.config_file:
            parse_web_config(web.config_file)  # before anything starts: one line, exit 2
        exporter = Exporter(config_file, shard=shard, storage_path=storage_path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    commands: queue.Queue[str] = queue.Queue()
    try:
        server = WebServer(address, exporter, web, on_quit=lambda: commands.put("stop"))
    except OSError as e:
        print(f"error: cannot listen on {listen}: {e.strerror}", file=sys.stderr)
        return EXIT_CONFIG

    signal.signal(signal.SIGTERM, lambda *_: commands.put("stop"))
    signal.signal(signal.SIGINT, lambda *_: commands.put("stop"))
    signal.signal(signal.SIGHUP, lambda *_: commands.put("reload"))

    exporter.start()
    server.start()
    log.info("inbox-exporter started", extra={"version": __version__, "listen": server.url,
                                              "inboxes": len(exporter.config.inboxes),
                                              "shard": f"{shard.index}/{shard.count}"})
    while True:
        try:
            command = commands.get(timeout=1)
        except queue.Empty:
            continue
        if command == "reload":
            exporter.reload()
        elif command == "stop":
            break
    log.info("shutting down", extra={"grace_seconds": grace_seconds})
    clean = exporter.stop(grace_seconds)
    server.stop()
    if not clean:
        log.warning("checks still running after the grace period were abandoned")
    log.info("stopped")
    return EXIT_OK if clean else EXIT_UNCLEAN
