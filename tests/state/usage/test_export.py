"""The exporter (Redis stream -> PostgreSQL), against a real redis-server and a real
PostgreSQL that the tests stop, restart, and whose exporter they SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.exceptions import BusyLoadingError

from authz.state.usage import archive
from authz.state.usage.exporter import Exporter
from authz.state.usage.trim import EXPORT_GROUP, TrimPolicy, parse_id
from policy.usage import LOST
from tests.helpers import write_policy
from tests.postgres_harness import PostgresServer
from tests.redis_server import RedisServer
from tests.state.usage.gen import add, old_schema, record, reference, total_cost

STREAM = "tb:{usage}"
LONG = os.environ.get("TOKENBOOTH_LONG_USAGE") == "1"


@pytest.fixture
async def client(own_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(own_redis.url)
    yield c
    await c.aclose()


def exporter(redis_url: str, dsn: str, **kw: Any) -> Exporter:
    kw.setdefault("trim_policy", TrimPolicy(groups=(EXPORT_GROUP,)))
    kw.setdefault("trim_every_s", 0.0)
    return Exporter(redis_url, dsn, stream=STREAM, **kw)


async def rows(dsn: str) -> dict[str, dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        found = await conn.fetch(f"SELECT {archive.SELECT_COLUMNS} FROM usage_records")
    finally:
        await conn.close()
    return {r["request_id"]: archive.record(r) for r in found}


async def count(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM usage_records"))
    finally:
        await conn.close()


async def drained(client: aioredis.Redis) -> bool:
    """Every entry delivered to the export group and acknowledged."""
    try:
        infos = await client.xinfo_groups(STREAM)
    except BusyLoadingError:  # a restarted Redis reading its AOF
        return False
    [info] = [i for i in infos if i["name"] == EXPORT_GROUP.encode()]
    # Not XINFO's `lag`: Redis 7.0 reports it unknown (nil) once entries were trimmed.
    newest = await client.xrevrange(STREAM, "+", "-", count=1)
    return int(info["pending"]) == 0 and (not newest or parse_id(newest[0][0]) <= parse_id(
        info["last-delivered-id"]))


async def until(cond: Any, within: float = 180.0) -> None:
    deadline = time.monotonic() + within
    while not await cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_exported_once_real_beats_lost(
        own_redis: RedisServer, client: aioredis.Redis, pg_db: str) -> None:
    recs = [record(i) for i in range(2500)]
    recs += [record(5, LOST), record(7)]  # lost after real; a redelivery: both dropped
    recs += [record(3000, LOST), record(3000), record(3001), record(3001, LOST)]
    # GET /v1/models: a record of no model, no backend, nothing spent.
    recs += [{**record(4000), "model": "", "upstream_model": "", "backend": "",
              "endpoint": "models", "prompt_tokens": 0, "completion_tokens": 0,
              "total_tokens": 0, "cost_usd": "0", "key_budget_period": None,
              "org_budget_period": None}]
    recs += [{"request_id": "broken", "org": "x"}]  # stored whole in usage_rejected
    # Text PostgreSQL cannot hold: rejected alone, not the whole batch failing forever.
    recs += [{**record(4001), "org": "ac\u0000me"}]
    # Nor can it hold these (pipeline tester: the first three stopped every export
    # behind them, the last was stored as $0).
    unheld = [{**record(4100), "prompt_tokens": 2**63},
              {**record(4101), "started_at": "0001-01-01T00:00:00+14:00"},
              {**record(4102), "cost_usd": "1e-20000"},
              {**record(4103), "cost_usd": "1e200000"},
              {**record(4104), "cost_usd": "-1"}]
    recs += unheld
    await add(client, STREAM, iter(recs), seen_ttl_s=0)  # no seen keys: all in the stream
    bad = {"broken", *(r["request_id"] for r in unheld)}
    want = reference([r for r in recs if r["request_id"] not in bad
                      and r["org"] != "ac\u0000me"])
    # Each row must name its request's first entry, a corrected `lost` one's too (the
    # place readers page by).
    ids: dict[str, tuple[int, int]] = {}
    for entry_id, fields in await client.xrange(STREAM):
        rec = archive.loads(fields[b"data"])
        if rec.get("request_id") in want:
            ids.setdefault(rec["request_id"], parse_id(entry_id))
    ex = exporter(own_redis.url, pg_db, batch=700)
    await ex.run(asyncio.Event(), until_idle=True)
    await ex.aclose()
    got = await rows(pg_db)
    assert got == want
    assert got["req-000003000"]["status"] == 200 and got["req-000003001"]["status"] == 200
    assert await drained(client)
    assert await client.xlen(STREAM) < 200  # trimmed once acknowledged (whole nodes)
    conn = await asyncpg.connect(pg_db)
    assert await conn.fetchval("SELECT count(*) FROM usage_rejected") == 2 + len(unheld)
    stored = {r["request_id"]: (r["stream_ms"], r["stream_seq"]) for r in await conn.fetch(
        "SELECT request_id, stream_ms, stream_seq FROM usage_records")}
    assert stored == ids
    assert await conn.fetchval("SELECT version FROM tokenbooth_schema") == archive.SCHEMA_VERSION
    await conn.close()


async def test_a_version_1_table_is_migrated_and_its_rows_say_nothing_new(pg_db: str) -> None:
    """Version 2 adds the ledgers each record was charged to, 3 its sequences per prompt;
    rows stored before keep saying nothing about them (not `null`: that would say "no
    budget")."""
    conn = await asyncpg.connect(pg_db)
    try:
        await old_schema(conn, 1, [record(2)])  # record 2: no ledger fields
        assert await archive.migrate(conn) == archive.SCHEMA_VERSION == 5
        assert await archive.migrate(conn) == 5  # idempotent
        new = [{**record(3), "org_budget_period": None}, record(4)]  # a period; none
        # Exported from entries in the other order: the order readers page by is the
        # stream's, and the row without an entry id (version 1's) comes first.
        await archive.store(conn, [archive.row(r, (1_700_000_000_000, 7 - i))
                                   for i, r in enumerate(new)], [])
        found = await conn.fetch(f"SELECT {archive.SELECT_COLUMNS} FROM usage_records "
                                 f"ORDER BY {archive.ORDER_KEY}")
        assert [archive.record(r) for r in found] == [record(2), new[1], new[0]]
    finally:
        await conn.close()


async def test_a_version_3_exporter_cannot_write_once_the_table_is_at_4(pg_db: str) -> None:
    """A rolling upgrade: an exporter of version 3 still running after a new one migrated
    the table. Its rows would have no entry id and sort before every other one, so a
    client paging with `after` would never see them: its INSERT (version 3's columns)
    fails instead (it then stops, its migrate() refusing version 4, and a new exporter
    claims its batch). Rows stored before version 4 stay, and a new exporter still
    corrects a `lost` one of them."""
    v3 = archive._COLUMNS[:19]  # what version 3 wrote: no stream entry id, no bounds
    conn = await asyncpg.connect(pg_db)
    try:
        old_insert = await old_schema(conn, 3, [record(1, LOST)])
        assert await archive.migrate(conn) == 5
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(old_insert, *archive.row(record(2))[:len(v3)])
        await archive.store(conn, [archive.row(record(1), (1_700_000_000_000, 0)),
                                   archive.row(record(3), (1_700_000_000_000, 1))], [])
        found = await conn.fetch(f"SELECT {archive.SELECT_COLUMNS} FROM usage_records "
                                 f"ORDER BY {archive.ORDER_KEY}")
        assert [archive.record(r) for r in found] == [record(1), record(3)]
    finally:
        await conn.close()


async def test_a_late_real_record_replaces_a_lost_row_in_its_place(
        own_redis: RedisServer, client: aioredis.Redis, pg_db: str) -> None:
    """The correction changes the row's cost, not its place: a request stands where its
    first entry did (a reader paging with `after` meets it once, with what is stored
    then); a redelivery changes nothing, and a lost record never replaces a real one."""
    async def place_and_status(rid: str) -> tuple[tuple[int, int], Any]:
        conn = await asyncpg.connect(pg_db)
        try:
            row = await conn.fetchrow(f"SELECT {archive.ORDER_KEY}, status "
                                      "FROM usage_records WHERE request_id = $1", rid)
        finally:
            await conn.close()
        return (int(row[0]), int(row[1])), row["status"]

    async def export(*recs: dict[str, Any]) -> None:
        await add(client, STREAM, iter(recs), seen_ttl_s=0)
        ex = exporter(own_redis.url, pg_db)
        await ex.run(asyncio.Event(), until_idle=True)
        await ex.aclose()

    await export(record(1, LOST), record(2))
    place, status = await place_and_status("req-000000001")
    other = await place_and_status("req-000000002")
    assert status == LOST and place < other[0]
    await export(record(1), record(2))  # the late real one; a redelivery of 2
    assert await place_and_status("req-000000001") == (place, "200")
    assert await place_and_status("req-000000002") == other
    await export(record(1, LOST), record(2))  # a lost one never replaces a real one
    assert await place_and_status("req-000000001") == (place, "200")
    assert await place_and_status("req-000000002") == other


@pytest.mark.timeout(400)
async def test_exactly_once_through_a_postgres_restart(
        own_redis: RedisServer, client: aioredis.Redis, pg_db: str,
        postgres: PostgresServer) -> None:
    n = 30_000
    await add(client, STREAM, (record(i) for i in range(n)))
    stop = asyncio.Event()
    ex = exporter(own_redis.url, pg_db, batch=500)
    task = asyncio.create_task(ex.run(stop))
    await until(lambda: _more_than(pg_db, 2000))
    await asyncio.to_thread(postgres.stop, "fast")  # mid-export
    await asyncio.sleep(1.0)
    await add(client, STREAM, (record(i) for i in range(n, n + 1000)))  # still arriving
    await asyncio.to_thread(postgres.start)
    await until(lambda: drained(client))
    stop.set()
    await task
    await ex.aclose()
    assert await count(pg_db) == n + 1000
    assert set(await rows(pg_db)) == {record(i)["request_id"] for i in range(n + 1000)}


async def _more_than(dsn: str, n: int) -> bool:
    try:
        return await count(dsn) > n
    except asyncpg.UndefinedTableError:
        return False


async def _mid_batch(client: aioredis.Redis, dsn: str, n: int) -> bool:
    """More than `n` rows stored and a batch delivered, not yet acknowledged: a kill now
    lands mid-batch (a kill between batches would test nothing)."""
    if not await _more_than(dsn, n):
        return False
    infos = await client.xinfo_groups(STREAM)
    return any(int(i["pending"]) > 0 for i in infos)


@pytest.mark.timeout(400)
async def test_exactly_once_when_an_exporter_is_killed_mid_batch(
        own_redis: RedisServer, client: aioredis.Redis, pg_db: str, tmp_path: Path) -> None:
    n = 100_000
    await add(client, STREAM, (record(i) for i in range(n)))
    config = write_policy(tmp_path, "http://127.0.0.1:8000", state=own_redis.url,
                          usage={"sink": pg_db})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authz.cli", "usage", "export", "--config", str(config),
        "--batch", "5000", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await until(lambda: _mid_batch(client, pg_db, 20_000))
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = await proc.communicate()
    done = await count(pg_db)
    assert 0 < done < n, err.decode()
    [info] = await client.xinfo_groups(STREAM)
    held = int(info["pending"])  # the dead exporter's batch: delivered, never acknowledged
    ex = exporter(own_redis.url, pg_db, claim_idle_s=0.2, batch=5000)
    stop = asyncio.Event()
    task = asyncio.create_task(ex.run(stop))
    await until(lambda: drained(client))
    stop.set()
    await task
    await ex.aclose()
    print(f"\nkilled with {done} rows committed and {held} records held; after a restart: "
          f"{await count(pg_db)} rows")
    assert held > 0
    got = await rows(pg_db)
    assert len(got) == n
    assert set(got) == {record(i)["request_id"] for i in range(n)}
    assert sum(int(r["total_tokens"]) for r in got.values()) == sum(
        record(i)["total_tokens"] for i in range(n))


@pytest.mark.timeout(900)
async def test_export_rate(
        own_redis: RedisServer, client: aioredis.Redis, pg_db: str) -> None:
    """100k records (a million with TOKENBOOTH_LONG_USAGE=1) through one exporter: the
    time is printed, not asserted (bench/usage_export.py measures it)."""
    n = 1_000_000 if LONG else 100_000
    t0 = time.perf_counter()
    await add(client, STREAM, (record(i) for i in range(n)))
    added = time.perf_counter() - t0
    ex = exporter(own_redis.url, pg_db, batch=5000, trim_every_s=1.0)
    t0 = time.perf_counter()
    await ex.run(asyncio.Event(), until_idle=True)
    took = time.perf_counter() - t0
    await ex.aclose()
    print(f"\n{n:,} records: into Redis in {added:.1f} s; exported in {took:.1f} s "
          f"({n / took:,.0f} records/s)")
    assert await count(pg_db) == n
    conn = await asyncpg.connect(pg_db)
    cost = await conn.fetchval("SELECT sum(cost_usd) FROM usage_records")
    await conn.close()
    assert cost == total_cost(record(i) for i in range(n))
    assert await drained(client)


@pytest.mark.timeout(400)
async def test_exactly_once_through_a_redis_restart(pg_db: str, tmp_path: Path) -> None:
    """Redis (AOF, fsync always) stopped mid-export and started again: batches committed
    but not acknowledged come back, and the unique request_id keeps them single."""
    server = RedisServer(tmp_path, persist=True)
    server.start()
    try:
        c = aioredis.Redis.from_url(server.url)
        n = 30_000
        await add(c, STREAM, (record(i) for i in range(n)))
        await c.aclose()
        stop = asyncio.Event()
        ex = exporter(server.url, pg_db, batch=500)
        task = asyncio.create_task(ex.run(stop))
        await until(lambda: _more_than(pg_db, 2000))
        server.stop()
        await asyncio.sleep(1.0)
        server.start()
        c = aioredis.Redis.from_url(server.url)
        await until(lambda: drained(c))
        stop.set()
        await task
        await ex.aclose()
        await c.aclose()
        got = await rows(pg_db)
        assert set(got) == {record(i)["request_id"] for i in range(n)}
        assert await count(pg_db) == n
    finally:
        server.stop()


async def test_a_dropped_table_is_made_again_and_the_records_waiting_exported(
        own_redis: RedisServer, client: aioredis.Redis, pg_db: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Storage tester: `DROP TABLE usage_records` under traffic, and the exporter said
    "PostgreSQL unavailable" every 5 s for good; a restart did not help either, as the
    schema's version was trusted. The table is made again, and what waits is exported."""
    recs = [record(i) for i in range(50)]
    await add(client, STREAM, iter(recs[:20]), seen_ttl_s=0)
    ex = exporter(own_redis.url, pg_db)
    await ex.run(asyncio.Event(), until_idle=True)
    conn = await asyncpg.connect(pg_db)
    await conn.execute("DROP TABLE usage_records")
    await conn.close()
    await add(client, STREAM, iter(recs[20:]), seen_ttl_s=0)
    stop = asyncio.Event()
    running = asyncio.create_task(ex.run(stop))
    try:
        await until(lambda: _more_than(pg_db, 29))
        await until(lambda: drained(client))
    finally:
        stop.set()
        await running
        await ex.aclose()
    assert set(await rows(pg_db)) == {r["request_id"] for r in recs[20:]}
    assert "refused the records" in caplog.text
    assert "is gone although tokenbooth_schema says version" in caplog.text
