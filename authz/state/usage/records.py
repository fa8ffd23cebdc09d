"""Usage records: the embedded store is an append-only JSON-lines file.

One line per record, written and flushed when a request ends, so records
survive a restart of the services. Readers deduplicate by `request_id`,
preferring a real record over a `lost` one.

Rotation: once `usage.jsonl` reaches `max_bytes` (config: usage.local_max_bytes), the
writer that notices renames it to `usage-<seq>.jsonl` (seq counting up, under a lock
file) and every writer reopens `usage.jsonl`. Rotated files stay in the data dir until
the operator moves them; every reader reads them, oldest first, then `usage.jsonl`.

A `usage.jsonl` moved or deleted by another program (logrotate's `create`) is noticed
at the next record's write: the writer opens a new one and writes that record again
there (it may have gone to the moved file, which readers do not read; readers keep one
record per request), so no record written after the move is only in the moved file.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import orjson

from authz.state.lines import Backlog, open_appending
from authz.state.repeats import REPEATS
from policy.config import Config, redacted
from policy.usage import LOST, UsageRecord

log = logging.getLogger("tokenbooth.records")

USAGE_FILE = "usage.jsonl"
ROTATE_LOCK = "usage.rotate.lock"
DEFAULT_MAX_BYTES = 256 << 20
_CHECK_BYTES = 64 << 10  # a writer checks the file's size after this many bytes
# Hash-tagged so the stream and its dedup keys share one Redis Cluster slot.
USAGE_STREAM = "tb:{usage}"


class UsageSink(Protocol):
    def write(self, record: UsageRecord) -> None: ...

    def close(self) -> None: ...


class JsonlUsageLog:
    """Appends records to `<data_dir>/usage.jsonl` (0600), rotated at `max_bytes`."""

    def __init__(self, data_dir: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.dir, self.path = data_dir, data_dir / USAGE_FILE
        self._max = max_bytes
        self._check_every = max(1, min(_CHECK_BYTES, max_bytes // 16))
        self._unchecked = 0
        self._backlog = Backlog(str(self.path))
        self._ino: int | None = None  # the inode of the file we write
        self._file = self._open()

    def _open(self) -> Any:
        """Our descriptor on usage.jsonl; a file left ending in a torn line (a crash, a
        full disk, maybe in an earlier process) gets its next record on a line of its own."""
        fd, torn = open_appending(self.path)
        self._backlog.reopened(torn)
        self._ino = os.fstat(fd).st_ino
        return os.fdopen(fd, "ab", buffering=0)

    def write(self, record: UsageRecord) -> None:
        # One write() of one whole line: O_APPEND keeps lines intact across processes.
        # orjson serialises the (flat) dataclass itself, without a dict in between. A
        # full disk: the record waits in memory (authz/state/lines.py).
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        self._backlog.append(self._file.fileno(), line)
        if _inode(self.path) != self._ino:  # (one stat a record)
            self._moved(line)
        self._unchecked += len(line)
        if self._unchecked >= self._check_every:
            self._unchecked = 0
            self._rotate_if_due()

    def _moved(self, line: bytes) -> None:
        """usage.jsonl is no longer the file we write: reopen. Moved by another program
        (not a writer's rotation into `usage-<seq>.jsonl`, which readers read), the
        record just written may be in the moved file only: it is written again."""
        ours = self._ino
        rotated = any(_inode(p) == ours for p in rotated_files(self.dir))
        old = self._file
        try:
            self._file = self._open()
        except OSError as e:  # (the data dir itself gone): on with the file we have
            log.error("cannot open a new %s (%s): records go on to the file it was",
                      self.path, e, extra=REPEATS)
            return
        old.close()
        if rotated:
            return
        self._backlog.append(self._file.fileno(), line)
        log.error("%s was moved or deleted by another program (logrotate's `create`, "
                  "say): a new one was opened, and records before the move are in the "
                  "moved file, which tokenbooth usage and audit do not read. Let "
                  "tokenbooth rotate it (usage.local_max_bytes) and archive its "
                  "usage-<seq>.jsonl files, or rotate with copytruncate", self.path,
                  extra=REPEATS)

    def waiting(self) -> bool:
        """Whether records the disk refused still wait in memory, once tried again."""
        if len(self._backlog) and not self._file.closed:
            self._backlog.flush(self._file.fileno())
        return len(self._backlog) > 0

    def _rotate_if_due(self) -> None:
        """Rotates a full file (one writer does, under the lock), and reopens ours if it
        was rotated. Lines another writer appends to the old file before it notices land
        in the rotated file, which every reader reads too."""
        mine = os.fstat(self._file.fileno())
        if _inode(self.path) == mine.st_ino and mine.st_size < self._max:
            return
        with _locked(self.dir / ROTATE_LOCK):
            if _inode(self.path) == mine.st_ino:
                seqs = [_seq(p) for p in rotated_files(self.dir)]
                os.rename(self.path, self.dir / f"usage-{max(seqs, default=0) + 1:08d}.jsonl")
        self._file.close()
        self._file = self._open()

    def close(self) -> None:
        if self._file.closed:
            return
        if not self._backlog.flush(self._file.fileno()):
            for line in self._backlog.drop():  # never silently: each in the log
                log.error("usage record not stored (the disk refused it): %s",
                          line.decode().rstrip())
        self._file.close()


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _seq(path: Path) -> int:
    try:
        return int(path.stem.removeprefix("usage-"))
    except ValueError:
        return -1


def rotated_files(data_dir: Path) -> list[Path]:
    """The rotated logs `usage-<seq>.jsonl`, oldest first."""
    return sorted((p for p in data_dir.glob("usage-*.jsonl") if _seq(p) >= 0), key=_seq)


def usage_files(path: Path) -> list[Path]:
    """The files of the log at `path`: for `<dir>/usage.jsonl` the rotated ones first."""
    if path.name != USAGE_FILE:
        return [path]
    return [*rotated_files(path.parent), path]


def one_per_request(records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """One record per `request_id` (a record may be delivered twice), in the order of
    first appearance: the first, except that a real record supersedes a `lost` one
    (status LOST: a hold charged in full, then settled late), whichever came first."""
    out: dict[str, dict[str, Any]] = {}
    for rec in records:
        rid = rec.get("request_id")
        if not isinstance(rid, str):
            continue
        old = out.get(rid)
        if old is None or (old.get("status") == LOST and rec.get("status") != LOST):
            out[rid] = rec
    yield from out.values()


def ended_at(rec: dict[str, Any]) -> float | None:
    """When a record's request ended (epoch seconds: its start plus its duration), about
    when it was written; None if the record does not say."""
    try:
        started = datetime.fromisoformat(str(rec["started_at"])).timestamp()
        return started + float(rec.get("duration_ms") or 0) / 1000
    except (KeyError, ValueError, TypeError):
        return None


def records_backwards(path: Path, block: int = 1 << 16) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, last first (damaged lines skipped)."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        pos = f.seek(0, os.SEEK_END)
        tail = b""
        while pos > 0:
            n = min(block, pos)
            pos -= n
            f.seek(pos)
            lines = (f.read(n) + tail).split(b"\n")
            tail = lines.pop(0) if pos > 0 else b""
            for line in reversed(lines):
                with contextlib.suppress(orjson.JSONDecodeError):
                    rec = orjson.loads(line) if line.strip() else None
                    if isinstance(rec, dict):
                        yield rec


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every record in a usage log (its rotated files first), one per `request_id`
    (see one_per_request)."""
    yield from one_per_request(log_lines(path))


def log_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The records of the log at `path` and its rotated files, line by line, as written
    (a damaged line is skipped with a warning)."""
    reader = LogReader(path)
    while lines := reader.next_lines():
        for line in lines:
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict):
                log.warning("%s: skipping a damaged usage line", reader.current)
                continue
            yield rec


# Passes over the files: the first, then more while a rotation or appends moved them.
_READ_PASSES = 4


class LogReader:
    """The lines of the log at `path`, its rotated files first, read whole while writers
    rotate it: the files are listed again at the end, and a file not read yet (the live
    file, renamed by a rotation after the listing) or grown since (appends that reached
    it before the writers reopened) is read too, from where it was left. A line may so
    come twice at most (readers keep one per request_id); none is missed. A last line
    without its newline is left for the next pass (a write under way)."""

    def __init__(self, path: Path, chunk_bytes: int = 1 << 20) -> None:
        self.path = path
        self.current: Path = path
        self._chunk = chunk_bytes
        self._read: dict[int, int] = {}  # inode -> bytes read
        self._todo: list[Path] = usage_files(path)
        self._passes = 1
        self._file: Any = None
        self._inode = 0

    def next_lines(self) -> list[bytes]:
        """The next whole lines (about `chunk_bytes`); [] at the end."""
        while True:
            if self._file is not None:
                lines: list[bytes] = self._file.readlines(self._chunk)
                if lines and not lines[-1].endswith(b"\n"):
                    self._file.seek(-len(lines.pop()), os.SEEK_CUR)  # not whole yet
                if lines:
                    return lines
                self._read[self._inode] = self._file.tell()
                self._file.close()
                self._file = None
            if not self._todo and not self._relist():
                return []
            p = self._todo.pop(0)
            try:
                f = p.open("rb")
            except FileNotFoundError:  # rotated as we looked: the next listing has it
                continue
            # By what was opened, not what was listed: a rotation may come in between.
            self._inode = os.fstat(f.fileno()).st_ino
            f.seek(self._read.get(self._inode, 0))
            self._file, self.current = f, p

    def _relist(self) -> bool:
        """Whether another pass found files to read (new ones, or grown)."""
        if self._passes >= _READ_PASSES:
            return False
        self._passes += 1
        for p in usage_files(self.path):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            done = self._read.get(st.st_ino)
            if done is None or st.st_size > done:
                self._todo.append(p)
        return bool(self._todo)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def make_sink(cfg: Config) -> UsageSink:
    """Redis Stream (spooled on disk through outages) for `state: redis://`, else the
    local JSON-lines log."""
    if cfg.state_is_redis:
        from authz.state.usage.redis_sink import RedisUsageSink
        from authz.state.usage.trim import TrimPolicy

        return RedisUsageSink(cfg.state, cfg.data_dir / "spool", stream=USAGE_STREAM,
                              timeout_s=cfg.key_store.timeout_s,
                              seen_ttl_s=int(cfg.usage.dedup_ttl_s),
                              trim=TrimPolicy.from_config(cfg.usage),
                              trim_every_s=cfg.usage.trim_every_s,
                              lease_s=cfg.envoy.hold_lease_s)
    return JsonlUsageLog(cfg.data_dir, max_bytes=cfg.usage.local_max_bytes)


def load_records(cfg: Config) -> list[dict[str, Any]]:
    """Every usage record of the configured state backend, deduplicated by request_id:
    with usage.sink, the PostgreSQL archive and the stream's unexported tail."""
    if cfg.state_is_redis and cfg.usage.sink:
        import asyncio

        return asyncio.run(_load_archived(cfg))
    if cfg.state_is_redis:
        import asyncio

        from redis.exceptions import RedisError

        from authz.state.usage.redis_sink import read_stream

        try:
            stream = asyncio.run(read_stream(cfg.state, USAGE_STREAM))
        except (RedisError, OSError) as e:
            raise OSError(f"cannot read usage records from {redacted(cfg.state)}: {e}") from None
        return list(one_per_request(stream))
    return list(read_records(cfg.data_dir / USAGE_FILE))


async def _load_archived(cfg: Config) -> list[dict[str, Any]]:
    from authz.state.usage.query import every_record

    out: list[dict[str, Any]] = []
    try:
        async for page in every_record(cfg):
            out += page
    except Exception as e:  # asyncpg's and redis' errors: one line, URLs redacted
        raise OSError(f"cannot read usage records from {redacted(cfg.usage.sink or '')}: "
                      f"{type(e).__name__}: {e}") from None
    return out
