"""A local HTTP endpoint that records what it is sent: a webhook receiver, a Sentry DSN
target, or a sink that is down (answers 500, 400, or never answers). 127.0.0.1, port 0."""

from __future__ import annotations

import gzip
import json
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Capture(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, status: int = 200, hang: bool = False):
        self.status, self.hang = status, hang
        self.requests: list[dict] = []
        self._release = threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> Capture:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._release.set()
        self.shutdown()
        self.server_close()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.requests

    def json_bodies(self) -> list:
        return [json.loads(r["body"]) for r in self.requests]


class _Handler(BaseHTTPRequestHandler):
    server: Capture

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        encoding = self.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        self.server.requests.append({"path": self.path, "headers": dict(self.headers),
                                     "body": body.decode("utf-8", "replace")})
        if self.server.hang:
            self.server._release.wait(60)
            return
        self.send_response(self.server.status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass
