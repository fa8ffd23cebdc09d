"""`tokenbooth usage export`: moves usage records from the Redis stream into PostgreSQL.

A consumer of the group EXPORT_GROUP. Per batch: XREADGROUP, one INSERT … ON CONFLICT
(archive.store), COMMIT, then XACK; so an entry is acknowledged only once its row is
committed, and a batch retried (a crash between the commit and the XACK, a lost
connection) is deduplicated by the unique request_id. Several exporters may run at once:
the group hands each entry to one of them. An exporter that dies holds its entries
pending; a live one claims them (XAUTOCLAIM) once idle for `claim_idle_s`, so nothing
is lost. Each process has its own consumer name; those of dead processes are removed
once they hold nothing and have been idle an hour. After batches, at most every
`trim_every_s`, the stream is trimmed (trim.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # no stubs
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from authz.state.keys.redis_store import connect as redis_connect
from authz.state.usage import archive
from authz.state.usage.trim import EXPORT_GROUP, TrimPolicy, ensure_groups, parse_id, trim
from policy.config import redacted

log = logging.getLogger("tokenbooth.records")

_DEAD_CONSUMER_MS = 3600 * 1000
# What an outage of either side raises. InternalClientError: asyncpg's, when a connection
# broken mid-COPY is then asked to roll back.
_ERRORS = (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
           asyncpg.InternalClientError, TimeoutError)

Entry = tuple[bytes, dict[bytes, bytes] | None]


class Exporter:
    def __init__(self, redis_url: str, dsn: str, *, stream: str, group: str = EXPORT_GROUP,
                 batch: int = 2000, claim_idle_s: float = 60.0, block_ms: int = 1000,
                 trim_policy: TrimPolicy | None = None, trim_every_s: float = 10.0) -> None:
        self.redis_url, self.dsn, self.stream, self.group = redis_url, dsn, stream, group
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.batch, self.claim_idle_ms, self.block_ms = batch, int(claim_idle_s * 1000), block_ms
        self.trim_policy = trim_policy or TrimPolicy(groups=(group,))
        self.trim_every_s = trim_every_s
        self.exported = 0  # entries acknowledged by this process
        self._redis: aioredis.Redis = redis_connect(redis_url, 5.0 + block_ms / 1000)
        self._pg: asyncpg.Connection | None = None
        self._own_pending = True  # entries delivered to us and not acknowledged: first
        self._claimed_at = self._trimmed_at = 0.0

    async def open(self) -> None:
        """Connects to PostgreSQL (migrating the schema) and makes the groups: at start
        and after any failure (a Redis restarted empty has lost them)."""
        if self._pg is None or self._pg.is_closed():
            pg = await archive.connect(self.dsn)
            try:
                await archive.migrate(pg)
                groups = tuple(dict.fromkeys((self.group, *self.trim_policy.groups)))
                await ensure_groups(self._redis, self.stream, groups)
            except BaseException:
                pg.terminate()
                raise
            self._pg = pg

    async def aclose(self) -> None:
        if self._pg is not None:
            with contextlib.suppress(*_ERRORS):
                await self._pg.close(timeout=5)
        await self._redis.aclose()

    async def run(self, stop: asyncio.Event, *, until_idle: bool = False) -> None:
        """Exports until `stop` (or, with `until_idle`, until a read finds nothing).
        Outages of Redis or PostgreSQL are retried with backoff; nothing is acknowledged
        that is not committed."""
        backoff = 0.2
        while not stop.is_set():
            try:
                await self.open()
                n = await self.step()
            except _ERRORS as e:
                if _refused(e):  # not an outage: a dropped table, a revoked grant
                    log.error("usage export: PostgreSQL refused the records (%s: %s), "
                              "retrying in %.1fs", type(e).__name__, e, backoff)
                else:
                    log.warning("usage export: %s unavailable (%s: %s), retrying in %.1fs",
                                _which(e), type(e).__name__, e, backoff)
                await self._drop_pg()
                self._own_pending = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(5.0, backoff * 2)
                continue
            backoff = 0.2
            if n == 0 and until_idle and not self._own_pending:
                with contextlib.suppress(*_ERRORS):  # what is acknowledged now goes too
                    await trim(self._redis, self.stream, self.trim_policy)
                return

    async def step(self) -> int:
        """One batch: read, store, commit, acknowledge; the entries handled."""
        entries = await self._next_entries()
        if not entries:
            await self._maybe_trim()
            return 0
        rows: list[tuple[Any, ...]] = []
        rejected: list[archive.Rejected] = []
        for raw_id, fields in entries:
            data = (fields or {}).get(b"data")
            if data is None:
                continue  # trimmed while pending, or not a record: nothing to store
            try:
                rows.append(archive.row(archive.loads(data), parse_id(raw_id)))
            except ValueError as e:
                log.error("usage export: record %s cannot be stored (%s); kept in "
                          "usage_rejected", raw_id.decode(), e)
                # Kept as text PostgreSQL takes: a NUL written as the JSON escape it was.
                text = data.decode(errors="replace").replace("\x00", "\\u0000")
                rejected.append(archive.Rejected(raw_id.decode(), text, str(e)))
        assert self._pg is not None
        await archive.store(self._pg, rows, rejected)
        await self._redis.xack(self.stream, self.group, *(i for i, _ in entries))
        self.exported += len(entries)
        await self._maybe_trim()
        return len(entries)

    async def _next_entries(self) -> list[Entry]:
        """Ours not yet acknowledged (after a failure), else those of dead consumers,
        else new ones (waiting up to block_ms)."""
        if self._own_pending:
            got = await self._read("0", block=False)
            if got:
                return got
            self._own_pending = False
        if time.monotonic() - self._claimed_at >= self.claim_idle_ms / 2000:
            self._claimed_at = time.monotonic()
            claimed = await self._claim()
            if claimed:
                return claimed
        return await self._read(">", block=True)

    async def _read(self, start: str, *, block: bool) -> list[Entry]:
        resp: Any = await self._redis.xreadgroup(self.group, self.consumer, {self.stream: start},
                                            count=self.batch,
                                            block=self.block_ms if block else None)
        if not resp:
            return []
        _name, entries = resp[0]
        return [(i, f) for i, f in entries]

    async def _claim(self) -> list[Entry]:
        """Entries pending at other consumers for `claim_idle_s`: theirs died. Consumers
        idle an hour with nothing pending are removed."""
        resp: Any = await self._redis.xautoclaim(self.stream, self.group, self.consumer,
                                            self.claim_idle_ms, "0-0", count=self.batch)
        entries: list[Entry] = [(i, f) for i, f in resp[1]]
        for c in await self._redis.xinfo_consumers(self.stream, self.group):
            name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            if name != self.consumer and int(c["pending"]) == 0 and int(
                    c["idle"]) > _DEAD_CONSUMER_MS:
                await self._redis.xgroup_delconsumer(self.stream, self.group, name)
        if entries:
            log.warning("usage export: claimed %d record(s) of a stopped exporter",
                        len(entries))
        return entries

    async def _maybe_trim(self) -> None:
        if time.monotonic() - self._trimmed_at >= self.trim_every_s:
            self._trimmed_at = time.monotonic()
            await trim(self._redis, self.stream, self.trim_policy)

    async def _drop_pg(self) -> None:
        if self._pg is not None:
            self._pg.terminate()
            self._pg = None


# SQLSTATE classes of a statement PostgreSQL refuses as it stands (a missing table or
# column, a privilege, a constraint): an operator's change, not an outage.
_REFUSED_CLASSES = frozenset({"42", "23", "22", "28"})


def _refused(e: BaseException) -> bool:
    return isinstance(e, asyncpg.PostgresError) and str(
        getattr(e, "sqlstate", "") or "")[:2] in _REFUSED_CLASSES


def _which(e: BaseException) -> str:
    return "Redis" if isinstance(e, RedisError) else "PostgreSQL"


def describe(dsn: str) -> str:
    """The sink for messages: its URL with any password hidden."""
    return redacted(dsn)
