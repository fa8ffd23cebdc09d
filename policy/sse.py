"""Incremental, I/O-free Server-Sent Events parsing.

`SSEParser.feed(chunk)` returns the events completed by `chunk`, carrying a
partial line or event across calls, so any split of the byte stream yields
the same events. Each event keeps its exact raw bytes, so a filter can drop
one event and pass the others through unchanged, and its `event:` name (the
Responses API types its events), so a meter can skip events without decoding them.

Cost is linear in the bytes fed whatever the chunking: the search for a line's
end resumes where the previous chunk's search stopped. An event larger than
`max_event_bytes` is not buffered: its bytes come out as they arrive, as
`oversize` fragments (no data, never parsed), whose concatenation is its raw bytes;
an event is oversize by its own length, so every split gives the same answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_EOL = re.compile(rb"\r\n|\r|\n")
_CR = 13
# Far above any real vLLM event (a token's delta, or a whole response in the Responses
# API's final event); a bound on what one stream may buffer.
MAX_EVENT_BYTES = 16 << 20
# Consumed bytes kept at the buffer's front before it is compacted.
_COMPACT_BYTES = 65536


@dataclass(frozen=True, slots=True)
class Event:
    raw: bytes  # the event's bytes, including its terminating blank line
    data: bytes | None  # joined `data:` lines; None for comment/field-only events
    event: bytes | None = None  # the last `event:` line's value, if any
    oversize: bool = False  # a fragment of an event over the size limit: raw only


class SSEParser:
    __slots__ = ("_buf", "_data", "_event", "_event_start", "_line_start", "_max",
                 "_oversize", "_scan_pos", "oversize_events")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._buf = bytearray()
        # In `_buf`: where the current event's unsent bytes begin, where the current
        # line begins, and where the search for its end resumes.
        self._event_start = 0
        self._line_start = 0
        self._scan_pos = 0
        self._data: list[bytes] = []
        self._event: bytes | None = None
        self._oversize = False  # the current event is over the limit: passed through
        self.oversize_events = 0

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
        self._event_start = self._line_start = self._scan_pos = 0
        self._data = []
        self._event = None
        self._oversize = False
        return events, tail

    def _scan(self, final: bool) -> list[Event]:
        buf = self._buf
        events: list[Event] = []
        pos, at = self._line_start, self._scan_pos
        while (m := _EOL.search(buf, at)) is not None:
            # A lone CR at the end may be the first half of CRLF: wait for more.
            if m.end() == len(buf) and buf[-1] == _CR and not final:
                at = m.start()
                break
            start, at = m.start(), m.end()
            if start == pos:
                events.append(self._end_event(at))
            elif not self._oversize:
                self._field(bytes(buf[pos:start]))
            pos = at
        else:
            at = len(buf)
        self._line_start, self._scan_pos = pos, at
        if not self._oversize and len(buf) - self._event_start > self._max:
            self._start_oversize()
        if self._oversize:
            self._pass_through(events)
        elif self._event_start > _COMPACT_BYTES or (
                self._event_start and self._event_start == len(buf)):
            self._drop(self._event_start)
        return events

    def _end_event(self, end: int) -> Event:
        """The event ending at `end` (after its blank line)."""
        raw = bytes(self._buf[self._event_start : end])
        self._event_start = end
        data = b"\n".join(self._data) if self._data else None
        name, self._data, self._event = self._event, [], None
        if self._oversize:  # its last fragment
            self._oversize = False
            return Event(raw, None, None, True)
        if len(raw) > self._max:  # whole in one scan, but over the limit all the same
            self.oversize_events += 1
            return Event(raw, None, None, True)
        return Event(raw, data, name)

    def _field(self, line: bytes) -> None:
        if line.startswith(b"data"):
            field, _sep, value = line.partition(b":")
            if field == b"data":
                self._data.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event"):
            field, _sep, value = line.partition(b":")
            if field == b"event":
                self._event = value[1:] if value.startswith(b" ") else value

    def _start_oversize(self) -> None:
        self._oversize = True
        self.oversize_events += 1
        self._data, self._event = [], None

    def _pass_through(self, events: list[Event]) -> None:
        """An oversize event in progress: its bytes so far go out, and only what tells
        where its current line stands is kept (its last 2 bytes: one non-EOL byte
        and a pending CR at most), so the buffer stays small however long it is."""
        buf = self._buf
        if len(buf) > self._event_start:
            events.append(Event(bytes(buf[self._event_start :]), None, None, True))
        self._drop(max(self._line_start, len(buf) - 2))
        self._event_start = len(buf)

    def _drop(self, n: int) -> None:
        """Forget the buffer's first `n` bytes (already returned)."""
        del self._buf[:n]
        self._event_start = max(0, self._event_start - n)
        self._line_start = max(0, self._line_start - n)
        self._scan_pos -= n
