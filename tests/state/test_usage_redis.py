"""Usage records in a Redis Stream, against a real redis-server that the tests stop and restart."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from authz.state.usage.redis_sink import OFFSET_FILE, RedisUsageSink, ensure_group, read_stream
from policy.usage import UsageRecord
from tests.redis_server import RedisServer


def rec(i: int | str) -> UsageRecord:
    return UsageRecord(
        request_id=f"r{i}", key_id="k1", org="acme", model="demo", upstream_model="tiny",
        backend="http://b", prompt_tokens=3, completion_tokens=4, total_tokens=7,
        cost_usd="0.013", status=200, stream=False, estimated=False,
        started_at="2026-01-01T00:00:00+00:00", duration_ms=1.5, endpoint="/v1/chat/completions",
    )


async def ids(url: str) -> list[str]:
    return [r["request_id"] for r in await read_stream(url)]


async def wait_for_count(url: str, n: int, within: float = 8.0) -> list[str]:
    deadline = time.monotonic() + within
    while True:
        got = await ids(url)
        if len(got) >= n or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.02)


@pytest.fixture
async def sink(tmp_path: Path, own_redis: RedisServer) -> AsyncIterator[RedisUsageSink]:
    s = RedisUsageSink(own_redis.url, tmp_path / "spool")
    await s.start()
    yield s
    await s.aclose()


async def test_records_arrive_once_in_order(sink: RedisUsageSink, own_redis: RedisServer) -> None:
    for i in range(300):  # more than one pipeline batch
        sink.write(rec(i))
    got = await wait_for_count(own_redis.url, 300)
    await asyncio.sleep(0.1)
    assert await ids(own_redis.url) == got == [f"r{i}" for i in range(300)]
    first = (await read_stream(own_redis.url))[0]
    assert first == rec(0).to_dict()
    assert sink.pending == 0


async def test_a_real_record_supersedes_a_lost_one_never_the_reverse(
    sink: RedisUsageSink, own_redis: RedisServer
) -> None:
    """A hold charged as lost whose settlement came late: both reach the stream and
    readers prefer the real one; a lost record after a real one is dropped."""
    from dataclasses import replace

    from authz.state.usage.records import one_per_request
    from policy.usage import LOST

    sink.write(replace(rec("late"), status=LOST, estimated=True))
    sink.write(rec("late"))
    sink.write(rec("done"))
    sink.write(replace(rec("done"), status=LOST, estimated=True))
    sink.write(rec("late"))  # a repeat of the real one: still one entry
    await wait_for_count(own_redis.url, 3)
    await asyncio.sleep(0.2)
    stream = await read_stream(own_redis.url)
    assert [(r["request_id"], r["status"]) for r in stream] == [
        ("rlate", LOST), ("rlate", 200), ("rdone", 200)]
    assert [(r["request_id"], r["status"]) for r in one_per_request(stream)] == [
        ("rlate", 200), ("rdone", 200)]


async def test_same_request_id_twice_is_one_entry(
    sink: RedisUsageSink, own_redis: RedisServer
) -> None:
    sink.write(rec("dup"))
    sink.write(rec("other"))
    sink.write(rec("dup"))
    await wait_for_count(own_redis.url, 2)
    await asyncio.sleep(0.2)
    assert await ids(own_redis.url) == ["rdup", "rother"]


async def test_consumer_group_reads_and_acks(sink: RedisUsageSink, own_redis: RedisServer) -> None:
    await ensure_group(own_redis.url, "billing")
    await ensure_group(own_redis.url, "billing")  # BUSYGROUP is ignored
    for i in range(5):
        sink.write(rec(i))
    await wait_for_count(own_redis.url, 5)
    client = aioredis.Redis.from_url(own_redis.url)
    try:
        resp: Any = await client.xreadgroup("billing", "c1", {"tb:usage": ">"}, count=10)
        entries = resp[0][1]
        assert [orjson.loads(e[1][b"data"])["request_id"] for e in entries] == [
            f"r{i}" for i in range(5)
        ]
        await client.xack("tb:usage", "billing", *[e[0] for e in entries])
        assert (await client.xpending("tb:usage", "billing"))["pending"] == 0
    finally:
        await client.aclose()


async def test_redis_outage_spools_then_delivers(
    sink: RedisUsageSink, own_redis: RedisServer
) -> None:
    for i in range(5):
        sink.write(rec(i))
    assert len(await wait_for_count(own_redis.url, 5)) == 5
    own_redis.stop()
    for i in range(5, 25):
        t0 = time.perf_counter()
        sink.write(rec(i))
        # Never waits on the network (its timeout is 0.25 s); a busy machine's
        # preemption or a GC pause can take a few ms.
        assert time.perf_counter() - t0 < 0.1
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)  # the drain task is failing and backing off meanwhile
    own_redis.start()  # an empty Redis again (no persistence in the tests)
    got = await wait_for_count(own_redis.url, 20)
    await asyncio.sleep(0.2)
    # Records 0-4 went to the old, forgotten Redis; 5-24 arrive once each, in order.
    assert await ids(own_redis.url) == got == [f"r{i}" for i in range(5, 25)]


async def test_crash_then_second_sink_delivers_rest_without_duplicates(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    spool = tmp_path / "spool"
    first = RedisUsageSink(own_redis.url, spool)
    await first.start()
    for i in range(10):
        first.write(rec(i))
    await wait_for_count(own_redis.url, 10)
    # Process death: the drain stops without draining, more records are spooled, and
    # the offset is lost (a crash after XADD but before the offset was saved).
    first._stop.set()
    first._wake.set()
    assert first._task is not None
    await first._task
    for i in range(10, 20):
        first.write(rec(i))
    (spool / OFFSET_FILE).unlink()
    first.close()
    await first._redis.aclose()

    second = RedisUsageSink(own_redis.url, spool)
    await second.start()
    try:
        got = await wait_for_count(own_redis.url, 20)
        await asyncio.sleep(0.2)
        assert await ids(own_redis.url) == got == [f"r{i}" for i in range(20)]
    finally:
        await second.aclose()


async def test_records_survive_a_restart_without_start(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    spool = tmp_path / "spool"
    first = RedisUsageSink(own_redis.url, spool, segment_bytes=1000)
    for i in range(30):  # several segments
        first.write(rec(i))
    first.close()
    await first._redis.aclose()
    assert len(list(spool.glob("*.spool"))) > 3
    second = RedisUsageSink(own_redis.url, spool, segment_bytes=1000)
    await second.start()
    try:
        assert await wait_for_count(own_redis.url, 30) == [f"r{i}" for i in range(30)]
        await asyncio.sleep(0.1)
        # Drained segments are deleted; only the one being written stays (empty).
        left = list(spool.glob("*.spool"))
        assert len(left) == 1 and left[0].stat().st_size == 0
    finally:
        await second.aclose()


async def test_damaged_tail_is_skipped(
    tmp_path: Path, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool"
    first = RedisUsageSink(own_redis.url, spool)
    for i in range(3):
        first.write(rec(i))
    first.close()
    await first._redis.aclose()
    seg = next(spool.glob("*.spool"))
    with seg.open("ab") as f:
        f.write(b'{"request_id": "half-writ')  # a crash mid-write
    second = RedisUsageSink(own_redis.url, spool)
    await second.start()
    try:
        second.write(rec(3))
        assert await wait_for_count(own_redis.url, 4) == ["r0", "r1", "r2", "r3"]
    finally:
        await second.aclose()
    assert "damaged usage line" in caplog.text


async def test_full_spool_logs_the_record(
    tmp_path: Path, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    own_redis.stop()
    s = RedisUsageSink(own_redis.url, tmp_path / "spool", max_spool_bytes=1000)
    await s.start()
    with caplog.at_level(logging.ERROR, logger="tokenbooth.records"):
        for i in range(10):
            s.write(rec(i))
    t0 = time.monotonic()
    await s.aclose()  # Redis down: gives up promptly, the spool keeps the records
    assert time.monotonic() - t0 < 1.0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert 0 < len(errors) < 10 and all("record not stored" in r.getMessage() for r in errors)
    assert '"request_id":"r9"' in errors[-1].getMessage()
    own_redis.start()
    again = RedisUsageSink(own_redis.url, tmp_path / "spool")
    await again.start()
    try:
        got = await wait_for_count(own_redis.url, 10 - len(errors))
        assert got == [f"r{i}" for i in range(10 - len(errors))]
    finally:
        await again.aclose()


async def test_one_sink_per_spool(tmp_path: Path, own_redis: RedisServer) -> None:
    first = RedisUsageSink(own_redis.url, tmp_path / "spool")
    with pytest.raises(RuntimeError, match="each replica needs a data_dir of its own"):
        RedisUsageSink(own_redis.url, tmp_path / "spool")
    await first.aclose()
    second = RedisUsageSink(own_redis.url, tmp_path / "spool")
    await second.aclose()


def ended(i: int | str, end: float, status: int | str = 200) -> UsageRecord:
    """A record of a request that ended at `end` (epoch seconds), 1 s after its start."""
    from dataclasses import replace
    from datetime import UTC, datetime

    start = datetime.fromtimestamp(end - 1.0, UTC).isoformat()
    return replace(rec(i), started_at=start, duration_ms=1000.0, status=status)


async def test_the_previous_process_s_last_real_records_are_read_at_start(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    """What a restart settles again (authz/state/limits/resettle.py): the real records
    the previous process wrote within the horizon of its last one, newest first; not a
    `lost` record (whatever its end), not one of this process, nothing once started."""
    from policy.usage import LOST

    spool, t = tmp_path / "spool", 1_800_000_000.0
    first = RedisUsageSink(own_redis.url, spool)
    # (the scan stops at a record twice the horizon old: what comes before it is not
    # read, whatever its end, so that a start never reads a whole spool)
    for r in (ended("hidden", t), ended("old", t - 100), ended("out", t - 30.5),
              ended("in", t - 29.5),
              ended("late", t - 45),  # written after its end (a recount): within 2x
              ended("last", t), ended("swept", t + 500, status=LOST),
              ended("swept-old", t - 500, status=LOST)):
        first.write(r)
    first.close()
    await first._redis.aclose()
    second = RedisUsageSink(own_redis.url, spool)
    second.write(ended("mine", t + 1))  # this process's own: not the previous one's
    try:
        got = [r["request_id"] for r in second.previous_records(30.0, 100)]
        assert got == ["rlast", "rin"]
        assert second.previous_records(30.0, 1) == [ended("last", t).to_dict()]
        assert [r["request_id"] for r in second.previous_records(100.0, 100)] == [
            "rlast", "rlate", "rin", "rout", "rold", "rhidden"]
        await second.start()
        with pytest.raises(RuntimeError):  # its drain retires the previous segments
            second.previous_records(30.0, 100)
    finally:
        await second.aclose()


async def test_a_delivered_segment_is_kept_for_the_next_start(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    """A process that rotated its segment just before it stopped: the records before the
    rotation were delivered, and the segment kept (one, `.sent`), so the next start
    still reads them."""
    spool = tmp_path / "spool"
    first = RedisUsageSink(own_redis.url, spool, segment_bytes=1000)
    await first.start()
    for i in range(30):  # several segments
        first.write(rec(i))
    assert await wait_for_count(own_redis.url, 30) == [f"r{i}" for i in range(30)]
    await first.aclose()
    assert len(list(spool.glob("*.sent"))) == 1  # the last one delivered, no more
    last = max(spool.glob("*.spool"))
    in_last = len(last.read_bytes().splitlines())
    second = RedisUsageSink(own_redis.url, spool, segment_bytes=1000)
    try:
        got = [r["request_id"] for r in second.previous_records(30.0, 1000)]
        assert got == [f"r{i}" for i in range(29, 29 - len(got), -1)]
        assert len(got) > in_last  # the kept segment's records too
        await second.start()
        second.write(rec(30))
        await wait_for_count(own_redis.url, 31)
        await asyncio.sleep(0.1)
        assert len(list(spool.glob("*.sent"))) == 1
    finally:
        await second.aclose()
