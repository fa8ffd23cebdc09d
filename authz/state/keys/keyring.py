"""The embedded key store: `<data_dir>/keys.json`, fingerprints only.

`tokenbooth keys ...` rewrites the file atomically (temp file + rename) under an
exclusive lock; a running server looks at it every 0.5 s and re-reads it when it
changed, so a created, updated or revoked key takes effect within a second, with no
restart.

The event loop never touches the file: each look (a stat) and each read (orjson and
pydantic: ~250 ms for 20,000 keys) runs in a daemon thread of its own, and the loop only
swaps the finished index in. A lookup is a dictionary read. A miss waits for a look that
began after it arrived, so a key created a moment ago by another process works at once
(rotation has no 401 window); misses share looks (one in flight, a new one at most every
`miss_gap_s`), so a flood of unknown keys costs a bounded number of stats and no read of
an unchanged file, and while a read hangs (a stalled mount) they fail closed after
`wait_s` (503, retryable) instead of holding Envoy's decision.

The file as last read or written is kept (`_Known`: its stamp, its records, each as
written), so that a key written, got or listed costs what changed, not the whole file
(operators tester: at 8,000 keys a create spent ~220 ms of the interpreter re-reading,
re-validating and re-dumping them all, and requests slowed meanwhile): an unchanged file
is not read again, a changed one is re-validated only where its records changed, and a
write dumps only the record it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import math
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import orjson
from pydantic import TypeAdapter, ValidationError

from authz.state.blocking import in_daemon_thread
from authz.state.keys.base import KeyExists, StoreUnavailable, updated
from authz.state.tasks import cancel_and_wait
from policy.keyrecord import KeyRecord

log = logging.getLogger("tokenbooth.keys")

KEYRING_FILE = "keys.json"
POLL_S = 0.5
# Misses start a look at most this often: what a flood of unknown keys can cost.
MISS_GAP_S = 0.05
# How long a miss waits for its look before failing closed (key_store.timeout_s).
WAIT_S = 0.5
# How long `close` waits for a look in flight (a read of 20,000 keys takes ~250 ms).
CLOSE_WAIT_S = 5.0
_RECORDS = TypeAdapter(list[KeyRecord])
_RECORD = TypeAdapter(KeyRecord)
# What tells that the file changed: mtime, ctime (a chmod or chown), inode, size.
Stamp = tuple[int, int, int, int]
ABSENT: Stamp = (0, 0, 0, 0)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Known:
    """The file as last read or written: its stamp, its records, and each record as it
    is written there (a JSON object), in the file's order. Never changed once made."""

    stamp: Stamp
    records: tuple[KeyRecord, ...]
    written: tuple[dict[str, object], ...]


@dataclass(frozen=True, slots=True)
class _Read:
    """What one look at the file found, numbered in the order the looks began (in any
    thread): a later one saw the file as new or newer, so an earlier one that ends last
    is not swapped in over it."""

    seq: int
    stamp: Stamp | None
    by_fp: dict[str, KeyRecord] | None = None  # None: unchanged, or not readable
    error: str | None = None  # why the file could not be read (last good keys stay)


class KeyringStore:
    def __init__(self, data_dir: Path, poll_s: float = POLL_S, *, wait_s: float = WAIT_S,
                 miss_gap_s: float = MISS_GAP_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = data_dir / KEYRING_FILE
        self._lock_path = data_dir / "keys.lock"
        self._poll_s = poll_s
        self._wait_s = wait_s
        self._miss_gap_s = miss_gap_s
        self._clock = clock
        self._by_fp: dict[str, KeyRecord] = {}
        self._stamp: Stamp | None = None
        self._damaged: Stamp | None = None  # unreadable: logged once, not read again
        # The failure last logged (each is logged once, a damaged file once per version).
        self._reported: tuple[Stamp | None, str] | None = None
        self._seq = itertools.count(1)  # next() is atomic: worker threads take numbers too
        self._applied = 0  # the number of the last look swapped in
        self._look: asyncio.Task[None] | None = None  # the look in flight
        self._looks_begun = 0
        self._looks_done = 0
        self._last_miss_look = -math.inf
        self._watch: asyncio.Task[None] | None = None
        self._known: _Known | None = None  # set from worker threads (one reference)

    # -- KeyStore ---------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.shield(self._begin_look())
        self._watch = asyncio.create_task(self._watch_loop())

    async def close(self) -> None:
        """Stop watching; a look in flight is waited for (at most `CLOSE_WAIT_S`): its
        thread, left running as the interpreter exits, could be stopped inside pydantic's
        compiled code, which aborts the process (operators tester: `keys update` exited
        134 with "FATAL: exception not rethrown" after saying it had updated the key).
        One that hangs (a stalled mount) is blocked in a read, where that is safe."""
        await cancel_and_wait(self._watch)
        if self._look is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._look), CLOSE_WAIT_S)
        await cancel_and_wait(self._look)

    async def find(self, fingerprint: str, secret: str) -> KeyRecord | None:
        record = self._by_fp.get(fingerprint)
        if record is not None:
            return record
        # Not known here: it may have been created a moment ago by another process. Wait
        # for a look that begins after this miss (not the poll's, begun before it).
        want = self._looks_begun + 1
        try:
            await asyncio.wait_for(self._looked(want), self._wait_s)
        except TimeoutError:
            raise StoreUnavailable(
                f"keyring {self.path} not read within {self._wait_s:g}s") from None
        return self._by_fp.get(fingerprint)

    async def _looked(self, want: int) -> None:
        """Return once look number `want` has ended; misses begin one at most every
        `miss_gap_s`, and every miss waiting meanwhile shares it."""
        while self._looks_done < want:
            if self._look is None:
                delay = self._last_miss_look + self._miss_gap_s - self._clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                    continue
                self._last_miss_look = self._clock()
            await asyncio.shield(self._begin_look())

    # -- KeyAdmin ---------------------------------------------------------------

    # File I/O (a lock another process may hold, an fsync) runs in a worker thread: the
    # admin API calls these on serve's event loop, which every request passes through.
    # The keys written are swapped in here at once, on the loop.

    async def create(self, record: KeyRecord) -> None:
        def add(records: list[KeyRecord]) -> tuple[None, bool]:
            if any(r.id == record.id or r.sha256 == record.sha256 for r in records):
                raise KeyExists(f"a key with id {record.id!r} already exists")
            records.append(record)
            return None, True

        await self._rewrite(add)

    async def get(self, key_id: str) -> KeyRecord | None:
        records = await asyncio.to_thread(self._read)
        return next((r for r in records if r.id == key_id), None)

    async def list_keys(self, org: str | None = None) -> list[KeyRecord]:
        records = await asyncio.to_thread(self._read)
        return [r for r in records if org is None or r.org == org]

    async def revoke(self, key_id: str) -> KeyRecord | None:
        return await self._modify(key_id, lambda r: r.model_copy(update={"status": "revoked"}))

    async def update(self, key_id: str, changes: Mapping[str, object]) -> KeyRecord | None:
        return await self._modify(key_id, lambda r: updated(r, changes))

    async def _modify(self, key_id: str, change: Callable[[KeyRecord], KeyRecord]
                      ) -> KeyRecord | None:
        """Replace one record (nothing is written if there is none, or `change` raises)."""
        def replace(records: list[KeyRecord]) -> tuple[KeyRecord | None, bool]:
            for i, r in enumerate(records):
                if r.id == key_id:
                    records[i] = change(r)
                    return records[i], True
            return None, False

        return await self._rewrite(replace)

    async def _rewrite(self, change: Callable[[list[KeyRecord]], tuple[T, bool]]) -> T:
        result, read = await asyncio.to_thread(self._locked, change)
        if read is not None:
            self._apply(read)
        return result

    # -- file handling (worker threads) ---------------------------------------------

    def _read(self) -> list[KeyRecord]:
        known = self._current()
        return [] if known is None else list(known.records)

    def _current(self) -> _Known | None:
        """The file as it is now (None: there is none); read again only if it changed."""
        try:
            stamp = _stamp(self.path.stat())
        except FileNotFoundError:
            return None
        known = self._known
        if known is not None and known.stamp == stamp:
            return known
        try:
            # Not blocking on a named pipe (key admin waited on one for good): only a
            # regular file is a keyring.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{self.path}: not a regular file")
            raw = f.read()
        return self._learn(_stamp(st), raw)

    def _learn(self, stamp: Stamp, raw: bytes) -> _Known:
        """The file's records from `raw` (ValueError if damaged), kept as the known file."""
        known = self._parse_known(raw, stamp)
        self._known = known
        return known

    def _parse(self, raw: bytes) -> list[KeyRecord]:
        """The records of `raw`; ValueError naming what is wrong, in words (pydantic's
        "1 validation error for list[KeyRecord]" named nothing)."""
        return list(self._parse_known(raw, ABSENT).records)

    def _parse_known(self, raw: bytes, stamp: Stamp) -> _Known:
        """`_parse`, validating only the records not known as they are written (by the
        last read or write): those unchanged are taken as they were."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"{self.path}: damaged keyring: not JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{self.path}: damaged keyring: expected a JSON object with "
                             f'"keys", found a {type(data).__name__}')
        items = data.get("keys", [])
        if not isinstance(items, list):
            self._validate(_RECORDS, items, ())
        prior = self._known
        seen: dict[object, tuple[dict[str, object], KeyRecord]] = (
            {} if prior is None else
            {w.get("sha256"): (w, r) for w, r in zip(prior.written, prior.records,
                                                     strict=True)})
        records: list[KeyRecord] = []
        written: list[dict[str, object]] = []
        for i, item in enumerate(items):
            hit = seen.get(item.get("sha256")) if isinstance(item, dict) else None
            if hit is not None and hit[0] == item:
                record, as_written = hit[1], hit[0]
            else:
                record = self._validate(_RECORD, item, (i,))
                as_written = record.model_dump(mode="json")
            records.append(record)
            written.append(as_written)
        return _Known(stamp, tuple(records), tuple(written))

    def _validate(self, adapter: TypeAdapter[T], value: object, at: tuple[int, ...]) -> T:
        try:
            return adapter.validate_python(value)
        except ValidationError as e:
            err = e.errors()[0]
            where = "keys" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                                     for p in (*at, *err["loc"]))
            raise ValueError(f"{self.path}: damaged keyring: {where}: "
                             f"{str(err['msg']).removeprefix('Value error, ')}") from None

    def _locked(self, change: Callable[[list[KeyRecord]], tuple[T, bool]]
                ) -> tuple[T, _Read | None]:
        """Read-modify-write under an exclusive lock; the new file replaces the old at
        once. Returns `change`'s result and, when it wrote, the keys as written. Only the
        records `change` replaced or added are dumped: the rest are written as known."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            known = self._current()
            records = [] if known is None else list(known.records)
            result, write = change(records)
            if not write:
                return result, None
            as_written = {} if known is None else {
                id(r): w for r, w in zip(known.records, known.written, strict=True)}
            written = [as_written.get(id(r)) or r.model_dump(mode="json") for r in records]
            data = orjson.dumps({"keys": written}, option=orjson.OPT_INDENT_2)
            tmp = self.path.with_suffix(".tmp")
            owner = self._owner()
            tfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            if owner is not None:
                os.fchown(tfd, *owner)
            with os.fdopen(tfd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            # Still under the lock: no other writer moved the file on since.
            stamp = _stamp(self.path.stat())
            self._known = _Known(stamp, tuple(records), tuple(written))
            return result, _Read(next(self._seq), stamp, {r.sha256: r for r in records})
        finally:
            os.close(fd)

    def _owner(self) -> tuple[int, int] | None:
        """The owner the new keyring must have for the services to read it (mode 0600):
        the old one's (root gives the file to it; None: ours already). A user other than
        its owner cannot, and is refused: its keyring would go unread, the services
        keeping the keys they had (security review: a `sudo keys revoke` said revoked,
        and the key worked on). A first keyring goes to the data_dir's owner when root
        writes it (a volume's owner may be root: then nobody's in particular)."""
        me = os.geteuid()
        try:
            st = self.path.stat()
        except FileNotFoundError:
            st = self.path.parent.stat()
            return (st.st_uid, st.st_gid) if me == 0 and st.st_uid != 0 else None
        if st.st_uid == me:
            return None
        if me == 0:
            return st.st_uid, st.st_gid
        raise PermissionError(
            f"{self.path} belongs to user id {st.st_uid}, the user the services run as: "
            f"run `keys` as that user (a keyring written as user id {os.geteuid()} would "
            "go unread)")

    def _scan(self, known: tuple[Stamp | None, Stamp | None]) -> _Read:
        """Look at the file; read and index it if its stamp is not in `known`."""
        seq = next(self._seq)
        try:
            stamp = _stamp(self.path.stat())
        except FileNotFoundError:
            stamp = ABSENT
        except OSError as e:
            return _Read(seq, None, error=f"{self.path}: {e.strerror or e}")
        if stamp in known:
            return _Read(seq, stamp)
        if stamp == ABSENT:
            if self._by_fp:  # it was there: deleted or moved, not a keyring with no keys
                return _Read(seq, stamp, error=(
                    f"{self.path}: gone (deleted or moved); put it back (from a backup): "
                    "a keyring written anew (`tokenbooth keys create`) holds only the keys "
                    "created then, and every other key is refused"))
            return _Read(seq, stamp, {})
        last = self._known
        if last is not None and last.stamp == stamp:  # read or written here since
            return _Read(seq, stamp, {r.sha256: r for r in last.records})
        try:
            with self.path.open("rb") as f:  # a named pipe waits here for its writer
                st = os.fstat(f.fileno())
                raw = f.read()
                if not stat.S_ISREG(st.st_mode):  # a pipe's times move as it is written
                    st = os.fstat(f.fileno())
            stamp = _stamp(st)
            records = self._learn(stamp, raw).records
        except FileNotFoundError:  # replaced between the stat and the open: look again
            return _Read(seq, None)
        except (ValueError, OSError) as e:  # damaged, or unreadable (its owner, mode)
            return _Read(seq, stamp, error=str(e))
        return _Read(seq, stamp, {r.sha256: r for r in records})

    # -- on the event loop -------------------------------------------------------------

    def _begin_look(self) -> asyncio.Task[None]:
        """The look in flight, or a new one."""
        if self._look is None:
            self._looks_begun += 1
            self._look = asyncio.create_task(self._run_look(self._looks_begun))
        return self._look

    async def _run_look(self, number: int) -> None:
        known = (self._stamp, self._damaged)
        try:
            self._apply(await in_daemon_thread(lambda: self._scan(known),
                                               "tokenbooth-keyring-read"))
        except Exception as e:  # never the end of the watch: revocations must land
            log.error("keyring not reloaded: %s: %s", type(e).__name__, e)
        finally:
            self._looks_done = number
            self._look = None

    def _apply(self, read: _Read) -> None:
        """Swap in what a look or a write found, unless a later one is already in."""
        if read.seq < self._applied:
            return
        self._applied = read.seq
        if read.error is not None:
            if (read.stamp, read.error) != self._reported:
                log.error("keyring not reloaded, keeping the last good one: %s", read.error)
                self._reported = (read.stamp, read.error)
            if read.stamp is not None:
                self._damaged = read.stamp
        elif read.by_fp is not None and read.stamp is not None:
            self._stamp, self._by_fp, self._reported = read.stamp, read.by_fp, None

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            await asyncio.shield(self._begin_look())


def _stamp(st: os.stat_result) -> Stamp:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size)
