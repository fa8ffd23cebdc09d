"""Usage records in a Redis Stream, durable through Redis outages.

`write()` never touches the network: it appends one JSON line to an on-disk
spool and wakes a background task that drains the spool to Redis in order.

Spool layout in `spool_dir` (one live sink per directory):
  usage-<seq>.spool  segments of JSON lines, <seq> a zero-padded counter; each
                     process start opens a new segment, and the written one is
                     rotated once it reaches `segment_bytes`
  usage.offset       "<seq> <byte offset>": the first record not yet delivered,
                     replaced atomically (temp file + rename) after each batch
  usage.lock         flock'ed by the live sink
  usage.stopped      the last process on it stopped whole (see `previous_records`)
  usage-<seq>.sent   the last segment delivered in full (one), kept for the next start

A segment read to its end, other than the one being written, is retired: renamed
`.sent`, and the one kept before it deleted. At its start a sink reads the last records
its spool's previous process wrote (`previous_records`), delivered or not, for the
settlements that process may not have made (authz/state/limits/resettle.py); the kept
segment holds them when that process rotated its segment just before it stopped.
Each batch goes to Redis by one Lua call: per record, the seen key
`<stream>:seen:<request_id>` (`seen_ttl_s`, the redelivery horizon) and, only when it
was unset, `XADD <stream> * data <json>`; a real record also passes a seen key that
says `lost`. A real record's seen key says what its request owes its holds
(policy/recorded.py) and lives until its holds' leases have ended (at least): a replica
killed between its record and its settlements leaves the holds to every replica's
lost-hold sweep, which settles them at the record's cost instead of charging them in
full (authz/state/limits/redis_limits.py). A batch redelivered after a crash (offset
not yet saved) or a retry is thereby deduplicated; a duplicate after the seen key
expired is dropped by readers.
After deliveries, at most every `trim_every_s`, the stream is trimmed (trim.py).
For Redis Cluster, give the stream a hash tag (`tb:{usage}`) so that the stream and
its seen keys share a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from authz.state.keys.redis_store import connect
from authz.state.lines import Backlog, open_appending
from authz.state.tasks import cancel_and_wait
from authz.state.usage.records import ended_at, records_backwards
from authz.state.usage.trim import TrimPolicy, ensure_groups, trim
from policy.recorded import owes, seen_mark
from policy.usage import LOST, UsageRecord

log = logging.getLogger("tokenbooth.records")

# A delivered record's seen key lives this long by default (config: usage.dedup_ttl_s):
# the spool's redelivery horizon. Later duplicates are dropped by readers (request_id).
SEEN_TTL_S = 600
# A real record's seen key outlives its holds' leases by this much: a sweep runs every
# second, and a claimed hold it failed to settle returns to the sweep after 30 s.
SWEEP_MARGIN_S = 60
OFFSET_FILE = "usage.offset"
# Present while no process writes to the spool after one stopped whole (its records all
# settled or their settlements spooled): `previous_records` then has none to give.
STOPPED_FILE = "usage.stopped"
LOCK_FILE = "usage.lock"
_BATCH = 256  # records per pipeline round trip
_CHUNK = 1 << 20  # bytes read from the spool at a time; a record must be smaller
# Under load, records arrive one by one: waiting this long after a wake-up gathers them
# into one read of the spool and one pipeline (profiled: per-record reads and offset
# writes were a third of the service's CPU).
_LINGER_S = 0.01
# The read offset is saved at most this often (and on close). One that lags only
# redelivers records, and those are deduplicated by request_id.
_OFFSET_EVERY_S = 0.5
# KEYS: the stream, then one seen key per record. ARGV: whether seen keys are kept ('0':
# none, every record added), then per record its kind ('lost', or a real one's mark:
# `policy.recorded.seen_mark`, or '1'), its JSON and its seen key's ttl in seconds.
# The first record of a request_id is added; a real one is added after a `lost` one too
# (a hold charged as lost whose late settlement came after all: readers prefer it).
# One call per batch: a million records go in ~4,000 calls, not a million.
_DELIVER = """
local keep = tonumber(ARGV[1]) > 0
local added = 0
for i = 2, #KEYS do
  local kind, data, ttl = ARGV[3 * i - 4], ARGV[3 * i - 3], ARGV[3 * i - 2]
  local seen = false
  if keep then seen = redis.call('GET', KEYS[i]) end
  if seen == false or (seen == 'lost' and kind ~= 'lost') then
    if keep then redis.call('SET', KEYS[i], kind, 'EX', ttl) end
    redis.call('XADD', KEYS[1], '*', 'data', data)
    added = added + 1
  end
end
return added
"""
_DELIVER_SHA = hashlib.sha1(_DELIVER.encode()).hexdigest()  # noqa: S324 (Redis' script id)


# A record on its way: request_id, seen key value, seen key ttl (s), JSON.
Delivery = tuple[str, str, int, bytes]


def seen_prefix(stream: str) -> str:
    """The seen keys of a stream's records are this plus the request_id."""
    return f"{stream}:seen:"


def _segment(spool_dir: Path, seq: int) -> Path:
    return spool_dir / f"usage-{seq:012d}.spool"


def _sent(spool_dir: Path, seq: int) -> Path:
    return spool_dir / f"usage-{seq:012d}.sent"


def _segments(spool_dir: Path, suffix: str = ".spool") -> list[int]:
    seqs = []
    for p in spool_dir.glob(f"usage-*{suffix}"):
        with contextlib.suppress(ValueError):
            seqs.append(int(p.stem.removeprefix("usage-")))
    return sorted(seqs)


def _retire(spool_dir: Path, seq: int) -> None:
    """A delivered segment becomes the one kept (`.sent`), unless a later one is kept
    already; the kept one it replaces is deleted."""
    kept = _segments(spool_dir, ".sent")
    if kept and kept[-1] > seq:
        _segment(spool_dir, seq).unlink(missing_ok=True)
        return
    with contextlib.suppress(FileNotFoundError):
        os.replace(_segment(spool_dir, seq), _sent(spool_dir, seq))
    for s in kept:
        if s != seq:
            _sent(spool_dir, s).unlink(missing_ok=True)


def recent_records(files: Iterable[Path], horizon_s: float, limit: int
                   ) -> list[dict[str, Any]]:
    """The real records (status not `lost`) last written to `files` (given newest first):
    those that ended within `horizon_s` of the latest end among them, `limit` at most,
    newest first. A record is written when its request ends, so ends go up through a
    spool but for a record written a little after its end (a prompt recount, a meter
    report): the scan reads on past the horizon, and stops at twice it."""
    seen: list[tuple[dict[str, Any], float]] = []
    latest = float("-inf")
    for rec in (r for path in files for r in records_backwards(path)):
        end = ended_at(rec)
        if rec.get("status") == LOST or end is None:
            continue  # (a lost record: written by a sweep, whatever its request's end)
        latest = max(latest, end)
        if end < latest - 2 * horizon_s or len(seen) >= limit:
            break
        seen.append((rec, end))
    return [rec for rec, end in seen if end >= latest - horizon_s]


class RedisUsageSink:
    def __init__(
        self,
        url: str,
        spool_dir: Path,
        *,
        stream: str = "tb:usage",
        max_spool_bytes: int = 256 << 20,
        timeout_s: float = 0.5,
        segment_bytes: int = 8 << 20,
        drain_s: float = 2.0,
        seen_ttl_s: int = SEEN_TTL_S,
        trim: TrimPolicy | None = None,
        trim_every_s: float = 10.0,
        lease_s: Callable[[bool], float] | None = None,
    ) -> None:
        spool_dir.mkdir(parents=True, exist_ok=True)
        self.spool_dir = spool_dir
        # One live sink per spool: two would deliver and advance the same offset.
        self._lock = os.open(spool_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise RuntimeError(f"usage spool {spool_dir} is in use by another tokenbooth "
                               "process (each replica needs a data_dir of its own)") from None
        self.stream = stream
        self._seen_ttl_s = seen_ttl_s
        # A hold's lease (stream or not), as admission gives it: a real record's seen key
        # says what its request owes and outlives its holds' leases (None: neither).
        self._lease_s = lease_s
        self._trim, self._trim_every_s = trim, trim_every_s
        self._trimmed_at = -trim_every_s  # monotonic time of the last trim
        self._groups_made = False
        self._max = max_spool_bytes
        self._segment_bytes = segment_bytes
        self._timeout_s = timeout_s
        self._drain_s = drain_s
        self._redis: aioredis.Redis = connect(url, timeout_s)
        self._rseq, self._roff = self._load_offset()
        for s in _segments(spool_dir):
            if s < self._rseq:  # delivered, left by a crash before it was retired
                _retire(spool_dir, s)
        seqs = [s for s in _segments(spool_dir) if s >= self._rseq]
        if not seqs or seqs[0] > self._rseq:  # our segment is gone: start at the next one
            self._rseq, self._roff = (seqs[0] if seqs else self._rseq), 0
        # Undelivered bytes, for the bound on the spool.
        self.pending = sum(_segment(spool_dir, s).stat().st_size for s in seqs) - self._roff
        self._wseq = max([self._rseq, *seqs]) + 1  # never append after a crash's partial line
        self._first_wseq = self._wseq  # segments before it: earlier processes'
        self._backlog = Backlog(f"usage spool {spool_dir}")
        self._wfd = self._open_segment(self._wseq)
        self._wsize = 0
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()  # aclose(): leave once drained or on the first error
        self._stop = asyncio.Event()  # leave at the next checkpoint
        self._task: asyncio.Task[None] | None = None
        self._offset_saved_at = 0.0  # monotonic time of the last offset write

    # -- UsageSink ----------------------------------------------------------------

    def write(self, record: UsageRecord) -> None:
        line = orjson.dumps(record.to_dict(), option=orjson.OPT_APPEND_NEWLINE)
        if self._wfd < 0 or self.pending + len(line) > self._max:
            # Never silently: the whole record goes to the log.
            log.error("usage spool %s (%d bytes undelivered), record not stored: %s",
                      "closed" if self._wfd < 0 else "full", self.pending, line.decode().rstrip())
            return
        if self._wsize >= self._segment_bytes:
            os.close(self._wfd)
            self._wseq += 1
            self._wfd = self._open_segment(self._wseq)
            self._wsize = 0
        try:  # one write() of one whole line, as JsonlUsageLog; a full disk: kept in memory
            self._backlog.append(self._wfd, line)
        except OSError as e:  # not even that: never silently
            log.error("usage spool write failed (%s), record not stored: %s", e, line.decode())
            return
        self._wsize += len(line)
        self.pending += len(line)
        self._wake.set()

    def close(self) -> None:
        """Stops writing; the spool keeps what is undelivered for the next start."""
        self._stop.set()
        self._closing.set()
        self._wake.set()
        if self._wfd >= 0:
            if not self._backlog.flush(self._wfd):
                for line in self._backlog.drop():  # never silently: each in the log
                    log.error("usage spool write failed, record not stored: %s",
                              line.decode().rstrip())
            with contextlib.suppress(OSError):  # a lagging offset only redelivers
                self._save_offset()
            os.close(self._wfd)
            os.close(self._lock)  # releases the flock
            self._wfd = -1

    def previous_records(self, horizon_s: float, limit: int) -> list[dict[str, Any]]:
        """The real records the previous process on this spool wrote last, delivered or
        not (`recent_records` of its segments and the kept one). Before `start`: the
        drain then retires those segments. Reads files: call it in a thread."""
        if self._task is not None:
            raise RuntimeError("previous_records() must be called before start()")
        if (self.spool_dir / STOPPED_FILE).exists():
            return []  # it stopped whole: every record's settlement made (or spooled)
        files = [_segment(self.spool_dir, s) for s in _segments(self.spool_dir)
                 if s < self._first_wseq]
        files += [_sent(self.spool_dir, s) for s in _segments(self.spool_dir, ".sent")]
        files.sort(key=lambda p: int(p.stem.removeprefix("usage-")), reverse=True)
        return recent_records(files, horizon_s, limit)

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        # From now on this process writes records: if it dies, the next start looks.
        (self.spool_dir / STOPPED_FILE).unlink(missing_ok=True)
        self._task = asyncio.create_task(self._drain_loop(), name="usage-drain")

    def mark_stopped(self) -> None:
        """Say that this process stopped whole (called at the end of its stop, after its
        settlements): the next start on this spool has no settlement to make again."""
        with contextlib.suppress(OSError):  # then the next start only looks again
            (self.spool_dir / STOPPED_FILE).touch()

    async def aclose(self) -> None:
        """Drains for at most `drain_s`, then stops; the spool keeps the rest."""
        self._closing.set()
        self._wake.set()
        task = self._task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), self._drain_s)
            except TimeoutError:
                # Stop by an event, not a cancel inside a redis-py call; the call is bounded.
                self._stop.set()
                self._wake.set()
                try:
                    await asyncio.wait_for(asyncio.shield(task), 2 * self._timeout_s + 1)
                except TimeoutError:
                    await cancel_and_wait(task)
        self.close()
        await self._redis.aclose()

    # -- draining -------------------------------------------------------------------

    async def _drain_loop(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            self._wake.clear()  # before reading, so a write from now on wakes us again
            if len(self._backlog) and self._wfd >= 0:  # records a full disk refused
                self._backlog.flush(self._wfd)
            batch, end = self._read_batch()
            if not batch:
                if end != self._roff:  # only damaged lines
                    self._advance(end)
                    continue
                if self._closing.is_set():
                    self._save_offset()
                    return
                if len(self._backlog):  # try the disk again each second
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), 1.0)
                    continue
                await self._wake.wait()
                if not self._closing.is_set():
                    await asyncio.sleep(_LINGER_S)
                continue
            try:
                await self._deliver(batch)
            except (RedisError, OSError) as e:
                if self._closing.is_set():
                    log.warning("usage records stay spooled: Redis unavailable (%s)", e)
                    self._save_offset()
                    return
                log.warning("usage records: Redis unavailable (%s), retrying in %.1fs", e, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), backoff)
                backoff = min(2.0, backoff * 2)
                continue
            backoff = 0.2
            self._advance(end)
            await self._maybe_trim()

    def _read_batch(self) -> tuple[list[Delivery], int]:
        """Complete lines from the read position: their deliveries and their end."""
        while True:
            path = _segment(self.spool_dir, self._rseq)
            try:
                with path.open("rb") as f:
                    f.seek(self._roff)
                    data = f.read(_CHUNK)
            except FileNotFoundError:
                data = b""
            cut = data.rfind(b"\n") + 1
            if cut == 0 and self._rseq < self._wseq:
                if data:  # a partial last line, left by a crash mid-write
                    log.warning("%s: skipping a damaged usage line at the end", path)
                    return [], self._roff + len(data)
                self._next_segment()
                continue
            break
        out: list[Delivery] = []
        pos = self._roff
        now = time.time()
        for line in data[:cut].split(b"\n")[:-1]:
            if len(out) == _BATCH:
                break
            pos += len(line) + 1
            if not line.strip():  # after a torn line (a full disk): see authz/state/lines.py
                continue
            try:
                rec = orjson.loads(line)
                rid = rec.get("request_id")
            except (orjson.JSONDecodeError, AttributeError):
                rid = None
            if isinstance(rid, str) and rid:
                out.append((rid, *self._seen_as(rec, now), line))
            else:
                log.warning("%s: skipping a damaged usage line at byte %d", path, pos)
        return out, pos

    def _seen_as(self, rec: dict[str, Any], now: float) -> tuple[str, int]:
        """A record's seen key: its value (`lost`, what a real one's request owes, or `1`
        where that cannot be read) and its ttl (a real one's: past its holds' leases)."""
        if rec.get("status") == LOST:
            return "lost", self._seen_ttl_s
        if self._lease_s is None or self._seen_ttl_s <= 0:
            return "1", self._seen_ttl_s
        try:
            o = owes(rec, self._lease_s)
        except ValueError:
            return "1", self._seen_ttl_s
        return seen_mark(o), max(self._seen_ttl_s, math.ceil(o.latest - now) + SWEEP_MARGIN_S)

    async def _deliver(self, batch: list[Delivery]) -> None:
        await deliver(self._redis, self.stream, batch, self._seen_ttl_s)

    async def _maybe_trim(self) -> None:
        """Every `trim_every_s`, after a delivery: the stream's trim (see trim.py). A
        failure only delays it."""
        if self._trim is None or time.monotonic() - self._trimmed_at < self._trim_every_s:
            return
        self._trimmed_at = time.monotonic()
        try:
            if not self._groups_made:  # before any trim, so no group misses a record
                await ensure_groups(self._redis, self.stream, self._trim.groups)
                self._groups_made = True
            await trim(self._redis, self.stream, self._trim)
        except (RedisError, OSError) as e:
            log.warning("usage stream trim failed (%s); retrying later", e)

    def _advance(self, end: int) -> None:
        self.pending -= end - self._roff
        self._roff = end
        if time.monotonic() - self._offset_saved_at >= _OFFSET_EVERY_S:
            self._save_offset()

    def _next_segment(self) -> None:
        old = self._rseq
        self._rseq, self._roff = old + 1, 0
        for s in _segments(self.spool_dir):  # skip a gap in the numbering
            if s > old:
                self._rseq = s
                break
        self._save_offset()  # before it is retired: a crash in between leaves a stale file
        _retire(self.spool_dir, old)

    # -- files ----------------------------------------------------------------------

    def _open_segment(self, seq: int) -> int:
        """A spool segment to append to (one a crash left torn: the next line on its own)."""
        fd, torn = open_appending(_segment(self.spool_dir, seq))
        self._backlog.reopened(torn)
        return fd

    def _load_offset(self) -> tuple[int, int]:
        try:
            seq, off = (self.spool_dir / OFFSET_FILE).read_text().split()
            return int(seq), int(off)
        except (FileNotFoundError, ValueError):
            return 0, 0

    def _save_offset(self) -> None:
        # No fsync: an offset that goes back after a power loss only redelivers
        # records, and those are deduplicated.
        tmp = self.spool_dir / (OFFSET_FILE + ".tmp")
        tmp.write_text(f"{self._rseq} {self._roff}\n")
        os.replace(tmp, self.spool_dir / OFFSET_FILE)
        self._offset_saved_at = time.monotonic()


async def deliver(client: aioredis.Redis, stream: str, batch: Sequence[Delivery],
                  seen_ttl_s: int = SEEN_TTL_S) -> int:
    """Adds a batch of deliveries to the stream in one script call, each unless its seen
    key says it is there already (`seen_ttl_s` 0: no seen keys); the number added."""
    keys = [stream, *(seen_prefix(stream) + rid for rid, _, _, _ in batch)]
    args: list[str | bytes | int] = [int(seen_ttl_s)]
    for _, kind, ttl, data in batch:
        args += [kind, data, max(1, int(ttl))]
    for attempt in (0, 1):
        try:
            return int(await client.evalsha(_DELIVER_SHA, len(keys), *keys, *args))
        except NoScriptError:
            if attempt:
                raise
        except ResponseError as e:  # NOSCRIPT may come as a plain error
            if attempt or "NOSCRIPT" not in str(e):
                raise
        # After a Redis restart: load the script and send the batch again. Records
        # already added are deduplicated by their seen key.
        await client.script_load(_DELIVER)
    return 0


async def read_stream(url: str, stream: str = "tb:usage") -> list[dict[str, Any]]:
    """Every record in the stream, in order."""
    client = connect(url, 5.0)
    try:
        entries = await client.xrange(stream, "-", "+")
    finally:
        await client.aclose()
    out: list[dict[str, Any]] = []
    for _id, fields in entries or []:
        rec = orjson.loads((fields or {})[b"data"])
        if isinstance(rec, dict):
            out.append(rec)
    return out


async def ensure_group(url: str, group: str, stream: str = "tb:usage") -> None:
    """Creates a consumer group reading the stream from its start (if it has none yet)."""
    client = connect(url, 5.0)
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise
    finally:
        await client.aclose()
