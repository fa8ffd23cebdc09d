"""Whole lines appended to a local file, through a full disk.

The usage log (`state: memory`), the Redis sink's spool and the limits journal each
append one line per write() to an O_APPEND descriptor. A full disk makes a write short
(part of the line lands) or fail (none does). Two rules keep every line readable and
every record kept while the process lives:

- after a short write the file ends in a torn line; the next write starts with a
  newline, so the torn line stays a damaged line of its own that readers skip, never
  glued to the next record (which readers would then skip too);
- `Backlog` keeps lines that could not be written, in order, in memory (bounded), and
  writes them ahead of the next line once the disk takes them again.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import deque

log = logging.getLogger("tokenbooth.state")

# Lines kept in memory while the disk refuses them, at most (then a write raises).
BACKLOG_BYTES = 64 << 20


def open_appending(path: str | os.PathLike[str]) -> tuple[int, bool]:
    """An O_APPEND descriptor on `path` (created 0600), and whether the file already ends
    in a torn line (a crash or a full disk cut a write short, maybe in an earlier process):
    the first line written must then start with a newline."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    size = os.fstat(fd).st_size
    return fd, size > 0 and os.pread(fd, 1, size - 1) != b"\n"


class TornLine:
    """Appends whole lines to a descriptor, remembering whether the file ends torn."""

    __slots__ = ("torn",)

    def __init__(self, torn: bool = False) -> None:
        self.torn = torn

    def append(self, fd: int, line: bytes) -> None:
        """Write `line` with one write(); OSError if it did not land whole."""
        data = b"\n" + line if self.torn else line
        n = os.write(fd, data)
        if n != len(data):
            self.torn = True
            raise OSError(errno.ENOSPC, f"short write ({n} of {len(data)} bytes)")
        self.torn = False


class Backlog:
    """Lines a descriptor refused, written ahead of the next ones (in order) once it
    takes them; `what` names the file in the log lines."""

    __slots__ = ("_lines", "_torn", "bytes", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self._lines: deque[bytes] = deque()
        self._torn = TornLine()
        self.bytes = 0

    def reopened(self, torn: bool) -> None:
        """The descriptor is a new one, on a file that ends torn or not (`open_appending`)."""
        self._torn.torn = torn

    def __len__(self) -> int:
        return len(self._lines)

    def append(self, fd: int, line: bytes) -> None:
        """Write `line` after any lines kept before it; keep it if the disk refuses.
        OSError only when it cannot be kept either (past BACKLOG_BYTES)."""
        if self._lines:
            self.flush(fd)
        if not self._lines:
            try:
                self._torn.append(fd, line)
                return
            except OSError as e:
                log.error("%s: write failed (%s): records are kept in memory until the "
                          "disk takes them", self.what, e)
        if self.bytes + len(line) > BACKLOG_BYTES:
            raise OSError(errno.ENOSPC, f"{self.what}: {len(self._lines)} line(s) already "
                                        "wait for the disk")
        self._lines.append(line)
        self.bytes += len(line)

    def flush(self, fd: int) -> bool:
        """Write the kept lines, oldest first; True when none is left."""
        while self._lines:
            try:
                self._torn.append(fd, self._lines[0])
            except OSError:
                return False
            self.bytes -= len(self._lines.popleft())
            if not self._lines:
                log.info("%s: the disk takes writes again; kept records written", self.what)
        return True

    def drop(self) -> list[bytes]:
        """The lines still kept (at a stop that cannot write them), removed."""
        out = list(self._lines)
        self._lines.clear()
        self.bytes = 0
        return out
