"""Logging: one line per event, logfmt or JSON. Fields come from `extra={...}`.

Nothing here knows about secrets: callers log names, steps, categories and redacted details,
never configuration objects (an Inbox holds its password as a SecretStr that renders masked).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

from .redact import redact_urls

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    fields: dict[str, object] = {
        "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    fields.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
    if record.exc_info:
        exc = record.exc_info[1]
        fields["error"] = f"{type(exc).__name__}: {exc}"
    return fields


# A URL's user:password is redacted on the way out, whoever wrote the line (a library's
# exception message included): the one kind of secret that text from elsewhere carries.
class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_urls(" ".join(f"{k}={_quote(v)}" for k, v in _fields(record).items()))


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_urls(json.dumps(_fields(record), default=str))


def _quote(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\n\t'):
        return text
    return json.dumps(text)


def setup(level: str = "info", fmt: str = "logfmt", stream: TextIO = sys.stderr) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # IMAPClient logs every command at DEBUG, LOGIN with its password included: never let
    # that reach a handler, whatever the level.
    logging.getLogger("imapclient").setLevel(logging.WARNING)
    # httpx logs every token request at INFO, authlib its token handling at DEBUG: ours to say.
    for name in ("httpx", "httpx2", "httpcore", "authlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # APScheduler logs every job run at INFO: one line per check is ours to write, not its.
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, root.level))
