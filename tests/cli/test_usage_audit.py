"""`tokenbooth audit` with usage.sink: the records are the PostgreSQL archive plus the
stream's unexported tail, so the audit still balances once the exported records are
trimmed from Redis. Real Redis limit store, sink, exporter and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import redis.asyncio as aioredis

from authz.state.limits.redis_limits import RedisLimitStore
from authz.state.usage.exporter import Exporter
from authz.state.usage.records import USAGE_STREAM, make_sink
from authz.state.usage.redis_sink import RedisUsageSink
from authz.state.usage.trim import TrimPolicy
from policy.config import load_config
from policy.limits import period_id
from policy.usage import Usage
from tests.cli.test_audit import KEY, KEYS, ORGS, Gateway, _traffic, audit
from tests.helpers import write_policy
from tests.redis_server import RedisServer


async def test_audit_balances_from_the_archive_and_the_tail(
        own_redis: RedisServer, pg_db: str, tmp_path: Path) -> None:
    path = write_policy(tmp_path, "http://127.0.0.1:8000", state=own_redis.url, keys=KEYS,
                        orgs=ORGS, usage={"sink": pg_db, "trim_every_s": 0.01})
    cfg, now = load_config(path), datetime.now(UTC)
    store, sink = RedisLimitStore(cfg.state, timeout_s=2.0), make_sink(cfg)
    assert isinstance(sink, RedisUsageSink)
    await sink.start()
    gw = Gateway(cfg, store, sink)
    await _traffic(gw, now)
    await asyncio.sleep(0.3)  # delivered
    ex = Exporter(cfg.state, pg_db, stream=USAGE_STREAM,
                  trim_policy=TrimPolicy.from_config(cfg.usage), trim_every_s=0.0)
    await ex.run(asyncio.Event(), until_idle=True)
    await ex.aclose()
    client = aioredis.Redis.from_url(cfg.state)
    assert await client.xlen(USAGE_STREAM) == 0  # exported, then trimmed
    await gw.request("late", KEY, Usage(5, 5), now)  # in the stream's tail only
    await asyncio.sleep(0.3)
    assert await client.xlen(USAGE_STREAM) == 1
    await client.aclose()
    await sink.aclose()
    await store.close()

    rc, out, err = await asyncio.to_thread(audit, path)
    assert (rc, err) == (0, ""), out
    rows = {(r["owner"], r["period"]): r for r in out["ledgers"]}
    mine = rows[KEY, period_id("day", now)]
    assert [mine[k] for k in ("records", "settling", "drift")] == [4, 1, False]
    assert rows["org:acme", period_id("month", now)]["records"] == 5


async def test_audit_without_a_sink_leaves_trimmed_periods_uncompared(
        own_redis: RedisServer, tmp_path: Path) -> None:
    """No archive: what the retention trims is gone, so the periods it reaches are not
    compared (they would show as drift), and the report says from when records exist."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000", state=own_redis.url, keys=KEYS,
                        orgs=ORGS)
    cfg, now = load_config(path), datetime.now(UTC)
    store, sink = RedisLimitStore(cfg.state, timeout_s=2.0), make_sink(cfg)
    assert isinstance(sink, RedisUsageSink)
    await sink.start()
    await _traffic(Gateway(cfg, store, sink), now)
    await asyncio.sleep(0.3)  # delivered
    await sink.aclose()
    await store.close()
    rc, out, _ = await asyncio.to_thread(audit, path)
    assert rc == 0 and out["records_trimmed_before"] is None, out
    assert not any(r["trimmed"] for r in out["ledgers"])

    client = aioredis.Redis.from_url(cfg.state)
    [(oldest, _)] = await client.xrange(USAGE_STREAM, count=1)
    await client.xdel(USAGE_STREAM, oldest)  # what a retention trim does to it
    await client.aclose()
    rc, out, err = await asyncio.to_thread(audit, path)
    assert (rc, err) == (0, ""), out
    assert out["records_trimmed_before"] is not None
    assert all(r["trimmed"] and not r["drift"] for r in out["ledgers"]), out
    assert any(r["spent_nano"] != r["records_nano"] for r in out["ledgers"]), out
