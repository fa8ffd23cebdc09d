"""Usage records at volume: Redis memory per million records, and records per second
through `tokenbooth usage export` into PostgreSQL, with its disk per million rows.

Run: `.venv/bin/python -m bench.usage_export [--n N]`. Starts its own
redis-server and PostgreSQL (initdb + pg_ctl in a temp dir, as the tests do), then:

1. Redis used_memory per million records kept in the stream: with the default dedup
   keys (usage.dedup_ttl_s 600: each record's seen key still alive) and without
   (dedup_ttl_s 0, or once they expired): the sizing rule's two terms.
2. N records through one exporter: records/s, wall time from the first read to the
   last acknowledgement (batches of 5,000; the trim included).
3. PostgreSQL: table + index bytes per million rows.

Records are the size of a real chat completion's (~420 bytes of JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]  # no stubs
import redis.asyncio as aioredis

from authz.state.usage.exporter import Exporter
from authz.state.usage.trim import EXPORT_GROUP, TrimPolicy
from tests.postgres_harness import PostgresServer
from tests.redis_server import RedisServer
from tests.state.usage.gen import add, record

STREAM = "tb:{usage}"
MIB = 1 << 20


async def used(client: aioredis.Redis) -> int:
    return int((await client.info("memory"))["used_memory"])


async def redis_per_million(url: str, n: int) -> tuple[float, float]:
    """MiB per million records kept: with live seen keys, and stream entries alone."""
    client = aioredis.Redis.from_url(url)
    try:
        out = []
        for ttl in (600, 0):
            await client.flushall()
            base = await used(client)
            await add(client, STREAM, (record(i) for i in range(n)), seen_ttl_s=ttl)
            out.append((await used(client) - base) / MIB * 1_000_000 / n)
        await client.flushall()
        return out[0], out[1]
    finally:
        await client.aclose()


async def export_rate(url: str, dsn: str, n: int) -> tuple[float, float]:
    """Records/s through one exporter, and the stream entries left after it."""
    client = aioredis.Redis.from_url(url)
    await add(client, STREAM, (record(i) for i in range(n)), seen_ttl_s=0)
    ex = Exporter(url, dsn, stream=STREAM, batch=5000,
                  trim_policy=TrimPolicy(groups=(EXPORT_GROUP,)), trim_every_s=1.0)
    await ex.open()
    t0 = time.perf_counter()
    await ex.run(asyncio.Event(), until_idle=True)
    took = time.perf_counter() - t0
    await ex.aclose()
    left = await client.xlen(STREAM)
    await client.aclose()
    conn = await asyncpg.connect(dsn)
    rows = await conn.fetchval("SELECT count(*) FROM usage_records")
    await conn.close()
    assert rows == n, f"{rows} rows for {n} records"
    return n / took, float(left)


async def pg_bytes_per_million(dsn: str, n: int) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("VACUUM ANALYZE usage_records")
        size = await conn.fetchval("SELECT pg_total_relation_size('usage_records')")
    finally:
        await conn.close()
    return float(size) / MIB * 1_000_000 / n


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp))
        redis.start()
        pg = PostgresServer()
        pg.start()
        try:
            with_keys, stream_only = await redis_per_million(redis.url, n)
            print(f"Redis, per million records kept: {with_keys:,.0f} MiB with their dedup "
                  f"keys alive, {stream_only:,.0f} MiB stream entries alone")
            rate, left = await export_rate(redis.url, pg.dsn, n)
            print(f"export: {n:,} records through one exporter: {rate:,.0f} records/s; "
                  f"stream entries left after the trim: {left:.0f}")
            print(f"PostgreSQL, per million rows (table + 5 indexes): "
                  f"{await pg_bytes_per_million(pg.dsn, n):,.0f} MiB")
        finally:
            pg.close()
            redis.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="records (default 200,000)")
    a = ap.parse_args()
    asyncio.run(main(a.n))
