"""Settlements the limit store could not take, kept on disk until it can.

When `Admission.settle` cannot reach the store, the settlement is appended here, and
`Admission.replay` applies the spooled ones in order once the store answers (also at
start: a replica restarted after an outage). Settling is idempotent by request_id (a
repeat, or a request the store never held, is a no-op; a hold charged as lost meanwhile
is corrected), so a line applied twice, after a crash before its offset was saved,
changes nothing the second time.

Layout in `spool_dir` (one live spool per directory):
  settle.jsonl   one JSON line per settlement: limits, ask, used_tokens, cost_nano, and
                 what the store needs to settle it elsewhere (`mark`: Redis' data mark at
                 admission, so that a replica restarted before the replay still charges
                 a hold Redis lost meanwhile)
  settle.offset  the byte offset of the first line not yet applied (temp file + rename)
  settle.lock    flock'ed by the live spool
Once every line is applied both files are emptied. No fsync: each line is one write()
to an O_APPEND descriptor, so it survives the process being killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import orjson

from authz.state.limits.codec import ask_from, dumps, limits_from
from authz.state.lines import TornLine
from policy.limits import Ask, Limits

log = logging.getLogger("tokenbooth.limits")

SPOOL_FILE = "settle.jsonl"
OFFSET_FILE = "settle.offset"
LOCK_FILE = "settle.lock"
MAX_BYTES = 64 << 20  # ~200k settlements
_CHUNK = 1 << 20  # bytes read at a time; a line is far smaller


@dataclass(frozen=True, slots=True)
class Spooled:
    """One settlement: the arguments of `LimitStore.settle` but the time."""

    limits: Limits
    ask: Ask
    used_tokens: int
    cost_nano: int
    mark: str | None = None  # LimitStore.admitted_under
    # An admission's release (`LimitStore.release`): when it was sent, else a settlement.
    admitted: float | None = None


def _decode(line: bytes) -> Spooled:
    obj = orjson.loads(line)
    if not isinstance(obj, dict):
        raise ValueError("a spooled settlement must be a JSON object")
    used, cost = obj.get("used_tokens"), obj.get("cost_nano")
    if type(used) is not int or type(cost) is not int:
        raise ValueError("used_tokens and cost_nano must be integers")
    mark = obj.get("mark")
    if mark is not None and not isinstance(mark, str):
        raise ValueError("mark must be a string")
    admitted = obj.get("admitted")
    if admitted is not None and type(admitted) not in (int, float):
        raise ValueError("admitted must be a number")
    return Spooled(limits_from(obj.get("limits")), ask_from(obj.get("ask")), used, cost,
                   mark, None if admitted is None else float(admitted))


def lock_exclusive(path: Path) -> int:
    """A descriptor holding an exclusive flock on `path` (released when closed, or when
    the process dies). RuntimeError if another live process or descriptor holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"{path.parent} is in use by another tokenbooth process (each "
                           "replica needs a data_dir of its own)") from None
    return fd


class SettleSpool:
    """The spool in `spool_dir` (see the module); raises RuntimeError if another live
    spool holds the directory."""

    def __init__(self, spool_dir: Path, *, max_bytes: int = MAX_BYTES) -> None:
        spool_dir.mkdir(parents=True, exist_ok=True)
        self.dir = spool_dir
        self._max = max_bytes
        self._lock = lock_exclusive(spool_dir / LOCK_FILE)
        self._fd = os.open(spool_dir / SPOOL_FILE, os.O_RDWR | os.O_APPEND | os.O_CREAT,
                           0o600)
        self._torn = TornLine()
        self._size = os.fstat(self._fd).st_size
        if self._size and os.pread(self._fd, 1, self._size - 1) != b"\n":
            self._write(b"\n")  # a line cut by a crash stays a damaged line of its own
        self._off = self._load_offset()

    @property
    def pending_bytes(self) -> int:
        """Bytes of settlements not applied yet (0: nothing owed)."""
        return self._size - self._off

    def append(self, s: Spooled) -> bool:
        """Keep a settlement; False (and an error log with every field) if the spool is
        full or the write fails: never silently."""
        line = dumps({"limits": s.limits, "ask": replace(s.ask, record=None),
                      "used_tokens": s.used_tokens, "cost_nano": s.cost_nano,
                      **({"mark": s.mark} if s.mark is not None else {}),
                      **({"admitted": s.admitted} if s.admitted is not None else {})}) + b"\n"
        if self.pending_bytes + len(line) > self._max:
            log.error("settle spool full (%d bytes), settlement not kept: %s",
                      self.pending_bytes, line.decode().rstrip())
            return False
        try:
            self._write(line)
        except OSError as e:
            log.error("settle spool write failed (%s), settlement not kept: %s", e,
                      line.decode().rstrip())
            return False
        return True

    def read(self) -> list[tuple[int, Spooled | None]]:
        """The next pending settlements, in order, each with the offset just past it
        (None for a damaged line, to skip)."""
        data = os.pread(self._fd, min(_CHUNK, self.pending_bytes), self._off)
        out: list[tuple[int, Spooled | None]] = []
        pos = self._off
        for line in data[:data.rfind(b"\n") + 1].split(b"\n")[:-1]:
            pos += len(line) + 1
            entry: Spooled | None = None
            if line.strip():
                try:
                    entry = _decode(line)
                except (ValueError, TypeError):
                    log.error("settle spool: skipping a damaged line: %r", line[:500])
            out.append((pos, entry))
        return out

    def commit(self, end: int) -> None:
        """Everything before offset `end` is applied. Empties the spool once it is all."""
        self._off = end
        if end >= self._size:
            # The offset goes first: a crash in between replays applied lines (no-ops).
            (self.dir / OFFSET_FILE).unlink(missing_ok=True)
            os.ftruncate(self._fd, 0)
            self._size = self._off = 0
            return
        tmp = self.dir / (OFFSET_FILE + ".tmp")
        tmp.write_text(f"{end}\n")
        os.replace(tmp, self.dir / OFFSET_FILE)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            os.close(self._lock)  # releases the flock
            self._fd = -1

    def _write(self, data: bytes) -> None:
        try:  # after a partial line the next starts on its own (authz/state/lines.py)
            self._torn.append(self._fd, data)
        finally:  # a partial line is skipped as damaged when read
            self._size = os.fstat(self._fd).st_size

    def _load_offset(self) -> int:
        with contextlib.suppress(FileNotFoundError, ValueError):
            off = int((self.dir / OFFSET_FILE).read_text())
            if 0 <= off <= self._size:
                return off
            log.warning("settle spool: offset past the end, replaying from the start")
        return 0
