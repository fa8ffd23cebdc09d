"""The usage stream stays bounded: trimmed once acknowledged, or by age; dedup keys live
only for the redelivery horizon. Against a real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from authz.state.usage.redis_sink import RedisUsageSink
from authz.state.usage.trim import TrimPolicy, acked_cut, ensure_groups, trim
from policy.usage import UsageRecord
from tests.redis_server import RedisServer
from tests.state.usage.gen import add, batches, record

STREAM = "tb:{usage}"
MILLION = 1_000_000
# The bound for a million records through a stream that a consumer group acknowledges as
# they come, with 1 s dedup keys: the unacknowledged window (a few thousand records),
# the seen keys of the last second or so, and Redis' own ~1 MiB. Untrimmed, the same
# records take ~360 MiB (printed). Measured: 9.5 MiB peak, 40 s.
BOUND_MIB = 32


@pytest.fixture
async def client(own_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(own_redis.url)
    yield c
    await c.aclose()


async def used_mib(client: aioredis.Redis) -> float:
    return int((await client.info("memory"))["used_memory"]) / (1 << 20)


async def consume(client: aioredis.Redis, group: str) -> int:
    """What a consumer group's reader does: read everything new, acknowledge it."""
    n = 0
    while resp := await client.xreadgroup(group, "c1", {STREAM: ">"}, count=5000):
        ids = [i for i, _ in resp[0][1]]
        await client.xack(STREAM, group, *ids)
        n += len(ids)
    return n


@pytest.mark.timeout(300)
async def test_a_million_records_in_bounded_redis_memory(client: aioredis.Redis) -> None:
    policy = TrimPolicy("acked", 7 * 86400.0, ("billing",))
    await ensure_groups(client, STREAM, policy.groups)
    base, peak, consumed = await used_mib(client), 0.0, 0
    t0 = time.perf_counter()
    chunk = 10_000
    for start in range(0, MILLION, chunk):
        await add(client, STREAM, (record(i) for i in range(start, start + chunk)),
                  seen_ttl_s=1)
        consumed += await consume(client, "billing")
        await trim(client, STREAM, policy)
        peak = max(peak, await used_mib(client))
    took = time.perf_counter() - t0
    print(f"\n{MILLION:,} records in {took:.1f} s: Redis used_memory peak {peak:.1f} MiB "
          f"(empty: {base:.1f} MiB), stream length at the end {await client.xlen(STREAM)}")
    assert consumed == MILLION
    assert peak < BOUND_MIB
    assert await client.xlen(STREAM) <= 200  # up to two stream nodes of 100 entries


async def test_untrimmed_the_same_records_grow_without_bound(client: aioredis.Redis) -> None:
    """The reference for the bound above: 100k records kept take ~40 MiB."""
    base = await used_mib(client)
    await add(client, STREAM, (record(i) for i in range(100_000)), seen_ttl_s=0)
    grown = await used_mib(client) - base
    print(f"\n100,000 records untrimmed: {grown:.1f} MiB ({grown * 10:.0f} MiB a million)")
    assert grown * 10 > 4 * BOUND_MIB


async def test_acked_trim_waits_for_every_group(client: aioredis.Redis) -> None:
    policy = TrimPolicy("acked", None, ("billing", "kafka"))
    await add(client, STREAM, (record(i) for i in range(1000)))
    assert await acked_cut(client, STREAM, policy.groups) == (0, 0)  # no groups yet
    await ensure_groups(client, STREAM, policy.groups)
    await consume(client, "billing")
    assert await trim(client, STREAM, policy) == 0  # kafka acknowledged nothing
    assert await client.xlen(STREAM) == 1000
    await consume(client, "kafka")
    await trim(client, STREAM, policy)
    assert await client.xlen(STREAM) < 100
    # A consumer that read but has not acknowledged holds the cut at its pending entry.
    await add(client, STREAM, (record(i) for i in range(1000, 2000)))
    resp = await client.xreadgroup("kafka", "c2", {STREAM: ">"}, count=2000)
    first_pending = resp[0][1][0][0]
    await consume(client, "billing")
    await trim(client, STREAM, policy)
    assert (await client.xrange(STREAM, "-", "+", count=1))[0][0] <= first_pending
    assert await client.xlen(STREAM) >= 1000


async def test_retention_trim_by_age(client: aioredis.Redis) -> None:
    await add(client, STREAM, (record(i) for i in range(5000)))
    policy = TrimPolicy("retention", 1.0, ())
    await trim(client, STREAM, policy)
    assert await client.xlen(STREAM) == 5000  # younger than a second
    await asyncio.sleep(1.1)
    await add(client, STREAM, (record(i) for i in range(5000, 5010)))
    await trim(client, STREAM, policy)
    assert 10 <= await client.xlen(STREAM) < 110


async def test_acked_policy_still_drops_what_passed_the_retention(
        client: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    policy = TrimPolicy("acked", 1.0, ("billing",))
    await ensure_groups(client, STREAM, policy.groups)
    await add(client, STREAM, (record(i) for i in range(500)))
    await asyncio.sleep(1.1)
    await trim(client, STREAM, policy)
    assert await client.xlen(STREAM) == 0
    assert "not acknowledged" in caplog.text  # an exporter that fell behind is an error


async def test_seen_keys_expire_and_a_late_duplicate_is_only_a_duplicate(
        client: aioredis.Redis) -> None:
    [b] = list(batches(iter([record(1)])))
    await add(client, STREAM, iter([record(1)]), seen_ttl_s=1)
    assert await add(client, STREAM, iter([record(1)]), seen_ttl_s=1) == 0  # deduplicated
    assert await client.ttl(STREAM + ":seen:" + b[0][0]) == 1
    await asyncio.sleep(1.1)
    assert await add(client, STREAM, iter([record(1)]), seen_ttl_s=1) == 1  # after: added


async def until(cond: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def _xlen_at_least(client: aioredis.Redis, n: int) -> bool:
    return int(await client.xlen(STREAM)) >= n


async def _xlen_at_most(client: aioredis.Redis, n: int) -> bool:
    return int(await client.xlen(STREAM)) <= n


def usage_record(i: int) -> UsageRecord:
    return UsageRecord(**record(i))


async def test_the_sink_trims_the_stream_itself(own_redis: RedisServer, client: aioredis.Redis,
                                                tmp_path: Path) -> None:
    policy = TrimPolicy("acked", None, ("billing",))
    sink = RedisUsageSink(own_redis.url, tmp_path / "spool", stream=STREAM, trim=policy,
                          trim_every_s=0.0)
    await sink.start()
    try:
        sink.write(usage_record(0))
        await asyncio.sleep(0.2)
        assert [g["name"] for g in await client.xinfo_groups(STREAM)] == [b"billing"]
        for i in range(1, 3000):
            sink.write(usage_record(i))
        await until(lambda: _xlen_at_least(client, 3000))
        assert await consume(client, "billing") == 3000
        sink.write(usage_record(3000))  # the next delivery trims
        await until(lambda: _xlen_at_most(client, 200))
        last = (await client.xrevrange(STREAM, "+", "-", count=1))[0][1][b"data"]
        assert orjson.loads(last)["request_id"] == record(3000)["request_id"]
    finally:
        await sink.aclose()



async def test_a_backlog_is_trimmed_whole(client: aioredis.Redis) -> None:
    """Beyond XTRIM ~'s own 10,000-entry limit per call: an exporter back after an
    outage acknowledges 150k records, and one trim drops them all."""
    policy = TrimPolicy("acked", None, ("billing",))
    await ensure_groups(client, STREAM, policy.groups)
    await add(client, STREAM, (record(i) for i in range(150_000)), seen_ttl_s=0)
    assert await consume(client, "billing") == 150_000
    assert await trim(client, STREAM, policy) >= 149_000
    assert await client.xlen(STREAM) < 200
