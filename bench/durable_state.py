"""µs per admit + settle for ways to keep `state: memory` limits across restarts.

Run: `.venv/bin/python -m bench.durable_state [--n N] [--reps R]`. Each row admits N
requests (RPM, TPM, concurrency and budget all set, nothing denied) and settles them,
in one process on one key, and prints the median over R rounds of CPU and wall µs per
admit + settle. The candidates:

- memory: `MemoryLimitStore`, nothing survives a restart (the floor);
- journal: `DurableMemoryLimitStore`, one write() per change to an O_APPEND file, with
  its snapshots (compaction included in the time);
- sqlite WAL: the memory store plus its changed rows written to SQLite in WAL mode, one
  transaction per admit and per settle (key row, ledger row, hold row), with
  synchronous=OFF and =NORMAL (neither fsyncs per transaction in WAL mode).

Then the journal's recovery: seconds to start from a journal of N admits + settles.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from authz.state.limits.durable import DurableMemoryLimitStore
from authz.state.limits.memory import MemoryLimitStore
from policy.admission import Settled
from policy.limits import Ask, Decision, HoldRecord, Limits

LIMITS = Limits(rpm=10**9, tpm=10**12, max_concurrent=10**6, budget_nano=10**15,
                budget_period="day")


RECORD = HoldRecord(model="demo", upstream_model="tiny-llama", endpoint="chat",
                    stream=True, prompt_tokens=44, completion_tokens=256,
                    started_at="2026-11-23T10:00:00.123456Z")


def ask(i: int) -> Ask:
    return Ask(request_id=f"0f8e7d6c-5b4a-3928-1706-{i:012d}", key_id="k-bench", org="acme",
               tokens=300, cost_nano=50_000, period="day:2026-11-23", lease_s=150,
               record=RECORD)


class SqliteStore:
    """The memory store, its changed rows written to SQLite after each transition."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self._mem = MemoryLimitStore()
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript("""
            CREATE TABLE keys (key_id TEXT PRIMARY KEY, tat REAL, level REAL, ts REAL);
            CREATE TABLE ledgers (key_id TEXT, period TEXT, spent INTEGER, reserved INTEGER,
                                  PRIMARY KEY (key_id, period));
            CREATE TABLE holds (key_id TEXT, request_id TEXT, ask BLOB, exp REAL,
                                PRIMARY KEY (key_id, request_id));
        """)

    def _rows(self, key_id: str, period: str) -> None:
        keys, ledgers = self._mem.state()
        k, led = keys[key_id], ledgers[(key_id, period)]
        self._db.execute("INSERT OR REPLACE INTO keys VALUES (?, ?, ?, ?)",
                         (key_id, k.requests, k.level, k.ts))
        self._db.execute("INSERT OR REPLACE INTO ledgers VALUES (?, ?, ?, ?)",
                         (key_id, period, led.spent, led.reserved))

    async def admit(self, limits: Limits, a: Ask, now: float) -> Decision:
        d = await self._mem.admit(limits, a, now)
        self._db.execute("BEGIN")
        self._rows(a.key_id, a.period)
        self._db.execute("INSERT INTO holds VALUES (?, ?, ?, ?)",
                         (a.key_id, a.request_id, orjson.dumps(a), now + a.lease_s))
        self._db.execute("COMMIT")
        return d

    async def settle(self, limits: Limits, a: Ask, used: int, cost: int,
                     now: float) -> Settled:
        s = await self._mem.settle(limits, a, used, cost, now)
        self._db.execute("BEGIN")
        self._rows(a.key_id, a.period)
        self._db.execute("DELETE FROM holds WHERE key_id = ? AND request_id = ?",
                         (a.key_id, a.request_id))
        self._db.execute("COMMIT")
        return s


async def one_round(store: Any, n: int) -> tuple[float, float]:
    now = time.time()
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(n):
        a = ask(i)
        d = await store.admit(LIMITS, a, now)
        assert d.allowed
        await store.settle(LIMITS, a, 100, 20_000, now)
    return ((time.process_time() - c0) / n * 1e6, (time.perf_counter() - w0) / n * 1e6)


async def measure(name: str, n: int, reps: int) -> None:
    cpu, wall = [], []
    for _ in range(reps):
        tmp = Path(tempfile.mkdtemp(prefix="tb-durable-"))
        store: Any
        if name == "memory":
            store = MemoryLimitStore()
        elif name == "journal":
            store = DurableMemoryLimitStore(tmp)
            await store.start()
        else:
            store = SqliteStore(tmp / "limits.db", name.rsplit("=", 1)[1])
        c, w = await one_round(store, n)
        cpu.append(c)
        wall.append(w)
        if isinstance(store, DurableMemoryLimitStore):
            await store.close()
    print(f"{name:<28} {statistics.median(cpu):8.1f} {statistics.median(wall):8.1f}",
          flush=True)


async def recovery(n: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tb-durable-"))
    store = DurableMemoryLimitStore(tmp, compact_bytes=1 << 40)
    await store.start()
    await one_round(store, n)
    size = store.journal_path.stat().st_size
    for fd in (store._fd, store._lock_fd):  # as if killed: no snapshot at close
        if fd is not None:
            os.close(fd)
    store._fd = store._lock_fd = None
    t0 = time.perf_counter()
    again = DurableMemoryLimitStore(tmp)
    await again.start()
    print(f"recovery from a {size / 2**20:.1f} MiB journal ({2 * n} lines): "
          f"{time.perf_counter() - t0:.2f} s")
    await again.close()


async def main(n: int, reps: int) -> None:
    print(f"{'store':<28} {'cpu µs':>8} {'wall µs':>8}   (per admit + settle, median)")
    for name in ("memory", "journal", "sqlite WAL synchronous=OFF",
                 "sqlite WAL synchronous=NORMAL"):
        await measure(name, n, reps)
    await recovery(n)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    asyncio.run(main(args.n, args.reps))
