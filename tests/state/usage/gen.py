"""Usage records made up for the tests of the stream, its trim and the exporter, and a
bulk path into the stream: the sink's own delivery script, a batch per call."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import orjson
import redis.asyncio as aioredis

from authz.state.usage.redis_sink import Delivery, deliver
from policy.usage import LOST

ORGS, KEYS, MODELS, DAYS = 7, 50, 3, 5


def record(i: int, status: int | str = 200) -> dict[str, Any]:
    """Record `i`; every third says which ledgers it was charged to (`i % 3 == 0`), or
    that it was charged to none (`i % 3 == 1`); the rest are an older tokenbooth's."""
    p, c = 100 + i % 900, i % 257
    ledgers: dict[str, Any] = (
        {"key_budget_period": "month:2026-03", "org_budget_period": "total",
         "sequences": 1 + i % 4, "prompt_bound": p + 10, "completion_bound": c + 5}
        if i % 3 == 0
        else {"key_budget_period": None, "org_budget_period": None} if i % 3 == 1 else {})
    return {**ledgers,
        "request_id": f"req-{i:09d}", "key_id": f"key-{i % KEYS:03d}", "org": f"org-{i % ORGS}",
        "model": f"model-{i % MODELS}", "upstream_model": "up", "backend": "http://b:8000",
        "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
        "cost_usd": f"0.{i % 1000:03d}5", "status": status, "stream": i % 2 == 0,
        "estimated": status == LOST, "duration_ms": 12.5, "endpoint": "chat",
        "started_at": f"2026-03-0{1 + i % DAYS}T{i % 24:02d}:{i % 60:02d}:00.123456Z",
    }


def batches(records: Iterator[dict[str, Any]], size: int = 1000, ttl: int = 600,
            ) -> Iterator[list[Delivery]]:
    out: list[Delivery] = []
    for r in records:
        out.append((r["request_id"], "lost" if r.get("status") == LOST else "1", ttl,
                    orjson.dumps(r)))
        if len(out) == size:
            yield out
            out = []
    if out:
        yield out


async def add(client: aioredis.Redis, stream: str, records: Iterator[dict[str, Any]],
              seen_ttl_s: int = 600) -> int:
    """Delivers records as the sink does, a thousand per script call; the number added."""
    n = 0
    for b in batches(records, ttl=seen_ttl_s):
        n += await deliver(client, stream, b, seen_ttl_s)
    return n


def reference(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What the ledger must hold: one record per request_id, a real one over a lost one."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        old = out.get(r["request_id"])
        if old is None or (old["status"] == LOST and r["status"] != LOST):
            out[r["request_id"]] = r
    return out


def total_cost(records: Iterator[dict[str, Any]]) -> Decimal:
    return sum((Decimal(r["cost_usd"]) for r in records), Decimal(0))


async def old_schema(conn: Any, version: int, rows: list[dict[str, Any]]) -> str:
    """The usage tables as a tokenbooth at schema `version` left them, holding `rows`
    inserted as it wrote them (its columns; no stream entry id before 4); the INSERT it
    used, to write more that way."""
    from authz.state.usage import archive

    columns = (archive._COLUMNS[:16] if version == 1 else archive._COLUMNS[:19] if version < 5
               else archive._COLUMNS)
    insert = (f"INSERT INTO usage_records ({', '.join(columns)}) VALUES "
              f"({', '.join(f'${i + 1}' for i in range(len(columns)))})")
    async with conn.transaction():
        await conn.execute("CREATE TABLE tokenbooth_schema (component text PRIMARY KEY, "
                           "version integer NOT NULL)")
        for v in range(1, version + 1):
            await conn.execute(archive._MIGRATIONS[v])
        await conn.execute("INSERT INTO tokenbooth_schema VALUES ('usage', $1)", version)
        for r in rows:
            await conn.execute(insert, *archive.row(r)[:len(columns)])
    return insert
