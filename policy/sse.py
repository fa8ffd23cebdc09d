"""Incremental, I/O-free Server-Sent Events parsing.

`SSEParser.feed(chunk)` returns the events completed by `chunk`, carrying a
partial line or event across calls, so any split of the byte stream yields
the same events. Each event keeps its exact raw bytes, so a filter can drop
one event and pass the others through unchanged, and its `event:` name (the
Responses API types its events), so a meter can skip events without decoding them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_EOL = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class Event:
    raw: bytes  # the event's bytes, including its terminating blank line
    data: bytes | None  # joined `data:` lines; None for comment/field-only events
    event: bytes | None = None  # the last `event:` line's value, if any


class SSEParser:
    __slots__ = ("_buf", "_data", "_event", "_event_start", "_line_start")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._event_start = 0
        self._line_start = 0
        self._data: list[bytes] = []
        self._event: bytes | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        self._buf += chunk
        return self._scan(final=False)

    def finish(self) -> tuple[list[Event], bytes]:
        """End of stream: the last events, and any incomplete tail's raw bytes.

        Per the SSE spec an unterminated event is discarded; its bytes are
        returned so a pass-through filter can still forward them.
        """
        events = self._scan(final=True)
        tail = bytes(self._buf[self._event_start :])
        self._buf.clear()
        self._event_start = self._line_start = 0
        self._data = []
        self._event = None
        return events, tail

    def _scan(self, final: bool) -> list[Event]:
        buf = self._buf
        events: list[Event] = []
        pos = self._line_start
        while True:
            m = _EOL.search(buf, pos)
            if m is None:
                break
            # A lone CR at the end may be the first half of CRLF: wait for more.
            if m.group() == b"\r" and m.end() == len(buf) and not final:
                break
            line = bytes(buf[pos : m.start()])
            pos = m.end()
            if not line:
                raw = bytes(buf[self._event_start : pos])
                data = b"\n".join(self._data) if self._data else None
                events.append(Event(raw, data, self._event))
                self._data = []
                self._event = None
                self._event_start = pos
            elif line.startswith(b"data"):
                field, _sep, value = line.partition(b":")
                if field == b"data":
                    self._data.append(value[1:] if value.startswith(b" ") else value)
            elif line.startswith(b"event"):
                field, _sep, value = line.partition(b":")
                if field == b"event":
                    self._event = value[1:] if value.startswith(b" ") else value
        self._line_start = pos
        if self._event_start > 65536 or (self._event_start and self._event_start == len(buf)):
            del buf[: self._event_start]
            self._line_start -= self._event_start
            self._event_start = 0
        return events
