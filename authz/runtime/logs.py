"""Structured logs: one JSON object per line, never a secret, never a bare traceback."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

_STD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info and record.exc_info[0] is not None:
            # The error's type and text first; the trace as a field, not as the message.
            out["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
            out["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class _StatusAfterReset(logging.Filter):
    """Drops grpc.aio's error (with a traceback) for a status it could not send because
    the peer had already reset the stream: Envoy resets an ext_proc stream as soon as the
    HTTP stream ends, often as the servicer returns after its last answer. The request
    was answered and recorded; the line would only alarm."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info
        return not (exc is not None and exc[0] is not None
                    and exc[0].__name__ == "ExecuteBatchError"
                    and "SendStatusFromServerOperation" in str(exc[1]))


class MalformedHttp(logging.Filter):
    """aiohttp (the admin API, the side port) logs a request it cannot parse (a header
    past 8 KiB, TLS spoken to a plain port, a scanner) as an error with a traceback and
    the offending bytes, which may hold a token. It is the client's fault, answered with
    a 400: one warning line naming the error's kind, without the bytes or the trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info
        if exc is None or exc[1] is None:
            return True
        from aiohttp.http_exceptions import HttpProcessingError

        if isinstance(exc[1], HttpProcessingError):
            record.msg, record.args = "malformed HTTP request refused: %s (%s)", (
                type(exc[1]).__name__, exc[1].code)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


class Repeats(logging.Filter):
    """At most `burst` lines of one kind (logger and message template) per `window_s`,
    for the lines marked `extra=REPEATS` (authz/state/repeats.py): the ones a fault writes
    once per request, as a store away fails every request closed. They came thousands a
    second, each costing the event loop its formatting and the log pipeline its volume.
    The lines past the burst are counted, and the first line of that kind let through
    afterwards says how many were left out (`repeated`). Unmarked lines always pass: a
    line that carries what could not be stored (a record, a settlement) is never dropped."""

    MAX_KINDS = 1024  # kinds tracked at once (templates are few; f-strings are not)

    def __init__(self, burst: int = 20, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.window_s, self._clock = burst, window_s, clock
        self._kinds: dict[tuple[str, str], list[float]] = {}  # [window start, sent, dropped]
        self._lock = threading.Lock()  # worker threads log too

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_repeats", False):
            return True
        key = (record.name, str(record.msg))
        now = self._clock()
        with self._lock:
            kind = self._kinds.get(key)
            if kind is None or now - kind[0] >= self.window_s:
                if kind is None and len(self._kinds) >= self.MAX_KINDS:
                    self._kinds.clear()
                dropped = 0 if kind is None else int(kind[2])
                self._kinds[key] = kind = [now, 0, 0]
                if dropped:
                    record.repeated = dropped
            if kind[1] >= self.burst:
                kind[2] += 1
                return False
            kind[1] += 1
            return True


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(Repeats())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("grpc._cython.cygrpc").addFilter(_StatusAfterReset())
    logging.getLogger("aiohttp.server").addFilter(MalformedHttp())
