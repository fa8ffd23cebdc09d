"""Reading usage records when PostgreSQL is the ledger of record (usage.sink).

The records are the archive (`usage_records`) and the stream's tail: the entries the
export group has not acknowledged yet (not exported, or exported and not yet
acknowledged). `tail()` reads the tail and checks its request ids against the archive:
a tail record already stored is dropped, except a real one whose stored row is `lost`
(it will replace that row) or one whose entry came before the stored row's (the row
will move there): then it is read from the tail, and the row excluded from the
archive's side. A request's place is its earliest entry's, wherever that is. Totals
and groups are SQL aggregates (GROUP BY) over the archive, merged with the tail's in
policy/usage_report.py. Records are read by keyset pages in stream order
(archive.ORDER_KEY), the tail's records carrying their places: one order across both,
whatever order exporters commit in.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

import asyncpg  # type: ignore[import-untyped]  # no stubs
import orjson

from authz.state.keys.redis_store import connect as redis_connect
from authz.state.usage import archive
from authz.state.usage.records import USAGE_STREAM, one_per_request
from authz.state.usage.trim import EXPORT_GROUP, acked_cut, parse_id
from policy.config import Config
from policy.usage import LOST
from policy.usage_report import Selection, Totals

PAGE = 5000
_GROUP_SQL = {
    "key": "key_id", "org": "org", "model": "model",
    "day": "to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "hour": "to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24\":00Z\"')",
}


@dataclass
class Tail:
    """The stream's records the archive does not hold (see the module)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    keys: list[archive.OrderKey] = field(default_factory=list)  # each record's entry id
    exclude: list[str] = field(default_factory=list)  # archive rows they replace


def snapshot(conn: asyncpg.Connection) -> Any:
    """A read-only REPEATABLE READ transaction for the tail's archive check and every
    archive read after it: one snapshot, so a record the exporter commits meanwhile is
    either stored in it (dropped from the tail) or not (counted from the tail), never
    both. Open it before `tail()`; the stream is read before its first query."""
    return conn.transaction(isolation="repeatable_read", readonly=True)


async def tail(cfg: Config, conn: asyncpg.Connection) -> Tail:
    client = redis_connect(cfg.state, 5.0)
    try:
        cut = await acked_cut(client, USAGE_STREAM, (EXPORT_GROUP,))
        entries: list[dict[str, Any]] = []
        first: dict[str, archive.OrderKey] = {}  # each request's earliest entry here
        start = f"{cut[0]}-{cut[1]}"
        while page := cast(Any, await client.xrange(USAGE_STREAM, start, "+", count=PAGE)):
            for entry_id, fields in page:
                raw = (fields or {}).get(b"data")
                rec = orjson.loads(raw) if raw else None
                if isinstance(rec, dict) and isinstance(rid := rec.get("request_id"), str):
                    entries.append(rec)
                    first.setdefault(rid, parse_id(entry_id))
            if len(page) < PAGE:
                break
            start = "(" + page[-1][0].decode()
    finally:
        await client.aclose()
    recs = list(one_per_request(entries))
    order, columns = await _schema(conn)
    stored = {r["request_id"]: ((int(r[0]), int(r[1])), archive.record(tuple(r)[2:]))
              for r in await _fetch(
        conn, f"SELECT {order}, {columns} FROM {archive.TABLE} "  # noqa: S608
        "WHERE request_id = ANY($1)", [r["request_id"] for r in recs])}
    out = Tail()
    for r in recs:
        rid = r["request_id"]
        place, kept = first[rid], r
        if rid in stored:
            # Stored already: the row stands, unless this real record corrects its `lost`
            # one, or an entry here came before the row's (the exporter holding it has
            # not committed yet): then it is read from here, at the earlier place.
            at, row = stored[rid]
            if not (row["status"] == LOST and r.get("status") != LOST):
                kept = row
            if kept is row and at <= place:
                continue
            place = min(place, at)
            out.exclude.append(rid)
        out.records.append(kept)
        out.keys.append(place)
    return out


async def _fetch(conn: asyncpg.Connection, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Rows of a query; none while the exporter has not made the table yet."""
    try:
        # A savepoint inside snapshot(): a missing table leaves the transaction usable.
        async with conn.transaction():
            return list(await conn.fetch(sql, *args))
    except asyncpg.UndefinedTableError:
        return []


def where(sel: Selection, exclude: list[str]) -> tuple[str, list[Any]]:
    """The WHERE clause of a selection (and the rows the tail replaces), its arguments."""
    parts: list[str] = ["true"]
    args: list[Any] = []
    for column, value in (("org", sel.org), ("key_id", sel.key)):
        if value is not None:
            args.append(value)
            parts.append(f"{column} = ${len(args)}")
    if sel.since is not None:
        args.append(since_utc(sel.since))
        parts.append(f"started_at >= ${len(args)}")
    if exclude:
        args.append(exclude)
        parts.append(f"NOT (request_id = ANY(${len(args)}))")
    return " AND ".join(parts), args


async def aggregate(conn: asyncpg.Connection, sel: Selection, group_by: tuple[str, ...],
                    exclude: list[str]) -> list[tuple[tuple[str, ...], Totals]]:
    """Totals per group of the archive's selected rows (one row, group (), without
    group_by)."""
    cond, args = where(sel, exclude)
    groups = [_GROUP_SQL[g] for g in group_by]
    sql = (f"SELECT {''.join(g + ', ' for g in groups)}count(*), sum(prompt_tokens), "  # noqa: S608
           f"sum(completion_tokens), sum(total_tokens), sum(cost_usd) FROM {archive.TABLE} "
           f"WHERE {cond}" + (f" GROUP BY {', '.join(groups)}" if groups else ""))
    out = []
    for r in await _fetch(conn, sql, *args):
        values, (n, p, c, t, cost) = tuple(r)[:len(groups)], tuple(r)[len(groups):]
        if n:
            out.append((tuple(str(v) for v in values),
                        Totals(Decimal(cost or 0), int(n), int(p or 0), int(c or 0),
                               int(t or 0))))
    return out


async def pages(conn: asyncpg.Connection, sel: Selection, exclude: list[str],
                after: archive.OrderKey = (-1, -1), limit: int | None = None,
                ) -> AsyncIterator[list[tuple[archive.OrderKey, dict[str, Any]]]]:
    """The archive's selected rows after `after` in stream order, a page at a time:
    (order key, record)."""
    cond, args = where(sel, exclude)
    order, columns = await _schema(conn)
    left = limit
    while left is None or left > 0:
        n = PAGE if left is None else min(PAGE, left)
        found = await _fetch(
            conn, f"SELECT {order}, {columns} "  # noqa: S608
            f"FROM {archive.TABLE} WHERE {cond} AND ({order}) > "
            f"(${len(args) + 1}, ${len(args) + 2}) ORDER BY {order} LIMIT {n}",
            *args, *after)
        if not found:
            return
        yield [((r[0], r[1]), archive.record(tuple(r)[2:])) for r in found]
        after = (found[-1][0], found[-1][1])
        if left is not None:
            left -= len(found)
        if len(found) < n:
            return


async def key_of(conn: asyncpg.Connection, request_id: str) -> archive.OrderKey | None:
    """Where an archived record stands in the order (None: not archived)."""
    found = await _fetch(
        conn, f"SELECT {(await _schema(conn))[0]} FROM {archive.TABLE} "  # noqa: S608
        "WHERE request_id = $1", request_id)
    return (int(found[0][0]), int(found[0][1])) if found else None


async def _schema(conn: asyncpg.Connection) -> tuple[str, str]:
    """(archive.ORDER_KEY, archive.SELECT_COLUMNS), or their forms for the version the
    table is at while no exporter has migrated it (a rolling upgrade that reaches the
    replicas first): version 3 has no stream order, version 4 no hold bounds."""
    found = await _fetch(conn, "SELECT version FROM tokenbooth_schema "
                               "WHERE component = 'usage'")
    version = found[0][0] if found else 0
    return (archive.ORDER_KEY if version >= 4 else archive.ORDER_KEY_V3,
            archive.SELECT_COLUMNS if version >= 5 else archive.SELECT_COLUMNS_V4)


async def every_record(cfg: Config, sel: Selection | None = None,
                       ) -> AsyncGenerator[list[dict[str, Any]], None]:
    """Every record, archive then tail, a page at a time; each request once."""
    assert cfg.usage.sink is not None
    conn = await archive.connect(cfg.usage.sink)
    try:
        async with snapshot(conn):
            t = await tail(cfg, conn)
            async for page in pages(conn, sel or Selection(), t.exclude):
                yield [r for _, r in page]
        yield t.records
    finally:
        await conn.close()


def since_utc(t: datetime | None) -> datetime | None:
    """A naive time is UTC (as policy/usage_report.started_at reads records)."""
    from datetime import UTC

    return t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t
