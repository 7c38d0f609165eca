"""HTTP: /metrics, /-/healthy, /-/ready, /-/reload, /api/v1/status, / and /probe?inbox=NAME."""

from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from . import status
from .metrics import CONTENT_TYPE

log = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    server: "WebServer"
    protocol_version = "HTTP/1.1"
    server_version = "inbox-exporter"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        exporter = self.server.exporter
        if url.path == "/metrics":
            self._send_parts(200, exporter.render_metrics(), CONTENT_TYPE)
        elif url.path == "/-/healthy":
            ok = exporter.healthy()
            self._send(200 if ok else 503, "Healthy\n" if ok else "Scheduler not ticking\n")
        elif url.path == "/-/ready":
            ok = exporter.ready()
            self._send(200 if ok else 503, "Ready\n" if ok else "No configuration loaded\n")
        elif url.path == "/api/v1/status":
            self._send(200, status.render_json(exporter.statuses(), exporter.load()),
                       "application/json")
        elif url.path == "/":
            self._send(200, status.render_html(exporter.statuses(), exporter.load()),
                       "text/html; charset=utf-8")
        elif url.path == "/probe":
            name = parse_qs(url.query).get("inbox", [""])[0]
            if not name:
                self._send(400, "missing parameter: inbox\n")
                return
            body = exporter.probe(name)
            if body is None:
                self._send(404, f"no inbox named {name!r}\n")
            else:
                self._send(200, body, CONTENT_TYPE)
        elif url.path == "/-/reload":
            self._send(405, "use POST\n", headers={"Allow": "POST"})
        else:
            self._send(404, "not found\n")

    def do_POST(self) -> None:  # noqa: N802
        if urlsplit(self.path).path != "/-/reload":
            self._send(404, "not found\n")
            return
        error = self.server.exporter.reload()
        if error is None:
            self._send(200, "Reloaded\n")
        else:
            self._send(500, f"failed to reload config: {error}\n")

    def _send(self, code: int, body: str, content_type: str = "text/plain; charset=utf-8",
              headers: dict[str, str] | None = None) -> None:
        self._send_parts(code, [body.encode()], content_type, headers)

    def _send_parts(self, code: int, parts: list[bytes], content_type: str,
                    headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(sum(len(p) for p in parts)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            for part in parts:
                self.wfile.write(part)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - base-class signature
        log.debug("http request", extra={"client": self.client_address[0],
                                         "request": self.requestline, "code": args[1] if len(args) > 1 else ""})


class WebServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], exporter):
        self.exporter = exporter
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def parse_listen_address(value: str) -> tuple[str, int]:
    """':9857', '0.0.0.0:9857', '127.0.0.1:9857' or '[::1]:9857' -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid listen address {value!r}: use HOST:PORT or :PORT")
    return host.strip("[]") or "0.0.0.0", int(port)
