"""GET /v1/usage with usage.sink: SQL totals, groups and keyset pages over the PostgreSQL
archive plus the stream's tail, against the endpoint's in-memory path over the same
records (one per request_id). Real redis-server and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from authz.runtime.admin_api import AdminContext, AdminError, Call, usage
from authz.state.usage.exporter import Exporter
from authz.state.usage.trim import EXPORT_GROUP, TrimPolicy
from policy.admin_schema import UsagePage, UsageQuery
from policy.config import Config, parse_config
from policy.usage import LOST
from tests.helpers import policy_dict
from tests.redis_server import RedisServer
from tests.state.usage.gen import add, record, reference

STREAM = "tb:{usage}"
N = 3000


@pytest.fixture
async def setup(own_redis: RedisServer, pg_db: str, tmp_path: Path,
                ) -> tuple[Config, list[dict[str, Any]]]:
    client = aioredis.Redis.from_url(own_redis.url)
    archived = [record(i, LOST if i % 50 == 0 else 200) for i in range(N)]
    await add(client, STREAM, iter(archived), seen_ttl_s=0)
    ex = Exporter(own_redis.url, pg_db, stream=STREAM,
                  trim_policy=TrimPolicy(groups=(EXPORT_GROUP,)))
    await ex.run(asyncio.Event(), until_idle=True)
    await ex.aclose()
    tail = [record(i) for i in range(N, N + 120)] + [record(i) for i in range(0, 600, 50)]
    tail += [record(i) for i in range(3, 40, 3)]  # redelivered: already archived
    await add(client, STREAM, iter(tail), seen_ttl_s=0)
    await client.aclose()
    cfg = parse_config({**policy_dict("http://127.0.0.1:1"), "state": own_redis.url,
                        "usage": {"sink": pg_db}}, base_dir=tmp_path)
    return cfg, list(reference(archived + tail).values())


async def pages(ctx: AdminContext, **query: Any) -> tuple[list[str], UsagePage]:
    """Every page of a query: the request ids in order, and the first page."""
    ids: list[str] = []
    first: UsagePage | None = None
    after = None
    while True:
        q = UsageQuery(**query, **({"after": after} if after else {}))
        page = cast(UsagePage, await usage(ctx, Call(params={}, query=q)))
        first = first or page
        ids += [r.request_id for r in page.data]
        if not page.has_more:
            break
        after = page.last_id
    assert first is not None
    return ids, first


@pytest.mark.parametrize("query", [
    {"limit": 700}, {"limit": 500, "org": "org-2", "group_by": "model"},
    {"limit": 1000, "key": "key-011", "group_by": "org"},
    {"limit": 300, "since": datetime(2026, 3, 4, tzinfo=UTC), "group_by": "key"},
])
async def test_sql_pages_match_the_in_memory_path(
        setup: tuple[Config, list[dict[str, Any]]], query: dict[str, Any]) -> None:
    cfg, records = setup

    async def fixed(_: Config) -> list[dict[str, Any]]:
        return records

    none: Any = None
    sql = AdminContext(lambda: cfg, none, none, none, none)
    ref = AdminContext(lambda: cfg, none, none, none, none, usage=fixed)
    got_ids, got = await pages(sql, **query)
    want_ids, want = await pages(ref, **query)
    assert len(got_ids) == len(set(got_ids))  # no record on two pages
    assert sorted(got_ids) == sorted(want_ids)
    assert got.totals == want.totals
    assert got.groups == want.groups
    assert got.totals.requests == len(want_ids) > 0


async def test_an_unknown_cursor_is_a_400_on_both_paths(
        setup: tuple[Config, list[dict[str, Any]]]) -> None:
    cfg, records = setup

    async def fixed(_: Config) -> list[dict[str, Any]]:
        return records

    none: Any = None
    for ctx in (AdminContext(lambda: cfg, none, none, none, none),
                AdminContext(lambda: cfg, none, none, none, none, usage=fixed)):
        with pytest.raises(AdminError) as e:
            await usage(ctx, Call(params={}, query=UsageQuery(after="req-nope")))
        assert (e.value.status, e.value.param) == (400, "after")


async def test_before_the_exporter_made_its_table_the_stream_is_read(
        own_redis: RedisServer, pg_db: str, tmp_path: Path) -> None:
    """A sink whose table does not exist yet (no exporter has started): the archive is
    empty, and the snapshot the reads share survives the missing table."""
    client = aioredis.Redis.from_url(own_redis.url)
    await client.xgroup_create("tb:{usage}", EXPORT_GROUP, id="0", mkstream=True)
    await add(client, "tb:{usage}", iter([record(i) for i in range(5)]), seen_ttl_s=0)
    await client.aclose()
    cfg = parse_config({**policy_dict("http://127.0.0.1:1"), "state": own_redis.url,
                        "usage": {"sink": pg_db}}, base_dir=tmp_path)
    from authz.state.usage.reading import load_usage

    got = await load_usage(cfg)
    assert sorted(r["request_id"] for r in got) == [f"req-{i:09d}" for i in range(5)]
