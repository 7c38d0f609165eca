"""The HTTP server: Hypercorn (asyncio) on a thread of its own.

Why Hypercorn: http.server and the threaded servers (cheroot, waitress's TLS-less cousin) give a
thread to each connection, or do the TLS handshake on the accepting thread; a client that opens
a connection and never finishes its request then holds that thread. In an event loop it holds a
few kilobytes: the request line and headers are read by the loop, a connection that has not sent
a whole request within IDLE_TIMEOUT is closed, TLS handshakes are bounded by HANDSHAKE_TIMEOUT,
and headers beyond MAX_HEADER_BYTES are refused. Threads stay a fixed handful (see app.py).

TLS certificates and client CAs follow edits of the web config file: every handshake starts on
the context TLS was started with, whose SNI callback (called on every ClientHello, with or
without SNI) swaps in the context of the file's current version.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from typing import Any

from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.utils import wrap_app

from .app import App, WebOptions
from .webconfig import WebConfigFile

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 10.0  # a connection without a whole request (or idle between requests)
HANDSHAKE_TIMEOUT = 10.0
MAX_HEADER_BYTES = 16 * 1024
BACKLOG = 256


class _Config(HypercornConfig):
    """Hypercorn's config with our own TLS context (it would build one from file names)."""

    def __init__(self, context: ssl.SSLContext | None):
        super().__init__()
        self._context = context

    @property
    def ssl_enabled(self) -> bool:
        return self._context is not None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._context


class WebServer:
    """Binds at construction (so a busy port is an error at start-up), serves after start()."""

    def __init__(self, address: tuple[str, int], exporter: Any,
                 options: WebOptions | None = None, on_quit: Any = None):
        self.options = options or WebOptions()
        # ConfigError: a broken web config file at start-up is fatal, as in every Go exporter.
        self.web_config = (WebConfigFile(self.options.config_file)
                           if self.options.config_file else None)
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind(address)
            self._socket.listen(BACKLOG)
        except OSError:
            self._socket.close()
            raise
        self._socket.setblocking(False)
        self.server_address = self._socket.getsockname()
        self.app = App(exporter, self.options, self.web_config, on_quit)
        self.tls = self.web_config is not None and self.web_config.current().tls is not None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def _hypercorn_config(self) -> _Config:
        context = None
        if self.web_config is not None:
            current = self.web_config.current()
            context = current.tls
            if context is not None:
                context.sni_callback = self._follow_file
        cfg = _Config(context)
        cfg.keep_alive_timeout = IDLE_TIMEOUT
        cfg.ssl_handshake_timeout = HANDSHAKE_TIMEOUT
        cfg.h11_max_incomplete_size = MAX_HEADER_BYTES
        cfg.h2_max_header_list_size = MAX_HEADER_BYTES
        cfg.backlog = BACKLOG
        cfg.graceful_timeout = 2.0
        cfg.include_server_header = False
        cfg.accesslog = None
        cfg.errorlog = logging.getLogger("inbox_exporter.web.hypercorn")
        return cfg

    def _follow_file(self, sslobj: ssl.SSLObject, _server_name: str | None,
                     _context: ssl.SSLContext) -> None:
        assert self.web_config is not None
        current = self.web_config.current()
        if current.tls is not None and sslobj.context is not current.tls:
            sslobj.context = current.tls

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="http", daemon=True)
        self._thread.start()
        self._started.wait(10)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        sockets = Sockets(secure_sockets=[self._socket] if self.tls else [],
                          insecure_sockets=[] if self.tls else [self._socket], quic_sockets=[])
        loop.call_soon(self._started.set)
        try:
            loop.run_until_complete(worker_serve(
                wrap_app(self.app, 0, "asgi"),  # type: ignore[arg-type]  # our own scope types
                self._hypercorn_config(), sockets=sockets,
                shutdown_trigger=self._stop.wait))
        except Exception:
            log.exception("HTTP server stopped")
        finally:
            loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass  # the loop ended meanwhile
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.app.close()
        self._socket.close()


def parse_listen_address(value: str) -> tuple[str, int]:
    """':9857', '0.0.0.0:9857', '127.0.0.1:9857' or '[::1]:9857' -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid listen address {value!r}: use HOST:PORT or :PORT")
    return host.strip("[]") or "0.0.0.0", int(port)
