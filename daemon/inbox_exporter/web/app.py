"""The HTTP endpoints, as one ASGI application.

    GET  /metrics          Prometheus exposition
    GET  /-/healthy        liveness: the scheduler and the runner tick (answered in the loop)
    GET  /-/ready          a configuration is loaded
    GET  /                 status page
    GET  /api/v1/status    the same as JSON
    GET  /inbox/NAME       one inbox: latest result, history strip, transcripts (and its JSON at
                           /api/v1/inboxes/NAME)
    POST /probe?inbox=N    an on-demand check           (--web.enable-probe)
    POST /-/reload         re-read the config file      (--web.enable-lifecycle)
    POST /-/quit           shut down cleanly            (--web.enable-lifecycle)

Nothing here waits on a thread: rendering runs on a small pool of its own, an on-demand check
is awaited as a future the runner completes, bcrypt has its own thread. Health answers from
state in the event loop, so no scrape, check or password guess can queue it.

/metrics, the pages and the JSON are gzipped when the client asks (`Accept-Encoding: gzip`).

Basic auth and the rate limit of the web config file guard everything but /-/healthy and
/-/ready: they say one word, and kubelet probes cannot send credentials.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

from .. import inbox_page, status
from ..metrics import CONTENT_TYPE
from ..ondemand import Refusal
from .auth import BasicAuth, RateLimit
from .webconfig import WebConfig, WebConfigFile

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

TEXT = "text/plain; charset=utf-8"
CHUNK = 256 * 1024  # bytes per send: few event-loop turns, no whole copy of a 17 MB body
# On every response: nothing is cached, nothing sniffed into a script.
BASE_HEADERS = ((b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"))
HEALTH = frozenset({"/-/healthy", "/-/ready"})
# Pages and JSON smaller than this go out as they are: gzip would save less than it costs.
GZIP_MIN_BYTES = 1024
# The status page at 10,000 inboxes is ~13 MB of very repetitive HTML: level 1 already takes
# it to a few percent at a fraction of level 6's CPU.
GZIP_LEVEL = 1
HTML = "text/html; charset=utf-8"
JSON = "application/json"


@dataclass(frozen=True)
class WebOptions:
    enable_probe: bool = False  # --web.enable-probe
    enable_lifecycle: bool = False  # --web.enable-lifecycle
    config_file: str | None = None  # --web.config.file


@dataclass
class Response:
    status: int
    body: Iterable[bytes]
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, status: int, text: str, *headers: tuple[str, str]) -> Response:
        return cls(status, [text.encode()], TEXT, headers)


class App:
    def __init__(self, exporter: Any, options: WebOptions, web_config: WebConfigFile | None,
                 on_quit: Callable[[], None] | None = None):
        self.exporter, self.options, self.web_config = exporter, options, web_config
        self.on_quit = on_quit
        self.auth = BasicAuth()
        self.rate = RateLimit()
        # Rendering /metrics and the status page: bounded, and apart from checks and reloads.
        self._render = ThreadPoolExecutor(max_workers=2, thread_name_prefix="http-render")
        self._admin = ThreadPoolExecutor(max_workers=1, thread_name_prefix="http-admin")

    def close(self) -> None:
        self._render.shutdown(wait=False, cancel_futures=True)
        self._admin.shutdown(wait=False, cancel_futures=True)
        self.auth.close()

    # --- ASGI -------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        config = self.web_config.current() if self.web_config else None
        try:
            response = await self._guarded(scope, config)
        except Exception:
            log.exception("HTTP handler crashed", extra={"path": scope.get("path")})
            response = Response.text(500, "internal error\n")
        await self._send(scope, send, response, config)

    async def _guarded(self, scope: Scope, config: WebConfig | None) -> Response:
        path = scope["path"]
        if config is not None and path not in HEALTH:
            if not self.rate.allow(config.rate_interval, config.rate_burst):
                return Response.text(429, "too many requests\n")
            if config.basic_auth and not await self.auth.allowed(
                    config.users, _header(scope, b"authorization")):
                return Response.text(401, "unauthorized\n",
                                     ("WWW-Authenticate", 'Basic realm="inbox-exporter"'))
        return await self._route(scope, path, scope["method"])

    async def _route(self, scope: Scope, path: str, method: str) -> Response:
        read = method in ("GET", "HEAD")
        gzip_ok = _accepts_gzip(_header(scope, b"accept-encoding"))
        if path == "/-/healthy" and read:
            ok = self.exporter.healthy()
            return Response.text(200 if ok else 503, "Healthy\n" if ok else "Not ticking\n")
        if path == "/-/ready" and read:
            ok = self.exporter.ready()
            return Response.text(200 if ok else 503, "Ready\n" if ok else "No configuration\n")
        if path == "/metrics" and read:
            # exposition.py keeps the text pre-compressed: not gzipped again here
            parts = await self._in(self._render, self.exporter.render_metrics, gzip_ok)
            return Response(200, parts, CONTENT_TYPE, _GZIPPED if gzip_ok else ())
        if path == "/" and read:
            return await self._page(HTML, gzip_ok, lambda: status.render_html(
                self.exporter.statuses(), self.exporter.load(), self.exporter.strips()),
                _html_headers(status.CONTENT_SECURITY_POLICY))
        if path.startswith(("/inbox/", "/api/v1/inboxes/")) and read:
            return await self._inbox(path, gzip_ok)
        if path == "/api/v1/status" and read:
            return await self._page(JSON, gzip_ok, lambda: status.render_json(
                self.exporter.statuses(), self.exporter.load()))
        if path == "/probe":
            return await self._probe(scope, method)
        if path in ("/-/reload", "/-/quit"):
            return await self._lifecycle(path, method)
        if path in ("/", "/metrics", "/-/healthy", "/-/ready", "/api/v1/status"):
            return Response.text(405, "method not allowed\n", ("Allow", "GET, HEAD"))
        return Response.text(404, "not found\n")

    async def _inbox(self, path: str, gzip_ok: bool) -> Response:
        name = unquote(path.rpartition("/")[2])
        found = await self._in(self._render, self.exporter.inbox, name)
        if found is None:
            return Response.text(404, "no such inbox on this exporter\n")
        if path.startswith("/api/"):
            return await self._page(JSON, gzip_ok, lambda: inbox_page.render_json(*found))
        return await self._page(HTML, gzip_ok, lambda: inbox_page.render_html(*found),
                                _html_headers(inbox_page.CONTENT_SECURITY_POLICY))

    async def _page(self, content_type: str, gzip_ok: bool, render: Callable[[], str],
                    headers: tuple[tuple[str, str], ...] = ()) -> Response:
        """A page or JSON document rendered, and compressed when asked, on the render pool."""
        body, gzipped = await self._in(self._render, _encoded, render, gzip_ok)
        return Response(200, [body], content_type, headers + (_GZIPPED if gzipped else ()))

    async def _probe(self, scope: Scope, method: str) -> Response:
        if method != "POST":
            return Response.text(405, "use POST\n", ("Allow", "POST"))
        if not self.options.enable_probe:
            return Response.text(403, "on-demand checks are off: start the exporter with "
                                 "--web.enable-probe\n")
        name = parse_qs(scope["query_string"].decode("latin-1")).get("inbox", [""])[0]
        if not name:
            return Response.text(400, "missing parameter: inbox\n")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not done.done():  # the client may have gone: the wait was cancelled
                done.set_result(None)

        def finished(_result: Any) -> None:  # on a runner thread
            loop.call_soon_threadsafe(settle)

        outcome = self.exporter.ondemand.start(name, finished)
        if isinstance(outcome, Refusal):
            retry = (("Retry-After", str(max(1, round(outcome.retry_after)))),) \
                if outcome.retry_after is not None else ()
            return Response.text(outcome.status, outcome.message + "\n", *retry)
        try:  # a coroutine waiting, not a thread: the check runs on the runner
            await asyncio.wait_for(done, outcome.timeout)
        except TimeoutError:
            return Response.text(504, "the check did not end in time; its result will be in "
                                 "/metrics\n")
        return Response(200, [self.exporter.probe_body(name).encode()], CONTENT_TYPE)

    async def _lifecycle(self, path: str, method: str) -> Response:
        if method not in ("POST", "PUT"):
            return Response.text(405, "use POST\n", ("Allow", "POST, PUT"))
        if not self.options.enable_lifecycle:
            return Response.text(403, "the lifecycle API is off: start the exporter with "
                                 "--web.enable-lifecycle (or send SIGHUP to reload)\n")
        if path == "/-/quit":
            if self.on_quit is not None:
                self.on_quit()
            return Response.text(200, "Requesting termination... Goodbye!\n")
        error = await self._in(self._admin, self.exporter.reload)
        if error is None:
            return Response.text(200, "Reloaded\n")
        # The ConfigError line names the file and the key, never a value (secrets, URLs).
        return Response.text(500, f"failed to reload config: {error}\n")

    @staticmethod
    async def _in(pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def _send(self, scope: Scope, send: Send, response: Response,
                    config: WebConfig | None) -> None:
        body = response.body if isinstance(response.body, list) else list(response.body)
        headers = [(b"content-type", response.content_type.encode()),
                   (b"content-length", str(sum(len(p) for p in body)).encode()),
                   *BASE_HEADERS]
        headers += [(k.lower().encode(), v.encode()) for k, v in response.headers]
        if config is not None:  # the file's extra headers (exporter-toolkit's allow-list)
            own = {k for k, _ in headers}
            headers += [(k.lower().encode(), v.encode()) for k, v in config.headers
                        if k.lower().encode() not in own]
        await send({"type": "http.response.start", "status": response.status,
                    "headers": headers})
        if scope["method"] == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        for chunk in _chunks(body):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


_GZIPPED = (("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding"))


def _html_headers(policy: str) -> tuple[tuple[str, str], ...]:
    return (("Content-Security-Policy", policy), ("X-Frame-Options", "DENY"),
            ("Referrer-Policy", "no-referrer"))


def _encoded(render: Callable[[], str], gzip_ok: bool) -> tuple[bytes, bool]:
    """(body, gzipped?). No request input is ever in a page, so compressing cannot leak it
    (BREACH needs a secret and a reflected guess in the same body)."""
    body = render().encode()
    if gzip_ok and len(body) >= GZIP_MIN_BYTES:
        return gzip.compress(body, GZIP_LEVEL, mtime=0), True
    return body, False


def _chunks(parts: list[bytes]) -> Iterable[bytes]:
    """Parts regrouped into ~CHUNK-sized writes."""
    group: list[bytes] = []
    size = 0
    for part in parts:
        group.append(part)
        size += len(part)
        if size >= CHUNK:
            yield b"".join(group)
            group, size = [], 0
    if group:
        yield b"".join(group)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _accepts_gzip(header: str | None) -> bool:
    """`Accept-Encoding: gzip` (Prometheus sends exactly that), honouring `gzip;q=0`."""
    for item in (header or "").split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() in ("gzip", "x-gzip"):
            q = params.strip()
            return not (q.startswith("q=") and _float(q[2:]) == 0)
    return False


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 1.0


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
