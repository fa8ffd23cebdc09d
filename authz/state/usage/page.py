"""GET /v1/usage's page when PostgreSQL is the ledger of record (usage.sink): totals and
groups by SQL aggregates merged with the stream's tail (query.py), and one page of
records: the archive's and the tail's merged in stream order (each record's entry id), so
a client paging with `after` (a request_id) across answers misses none that exporters
commit meanwhile, in whatever order."""

from __future__ import annotations

import heapq
import itertools
from typing import Any

from pydantic import ValidationError

from authz.state.usage import archive, query
from policy.admin_schema import (
    UnknownCursor,
    UsageGroup,
    UsagePage,
    UsageQuery,
    UsageRecordOut,
    UsageTotals,
)
from policy.config import Config
from policy.usage_report import Selection, UsageReport


async def sql_page(cfg: Config, q: UsageQuery) -> UsagePage:
    assert cfg.usage.sink is not None
    sel = Selection(q.org, q.key, query.since_utc(q.since))
    report = UsageReport(sel, (q.group_by,) if q.group_by else ())
    conn = await archive.connect(cfg.usage.sink)
    try:
        async with query.snapshot(conn):
            t = await query.tail(cfg, conn)
            for group, totals in await query.aggregate(conn, sel, report.group_by,
                                                       t.exclude):
                report.merge(group, totals)
            counted = [r for rec in t.records if (r := report.feed(rec)) is not None]
            counted += report.finish()  # the `lost` ones, held back until the end
            key = {r["request_id"]: k for k, r in zip(t.keys, t.records, strict=True)}
            tail = sorted(((key[r["request_id"]], r) for r in counted), key=lambda kr: kr[0])
            rows = await _page(conn, q, sel, t.exclude, tail)
    finally:
        await conn.close()
    data = [out for r in rows[:q.limit] if (out := _valid(r)) is not None]
    groups = None if not q.group_by else [
        UsageGroup(group=g[0], **tot.as_dict()) for g, tot in report.groups()]
    return UsagePage(data=data, totals=UsageTotals(**report.totals.as_dict()), groups=groups,
                     has_more=len(rows) > q.limit,
                     last_id=data[-1].request_id if data else None)


async def _page(conn: Any, q: UsageQuery, sel: Selection, exclude: list[str],
                tail: list[tuple[archive.OrderKey, dict[str, Any]]],
                ) -> list[dict[str, Any]]:
    """Up to limit + 1 records after `q.after`, the archive's and the tail's merged in
    stream order."""
    after: archive.OrderKey = (-1, -1)
    if q.after is not None:
        # A request has one place (its earliest entry's); the tail's copy of a stored
        # row says where while the row waits to move there.
        found = next((k for k, r in tail if r["request_id"] == q.after), None)
        if found is None:
            found = await query.key_of(conn, q.after)
        if found is None:
            raise UnknownCursor(q.after)
        after = found
    want = q.limit + 1
    stored: list[tuple[archive.OrderKey, dict[str, Any]]] = []
    async for page in query.pages(conn, sel, exclude, after, limit=want):
        stored += page
    merged = heapq.merge(stored, [(k, r) for k, r in tail if k > after],
                         key=lambda kr: kr[0])
    return [r for _, r in itertools.islice(merged, want)]


def _valid(rec: dict[str, Any]) -> UsageRecordOut | None:
    try:
        return UsageRecordOut.model_validate(rec)
    except ValidationError:
        return None  # a damaged record: `tokenbooth audit` reports those
