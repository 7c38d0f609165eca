"""JSON over HTTP for the sinks, with the errors they need: permanent or worth a retry."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from ..redact import redact_urls
from .dispatch import SinkError

TIMEOUT = 5.0


def post_json(url: str, payload: object, headers: dict[str, str] | None = None,
              timeout: float = TIMEOUT) -> None:
    body = json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "inbox-exporter", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as e:
        # 4xx means the request itself is wrong: sending it again will not help
        # (but 408 timeout and 429 rate limit are worth another try).
        permanent = 400 <= e.code < 500 and e.code not in (408, 429)
        raise SinkError(f"HTTP {e.code} from {_origin(url)}", permanent=permanent) from None
    except (urllib.error.URLError, OSError, ValueError) as e:  # ValueError: http.client.InvalidURL
        reason = redact_urls(str(getattr(e, "reason", e)))
        raise SinkError(f"{_origin(url)}: {reason}", permanent=isinstance(e, ValueError)) from None


def _origin(url: str) -> str:
    """scheme://host[:port] only: a URL's path or query may hold a token."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a number: say nothing of it
        port = ""
    return f"{parts.scheme}://{parts.hostname}{port}"
