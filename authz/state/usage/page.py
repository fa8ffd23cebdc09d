"""GET /v1/usage's page when PostgreSQL is the ledger of record (usage.sink): totals and
groups by SQL aggregates merged with the stream's tail (query.py), and one page of
records: the archive's in export order, then the tail's, `after` a request_id."""

from __future__ import annotations

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
            tail = [r for rec in t.records if (r := report.feed(rec)) is not None]
            tail += report.finish()
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
                tail: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Up to limit + 1 records after `q.after`: the archive's, then the tail's."""
    after_seq: int | None = 0
    tail_start = 0
    if q.after is not None:
        after_seq = await query.seq_of(conn, q.after)
        if after_seq is None:
            ids = [r["request_id"] for r in tail]
            if q.after not in ids:
                raise UnknownCursor(q.after)
            tail_start = ids.index(q.after) + 1
    out: list[dict[str, Any]] = []
    want = q.limit + 1
    if after_seq is not None:
        async for page in query.pages(conn, sel, exclude, after_seq, limit=want):
            out += [r for _, r in page]
    return out + tail[tail_start:tail_start + max(0, want - len(out))]


def _valid(rec: dict[str, Any]) -> UsageRecordOut | None:
    try:
        return UsageRecordOut.model_validate(rec)
    except ValidationError:
        return None  # a damaged record: `tokenbooth audit` reports those
