"""The embedded limit store made durable: `state: memory` limits survive a restart.

A `MemoryLimitStore` whose every state change is also appended to a write-ahead
journal, `<data_dir>/limits.journal`: one line per allowed admission (a denial changes
nothing), per settlement that settled something, per sweep that claimed lost holds and
per `consume`, with the transition's inputs (limits, ask, now). Each line is one
unbuffered write() to an O_APPEND descriptor, in the page cache before the caller sees
the result: it survives the process being killed (not a power loss, which may lose the
last seconds).

Compaction keeps the journal small: past `compact_bytes` the journal is rotated, the
state is serialised at once and written in a thread to `limits.snapshot` (temp file,
fsync, rename), then the rotated journal is removed. Every line carries a sequence
number and the snapshot the number of the last line it includes, so replay is
idempotent.

At start: load the snapshot, replay the journals through the same transitions (a torn
or damaged line is skipped; an admission is taken again without its checks deciding
anew: it was allowed), so the state is what it was. The requests still held then
were in flight when the process died; each is settled at the time of the last journal
line: at its recorded usage if the usage log has its record (it ended, its settlement
never reached the journal), else at its full hold, with one `lost` record (`on_lost`,
for holds that carry record material). A sweep replayed from the journal whose lost
records are missing from the usage log gets them too. Then a fresh snapshot, so a
second restart repeats nothing; a crash between the records and the snapshot is caught
by the same search of the usage log, so no record is written twice.
`<data_dir>/limits.lock` keeps a second process off the same state.

Measured with bench/durable_state.py on the 2-core dev VM (CPU µs per admit + settle,
median of 5 rounds of 20,000, asks with record material): plain memory 11-16; this
journal 20 (+4 to 9, compaction included); SQLite in WAL mode, the state in tables and
one transaction per admit and per settle: synchronous=OFF 79-82, =NORMAL 99-111.
Recovery replays ~70,000 lines a second (a full 8 MiB journal: ~0.4 s). A snapshot
serialises the state on the event loop: ~15 ms for 1,000 busy keys. Rebuilding from
the usage log alone would cost nothing per request, but cannot restore the holds in
flight, the token buckets or the request rates. Chosen: the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import types
import typing
from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import orjson

from authz.state.limits.base import LimitStoreNotDurable
from authz.state.limits.codec import ask_from
from authz.state.limits.memory import MemoryLimitStore
from authz.state.lines import TornLine, open_appending
from authz.state.usage.records import (
    USAGE_FILE,
    JsonlUsageLog,
    ended_at,
    records_backwards,
    usage_files,
)
from policy.admission import KeyState, Ledger, Settled, lost_record, settled
from policy.config import Config
from policy.limits import WINDOW_S, Ask, Decision, Limits, usd_to_nano
from policy.usage import LOST

log = logging.getLogger("tokenbooth.limits")

JOURNAL_FILE = "limits.journal"
SNAPSHOT_FILE = "limits.snapshot"
LOCK_FILE = "limits.lock"
COMPACT_BYTES = 8 << 20  # ~20k requests of journal between snapshots
RETRY_S = 5.0  # after a failed write, how soon a snapshot is tried again
READ_TRIES = 5  # a reader's attempts at a snapshot and journals that fit together
RECORD_SLACK_S = 120.0  # how far before a hold's admission the usage log is searched
ORG_PREFIX = "org:"  # an org's holds are kept under the pseudo-key `org:<name>`
NO_LIMITS = Limits()  # settles a dead request without giving tokens back

# Called with the Ask of each hold charged as lost at start that carries record
# material (`Ask.record`); writes its usage record (`policy.admission.lost_record`).
OnLost = Callable[[Ask], None]
# A settlement's journal line after its sequence number and op: now, limits, key id,
# request id, period, used tokens, cost nano-USD.
_SettleRow = tuple[float, list[Any], str, str, str, int, int]


def _limits_row(limits: Limits) -> list[Any]:
    return [limits.rpm, limits.tpm, limits.max_concurrent, limits.budget_nano,
            limits.budget_period]


def _settle_ask(key_id: str, request_id: str, period: str) -> Ask:
    """A settlement's Ask on replay: settle reads only its ids and period."""
    return Ask(request_id, key_id, "", 0, 0, period, 1.0)


class DurableMemoryLimitStore:
    """The memory store with a journal and snapshots in `data_dir` (see the module)."""

    def __init__(self, data_dir: Path, *, on_lost: OnLost | None = None,
                 window_s: float = WINDOW_S, compact_bytes: int = COMPACT_BYTES,
                 records_waiting: Callable[[], bool] | None = None) -> None:
        self._dir = data_dir
        self._on_lost = on_lost
        # Whether the usage log keeps records in memory that the disk refused (it tries
        # them again first): their settlements stay out of the journal meanwhile.
        self._records_waiting = records_waiting
        self._withheld: list[_SettleRow] = []
        self._compact_bytes = compact_bytes
        self._mem = MemoryLimitStore(window_s=window_s)
        self._seq = 0  # the last sequence number given out
        self._t = 0.0  # the latest `now` journaled
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._jbytes = 0
        self._broken = False  # a journal write failed: snapshot as soon as possible
        self._lost_seq = 0  # the last journal line that failed to land
        self._torn = TornLine()
        self._next_try = 0.0
        self._compacting: asyncio.Future[None] | None = None

    @property
    def journal_path(self) -> Path:
        return self._dir / JOURNAL_FILE

    # -- the LimitStore protocol ---------------------------------------------------

    async def start(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            swept = await self.load()
            await self._settle_dead(swept)
            try:
                self._compact_now()
            except OSError as e:  # a full disk: the journal still holds everything
                raise OSError(f"{self._dir}: cannot write the limit state ({e.strerror or e}):"
                              " free space there and start again; nothing is lost (the "
                              "journal keeps it)") from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._compacting is not None:
            with contextlib.suppress(OSError):
                await self._compacting
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self._compact_now()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    async def admit(self, limits: Limits, ask: Ask, now: float, take: bool = True
                    ) -> Decision:
        if not take:  # a look changes nothing: nothing to journal
            return await self._mem.admit(limits, ask, now, take=False)
        if self._withholding():
            # Usage records wait in memory for a full disk: a request admitted now could
            # end with neither its record nor its charge on disk, so none is (503).
            raise LimitStoreNotDurable(f"usage records wait for the disk in {self._dir} "
                                       "(is it full?)")
        if self._broken:
            # A journal line was lost (a full disk): nothing new is held until a snapshot
            # makes the state durable again, or a restart would forget it (and its spend).
            self._compact_soon()
            if self._broken:
                raise LimitStoreNotDurable(f"the limits journal in {self._dir} cannot be "
                                           "written (is the disk full?)")
        d = await self._mem.admit(limits, ask, now)
        if d.allowed:
            self._seq += 1
            if not self._append(orjson.dumps([self._seq, "a", now, _limits_row(limits), ask],
                                             option=orjson.OPT_APPEND_NEWLINE), now,
                                compact=False):
                # Not journaled: undone (a hold a restart would forget is never served),
                # then the snapshot that makes the state durable again, without it.
                await self._mem.settle(limits, dataclasses.replace(ask, record=None), 0, 0,
                                       now)
                self._compact_soon()
                raise LimitStoreNotDurable(f"the limits journal in {self._dir} cannot be "
                                           "written (is the disk full?)")
        return d

    async def release(self, limits: Limits, ask: Ask, admitted: float, now: float
                      ) -> Settled:
        if self._mem.held_since_other(ask, admitted):  # a retry's: it stays
            return settled(ask, 0, 0, applied=False)
        return await self.settle(limits, ask, 0, 0, now)  # journaled

    async def settle(self, limits: Limits, ask: Ask, used_tokens: int, cost_nano: int,
                     now: float) -> Settled:
        done = await self._mem.settle(limits, ask, used_tokens, cost_nano, now)
        if done.applied:
            row: _SettleRow = (now, _limits_row(limits), ask.key_id, ask.request_id,
                               ask.period, used_tokens, cost_nano)
            if self._withholding():
                if not self._withheld:
                    log.warning("usage records wait for the disk: their settlements stay "
                                "out of the limits journal until they are written (a kill "
                                "meanwhile charges each its record, or its hold with a "
                                "`lost` record)", extra={"path": str(self.journal_path)})
                self._withheld.append(row)
            else:
                self._journal_settle(row)
        return done

    def _journal_settle(self, row: _SettleRow) -> None:
        self._seq += 1
        self._append(orjson.dumps([self._seq, "s", *row], option=orjson.OPT_APPEND_NEWLINE),
                     row[0])

    def _withholding(self) -> bool:
        """Whether usage records wait in memory for the disk (a disk-full usage log):
        then settlements stay out of the journal, snapshots wait and admissions are
        refused, since a charge made durable now would outlive its record at a kill (the
        restart charged the request with no record at all). Held back, a kill leaves the
        request in flight for the restart, which finds its record if it was written, else
        charges its hold with a `lost` one. Once the records are written, the settlements
        held back are journaled, in order (no admission came between: none could reuse
        a request id whose settlement is held back)."""
        if self._records_waiting is not None and self._records_waiting():
            return True
        if self._withheld:
            rows, self._withheld = self._withheld, []
            for row in rows:
                self._journal_settle(row)
        return False

    def admitted_under(self, ask: Ask) -> str | None:
        return None  # the journal keeps its state: nothing can go missing under it

    def admitted_under_was(self, ask: Ask, mark: str) -> None:
        return None

    async def sweep(self, now: float) -> list[Ask]:
        self._check_files()
        if self._withheld:
            self._withholding()
        lost = await self._mem.sweep(now)
        if lost:
            self._seq += 1
            self._append(orjson.dumps([self._seq, "w", now], option=orjson.OPT_APPEND_NEWLINE),
                         now)
        return lost

    async def consume(self, limits: Limits, key_id: str, requests: int, tokens: int,
                      now: float, batch_id: str = "") -> None:
        if batch_id and self._mem.consumed(batch_id):
            return
        if self._withheld:
            self._withholding()
        await self._mem.consume(limits, key_id, requests, tokens, now, batch_id)
        self._seq += 1
        self._append(orjson.dumps([self._seq, "c", now, _limits_row(limits), key_id,
                                   requests, tokens], option=orjson.OPT_APPEND_NEWLINE), now)

    async def budget(self, key_id: str, org: str, period: str, now: float) -> tuple[int, int]:
        return await self._mem.budget(key_id, org, period, now)

    # -- the journal ---------------------------------------------------------------

    def _append(self, line: bytes, now: float, compact: bool = True) -> bool:
        """One write() of one whole line; False if it did not land. A failure is logged,
        never raised: the state in memory is right, and the next snapshot makes it
        durable again (until then `admit` refuses). `compact=False`: after a failure the
        caller changes the state first, then snapshots."""
        self._t = max(self._t, now)
        if self._fd is None:
            return True
        ok = True
        try:
            self._torn.append(self._fd, line)  # a torn line never swallows the next
            self._jbytes += len(line)
        except OSError as e:
            if not self._broken:
                log.error("limits journal write failed: %s", e,
                          extra={"path": str(self.journal_path)})
            self._broken = True
            self._lost_seq = self._seq  # a snapshot of this seq or later restores it
            ok = False
        if (ok or compact) and (self._jbytes >= self._compact_bytes or self._broken):
            self._compact_soon()
        return ok

    def _check_files(self) -> None:
        """The journal or the snapshot deleted or moved while we run (by hand, a cleanup
        job): a restart would forget what they held (storage tester: $1.96 of spend gone
        after `rm limits.journal`). The state in memory is whole: a new journal, and a
        snapshot at once; until it lands nothing new is held (as after a lost line).
        Every sweep (a second): two stats."""
        if self._fd is None or self._compacting is not None or self._broken:
            return
        try:
            ours = os.stat(self.journal_path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            ours = False
        snapshot = (self._dir / SNAPSHOT_FILE).exists()
        if ours and snapshot:
            return
        log.error("%s was deleted or moved while the services ran: the limit state (budgets "
                  "spent, holds in flight) is written again from memory",
                  self.journal_path if not ours else self._dir / SNAPSHOT_FILE)
        if not ours:
            try:
                os.close(self._fd)
                self._fd = None
                self._open_journal()
            except OSError as e:
                log.error("limits journal: cannot open a new one: %s", e)
        self._broken, self._lost_seq = True, self._seq
        self._compact_soon()

    def _open_journal(self) -> None:
        # A journal a crash left torn: the next line starts on a line of its own.
        self._fd, torn = open_appending(self.journal_path)
        self._jbytes = 0
        self._torn = TornLine(torn)

    def _rotated(self) -> list[Path]:
        """Journals rotated out by a snapshot that may not have completed, oldest first."""
        out = []
        for p in self._dir.glob(f"{JOURNAL_FILE}.*"):
            suffix = p.name.rsplit(".", 1)[1]
            if suffix.isdigit():
                out.append((int(suffix), p))
        return [p for _, p in sorted(out)]

    # -- snapshots -----------------------------------------------------------------

    def _snapshot_bytes(self) -> bytes:
        """The whole state as one JSON document, as of sequence number `self._seq`."""
        keys, ledgers = self._mem.state()
        return encode({
            "version": 1, "seq": self._seq, "t": self._t, "keys": keys,
            "ledgers": [[k, p, ledger] for (k, p), ledger in ledgers.items()],
        })

    def _compact_soon(self) -> None:
        """Rotate the journal and write the snapshot in a thread (one at a time)."""
        loop = asyncio.get_running_loop()
        if self._compacting is not None or loop.time() < self._next_try:
            return
        if self._withholding():
            return  # a snapshot would hold charges whose records (real or lost) are not
            # written: the journal keeps those requests in flight until they are
        data, seq = self._snapshot_bytes(), self._seq
        try:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
                os.replace(self.journal_path, self._dir / f"{JOURNAL_FILE}.{seq}")
            self._open_journal()
        except OSError as e:
            log.error("limits journal rotation failed: %s", e)
            self._next_try = loop.time() + RETRY_S
            if self._fd is None:
                with contextlib.suppress(OSError):
                    self._open_journal()
            return
        self._compacting = loop.run_in_executor(None, self._write_snapshot, data, seq)
        self._compacting.add_done_callback(functools.partial(self._compacted, seq))

    def _compacted(self, seq: int, fut: asyncio.Future[None]) -> None:
        self._compacting = None
        exc = fut.exception()
        if exc is None:
            if seq >= self._lost_seq:
                self._broken = False  # durable again: the snapshot holds every line lost
        else:
            log.error("limits snapshot failed: %s", exc)
            self._broken = True
            self._next_try = asyncio.get_running_loop().time() + RETRY_S

    def _write_snapshot(self, data: bytes, seq: int) -> None:
        """Write the snapshot durably, then drop the journals it covers (any thread)."""
        path = self._dir / SNAPSHOT_FILE
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:  # a short write (a full disk) must not pass for the whole state
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        for p in self._rotated():
            if int(p.name.rsplit(".", 1)[1]) <= seq:
                p.unlink(missing_ok=True)

    def _compact_now(self) -> None:
        """Snapshot synchronously and start an empty journal (at start and at close);
        only the journal's descriptor while usage records wait for the disk
        (`_withholding`)."""
        if self._withholding():
            if self._fd is None:
                self._open_journal()
            return
        self._write_snapshot(self._snapshot_bytes(), self._seq)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.journal_path.unlink(missing_ok=True)
        self._open_journal()
        self._broken = False

    # -- recovery ------------------------------------------------------------------

    def _lock(self) -> None:
        fd = os.open(self._dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(f"{self._dir}: the limit state is in use by another tokenbooth "
                          "process (state: memory serves one process; share Redis to run "
                          "several)") from None
        self._lock_fd = fd

    async def load(self) -> list[tuple[Ask, float]]:
        """Restore the snapshot and replay the journals after it. Writes nothing and
        takes no lock, so a reader (an audit) may load the state of a running process.
        Returns what replayed sweeps claimed, with the sweep's time."""
        for _ in range(READ_TRIES):  # a snapshot may replace the journals as we read
            snap, rows = _read_state(self._dir, self._rotated())
            first = min((r[0] for r in rows if isinstance(r[0], int)), default=None)
            if first is None or first <= (0 if snap is None else int(snap["seq"])) + 1:
                break
            await asyncio.sleep(0.05)
        if snap is not None:
            try:
                self._restore(snap)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                raise OSError(
                    f"{self._dir / SNAPSHOT_FILE}: limit state this release cannot read "
                    f"({type(e).__name__}: {e}); starting without it would forget every "
                    "budget's spend") from None
        swept: list[tuple[Ask, float]] = []
        for row in rows:
            try:
                swept += await self._apply(row)
            except (ValueError, TypeError, KeyError, IndexError):
                log.warning("limits journal: skipped a damaged line", extra={"seq": row[:1]})
        return swept

    def ledgers(self) -> Mapping[tuple[str, str], Ledger]:
        """Every budget ledger by (key id or `org:<name>`, period), as kept (read only)."""
        return self._mem.state()[1]

    def key_states(self) -> Mapping[str, KeyState]:
        """Every key's rate and concurrency state by key id, as kept (read only)."""
        return self._mem.state()[0]

    def _restore(self, doc: dict[str, Any]) -> None:
        keys = {k: decode(KeyState, v) for k, v in doc["keys"].items()}
        ledgers = {(k, p): decode(Ledger, v) for k, p, v in doc["ledgers"]}
        self._mem.restore(keys, ledgers)
        self._seq, self._t = int(doc["seq"]), float(doc["t"])

    async def _apply(self, row: list[Any]) -> list[tuple[Ask, float]]:
        """Apply one journal line through the same transition (once: by its seq)."""
        seq, op, now = int(row[0]), row[1], float(row[2])
        if seq <= self._seq:
            return []
        swept: list[tuple[Ask, float]] = []
        if op == "w":
            swept = [(a, now) for a in await self._mem.sweep(now)]
        elif op == "a":
            # Allowed when written: taken again whatever the checks say now.
            await self._mem.retake(_limits(row[3]), ask_from(row[4]), now)
        elif op == "s":
            await self._mem.settle(_limits(row[3]), _settle_ask(row[4], row[5], row[6]),
                                   int(row[7]), int(row[8]), now)
        elif op == "c":
            await self._mem.consume(_limits(row[3]), row[4], int(row[5]), int(row[6]), now)
        else:
            raise ValueError(f"unknown journal op {op!r}")
        self._seq, self._t = seq, max(self._t, now)
        return swept

    async def _settle_dead(self, swept: list[tuple[Ask, float]]) -> None:
        """Settle the requests still held (in flight when the process died) at the time
        of the last journal line: at their recorded usage, else at the full hold, with
        one `lost` record each; and write the records replayed sweeps still owe."""
        t = self._t
        keys, _ = self._mem.state()
        dead = sorted((h for ks in keys.values() for h in (*ks.holds.values(),
                                                            *ks.ended.values())),
                      key=lambda h: (h.exp, h.ask.key_id, h.ask.request_id))
        if not dead and not swept:
            return
        since = min([h.exp - h.ask.lease_s for h in dead]
                    + [at - a.lease_s for a, at in swept]) - RECORD_SLACK_S
        records = recorded(self._dir / USAGE_FILE,
                           {h.ask.request_id for h in dead} | {a.request_id for a, _ in swept},
                           since)
        # A record pays only its own request's holds: its key's or its org's, admitted at
        # its start (another request under the same id, a client's reused `x-request-id`
        # or another key's, was admitted at another moment), as the Redis SETTLE does.
        owed = [a for a, _ in swept
                if a.record is not None and own_record(records, a, None) is None]
        with_record = {h.ask.request_id for h in dead if h.ask.record is not None}
        settled_from = 0
        for h in dead:
            ask = h.ask
            usage = own_record(records, ask, h.exp - ask.lease_s)
            settled_from += usage is not None
            if (usage is None and ask.key_id.startswith(ORG_PREFIX)
                    and ask.request_id not in with_record):
                usage = (0, 0)  # an org's hold whose key's never came: nothing was served
            await self.settle(NO_LIMITS, ask, *(usage or (ask.tokens, ask.cost_nano)), t)
            if usage is None and ask.record is not None:
                owed.append(ask)
        log.warning("settled the requests in flight at the last stop", extra={
            "settled": len(dead), "lost_records": len(owed), "recorded": settled_from})
        for ask in owed:
            if self._on_lost is not None:
                self._on_lost(ask)


def make_durable_memory_store(cfg: Config, on_lost: OnLost | None = None,
                              records_waiting: Callable[[], bool] | None = None,
                              ) -> DurableMemoryLimitStore:
    """The limit store of `state: memory`, durable in `cfg.data_dir`. Without `on_lost`,
    the lost records of a restart go straight to the usage log there."""
    return DurableMemoryLimitStore(cfg.data_dir,
                                   on_lost=on_lost or lost_record_writer(cfg.data_dir),
                                   records_waiting=records_waiting)


def lost_record_writer(data_dir: Path) -> OnLost:
    """Write a hold's `lost` usage record to `<data_dir>/usage.jsonl` (rare: opened per
    record)."""
    def write(ask: Ask) -> None:
        rec = lost_record(ask)
        if rec is not None:
            sink = JsonlUsageLog(data_dir)
            try:
                sink.write(rec)
            finally:
                sink.close()
    return write


def _read_state(data_dir: Path, rotated: list[Path]) -> tuple[dict[str, Any] | None,
                                                               list[list[Any]]]:
    """The snapshot (None if there is none) and the journals' lines, oldest first. A
    line that does not parse (torn: the process died mid-write) is skipped."""
    snap = data_dir / SNAPSHOT_FILE
    try:
        doc = orjson.loads(snap.read_bytes())
    except FileNotFoundError:
        doc = None
    except orjson.JSONDecodeError as e:
        raise OSError(f"{snap}: damaged limit state ({e}); starting without it would "
                      "forget every budget's spend") from None
    rows: list[list[Any]] = []
    for path in [*rotated, data_dir / JOURNAL_FILE]:
        try:
            lines = path.read_bytes().splitlines()
        except FileNotFoundError:  # none yet, or removed by a snapshot as we read
            continue
        bad = 0
        for line in lines:
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                row = None
            if isinstance(row, list) and row:
                rows.append(row)
            else:
                bad += 1
        if bad:
            log.warning("limits journal: skipped %d damaged line(s)", bad,
                        extra={"path": str(path)})
    return doc, rows


# -- the usage log ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Found:
    """One usage record of a request id, as journal recovery reads it."""

    tokens: int  # total_tokens
    cost_nano: int
    started: float  # started_at (epoch seconds): its holds' admission time
    key_id: str
    org: str
    lost: bool  # a `lost` record (the sweep's), not the request's real one


# How far a hold's admission time, read back as its lease end less its lease, may be
# from its record's start (float rounding of the two sums; requests under one id are
# admitted far further apart).
_ADMITTED_SLACK_S = 1e-4


def recorded(path: Path, rids: set[str], since: float) -> dict[str, list[Found]]:
    """The usage records of each of `rids` in the log, newest first. Reads backwards
    from the end of the log, through its rotated files newest first, until a record
    that ended before `since`."""
    found: dict[str, list[Found]] = {}
    newest_first = (r for p in reversed(usage_files(path)) for r in records_backwards(p))
    for rec in newest_first:
        rid = rec.get("request_id")
        if rid in rids:
            try:
                f = Found(int(rec["total_tokens"]), usd_to_nano(Decimal(rec["cost_usd"])),
                          datetime.fromisoformat(str(rec["started_at"])).timestamp(),
                          str(rec["key_id"]), str(rec.get("org") or ""),
                          rec.get("status") == LOST)
            except (KeyError, ValueError, TypeError, InvalidOperation):
                log.warning("usage log: unreadable record", extra={"request_id": rid})
            else:
                found.setdefault(rid, []).append(f)
        ended = ended_at(rec)
        if ended is not None and ended < since:
            break
    return found


def own_record(records: Mapping[str, list[Found]], ask: Ask, admitted: float | None
               ) -> tuple[int, int] | None:
    """(total_tokens, cost nano-USD) of the hold `ask`'s own record: the newest real one,
    else the newest `lost` one, of its request id that is for its key (or its org's,
    for an org's hold) and started when it was admitted (its record material's start,
    else `admitted`); None if there is none."""
    start = None if ask.record is None else _epoch(ask.record.started_at)
    if start is None:
        start = admitted
    mine = [f for f in records.get(ask.request_id, ())
            if (f.key_id == ask.key_id or (bool(f.org) and ask.key_id == ORG_PREFIX + f.org))
            and start is not None and abs(f.started - start) <= _ADMITTED_SLACK_S]
    best = next((f for f in mine if not f.lost), mine[0] if mine else None)
    return None if best is None else (best.tokens, best.cost_nano)


def _epoch(iso: str) -> float | None:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


# -- the snapshot's codec ---------------------------------------------------------------


def encode(doc: Any) -> bytes:
    """JSON for the state's dataclasses (sets as lists; orjson writes the rest)."""
    return orjson.dumps(doc, default=_default)


def _default(obj: Any) -> Any:
    if isinstance(obj, set | frozenset):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


_LIMITS_ARITY = len(dataclasses.fields(Limits))


def _limits(values: list[Any]) -> Limits:
    """A journal line's positional Limits; values another release appended are passed
    over (a rollback), as the hold's own fields are (codec)."""
    return Limits(*values[:_LIMITS_ARITY])


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def decode(tp: Any, v: Any) -> Any:
    """Rebuild a value of type `tp` from `encode`'s JSON, led by the type hints, so a
    field the dataclasses gain needs no change here (a missing one takes its default)."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        hints = _hints(tp)
        return tp(**{k: decode(hints[k], x) for k, x in v.items() if k in hints})
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        return None if v is None else decode(arms[0], v)
    if origin is dict:
        return {k: decode(args[1], x) for k, x in v.items()}
    if origin in (set, frozenset):
        return origin(decode(args[0], x) for x in v)
    if origin is list:
        return [decode(args[0], x) for x in v]
    if origin is tuple:
        return tuple(decode(a, x) for a, x in zip(args, v, strict=True))
    if tp is float:
        return float(v)
    if tp is datetime:
        return datetime.fromisoformat(v)
    return v
