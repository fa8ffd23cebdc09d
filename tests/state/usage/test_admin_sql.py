"""GET /v1/usage with usage.sink: SQL totals, groups and keyset pages over the PostgreSQL
archive plus the stream's tail, against the endpoint's in-memory path over the same
records (one per request_id). Real redis-server and PostgreSQL."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest
import redis.asyncio as aioredis

from authz.runtime.admin_api import AdminContext, AdminError, Call, usage
from authz.state.usage import archive
from authz.state.usage.exporter import Exporter
from authz.state.usage.trim import EXPORT_GROUP, TrimPolicy, parse_id
from policy.admin_schema import UsagePage, UsageQuery
from policy.config import Config, parse_config
from policy.usage import LOST
from tests.helpers import policy_dict
from tests.redis_server import RedisServer
from tests.state.usage.gen import add, old_schema, record, reference

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


async def test_a_table_still_at_version_3_is_read(
        own_redis: RedisServer, pg_db: str, tmp_path: Path) -> None:
    """A rolling upgrade that reaches the replicas before the exporter: the table is at
    version 3 (no entry ids), written by an exporter of that version. Records are listed
    and paged in its order (seq), then the tail's; the same cursor still holds once the
    table is migrated."""
    conn = await asyncpg.connect(pg_db)
    client = aioredis.Redis.from_url(own_redis.url)
    try:
        await old_schema(conn, 3, [record(i) for i in (2, 0, 1)])  # exported so
        await client.xgroup_create(STREAM, EXPORT_GROUP, id="0", mkstream=True)
        await add(client, STREAM, iter([record(i) for i in range(3, 5)]), seen_ttl_s=0)
        cfg = parse_config({**policy_dict("http://127.0.0.1:1"), "state": own_redis.url,
                            "usage": {"sink": pg_db}}, base_dir=tmp_path)
        none: Any = None
        ctx = AdminContext(lambda: cfg, none, none, none, none)
        want = [f"req-{i:09d}" for i in (2, 0, 1, 3, 4)]

        async def after_0() -> list[str]:
            q = UsageQuery(limit=10, after="req-000000000")
            return [r.request_id for r in
                    cast(UsagePage, await usage(ctx, Call(params={}, query=q))).data]

        ids, first = await pages(ctx, limit=2)
        assert ids == want and first.totals.requests == 5
        assert await after_0() == want[2:]
        from authz.state.usage.reading import load_usage

        assert [r["request_id"] for r in await load_usage(cfg)] == want
        assert await archive.migrate(conn) == 5
        assert await after_0() == want[2:]
    finally:
        await client.aclose()
        await conn.close()


class _Hand:
    """An exporter's protocol by hand, one step at a time: XREADGROUP a batch as consumer
    `name`, later store it (archive.store, with each entry's id) and XACK it. Two of them
    commit in whatever order the test says."""

    def __init__(self, name: str, client: aioredis.Redis, conn: Any) -> None:
        self.name, self.client, self.conn = name, client, conn
        self.held: list[tuple[bytes, dict[bytes, bytes]]] = []

    async def read(self, n: int) -> None:
        if not self.held:
            got: Any = await self.client.xreadgroup(EXPORT_GROUP, self.name, {STREAM: ">"},
                                                    count=n)
            self.held = list(got[0][1]) if got else []

    async def commit(self) -> None:
        rows = [archive.row(archive.loads(f[b"data"]), parse_id(i)) for i, f in self.held]
        await archive.store(self.conn, rows, [])
        if self.held:
            await self.client.xack(STREAM, EXPORT_GROUP, *(i for i, _ in self.held))
        self.held = []


@pytest.mark.parametrize("seed", range(24))
async def test_paging_misses_nothing_exporters_commit_out_of_order(
        own_redis: RedisServer, pg_db: str, tmp_path: Path, seed: int) -> None:
    """A client pages with `after` while records are written and two exporters commit
    their batches in any order (one holds its batch while the other commits later
    entries), and `lost` records are corrected later: every request comes exactly once,
    at its first entry's place. Pages follow the stream's order, not the table's commit
    order."""
    rng = random.Random(seed)
    client = aioredis.Redis.from_url(own_redis.url)
    await client.xgroup_create(STREAM, EXPORT_GROUP, id="0", mkstream=True)
    conn = await asyncpg.connect(pg_db)
    await archive.migrate(conn)
    cfg = parse_config({**policy_dict("http://127.0.0.1:1"), "state": own_redis.url,
                        "usage": {"sink": pg_db}}, base_dir=tmp_path)
    none: Any = None
    ctx = AdminContext(lambda: cfg, none, none, none, none)
    hands = [_Hand("a", client, conn), _Hand("b", client, conn)]
    written: list[dict[str, Any]] = []
    lost: list[int] = []  # records written `lost`, not corrected yet
    seen: list[str] = []
    after: str | None = None
    done = False

    async def page() -> bool:
        """The next page; whether there was more."""
        nonlocal after
        q = UsageQuery(limit=rng.randint(1, 4), **({"after": after} if after else {}))
        got = cast(UsagePage, await usage(ctx, Call(params={}, query=q)))
        seen.extend(r.request_id for r in got.data)
        after = got.last_id or after
        return got.has_more

    try:
        for _ in range(60):
            step = rng.random()
            if step < 0.3:
                if lost and rng.random() < 0.3:  # a late settlement's record corrects one
                    new = [record(lost.pop(rng.randrange(len(lost))))]
                else:
                    i = len({r["request_id"] for r in written})
                    new = [record(i, LOST if rng.random() < 0.2 else 200)]
                    if new[0]["status"] == LOST:
                        lost.append(i)
                written += new
                await add(client, STREAM, iter(new), seen_ttl_s=0)
            elif step < 0.5:
                await rng.choice(hands).read(rng.randint(1, 3))
            elif step < 0.7:
                await rng.choice(hands).commit()
            else:
                await page()
        for h in hands:
            await h.commit()
        while not done:  # the rest, now that nothing moves
            done = not await page()
        # Read again from the start: in order, each request once, corrections in place.
        again: list[str] = []
        statuses: dict[str, Any] = {}
        cursor: str | None = None
        while True:
            q = UsageQuery(limit=7, **({"after": cursor} if cursor else {}))
            got = cast(UsagePage, await usage(ctx, Call(params={}, query=q)))
            again += [r.request_id for r in got.data]
            statuses |= {r.request_id: r.status for r in got.data}
            if not got.has_more:
                break
            cursor = got.last_id
    finally:
        await conn.close()
        await client.aclose()
    want = reference(written)
    assert set(seen) == set(want)
    assert len(seen) == len(set(seen)), "a record on two pages"
    assert sorted(again) == sorted(want) and len(again) == len(set(again))
    assert statuses == {rid: r["status"] for rid, r in want.items()}
