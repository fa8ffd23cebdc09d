"""policy/usage_paging.py: one page and the selection's totals in one pass, the same
pages as slicing every record held at once (one_per_request), in bounded memory."""

from __future__ import annotations

import random
from typing import Any

import pytest

from authz.state.usage.records import one_per_request
from policy.usage import LOST
from policy.usage_paging import UnknownAfter, UsagePager


def rec(rid: str, org: str = "a", status: Any = 200, cost: int = 1) -> dict[str, Any]:
    return {"request_id": rid, "org": org, "status": status, "cost": cost}


def accept_org(org: str) -> Any:
    def accept(r: dict[str, Any]) -> tuple[str, int, Any] | None:
        if r["org"] != org or r["cost"] < 0:  # a negative cost stands for a damaged one
            return None
        return r["request_id"], r["cost"], r["status"]
    return accept


def pages(records: list[dict[str, Any]], org: str, limit: int
          ) -> tuple[list[list[Any]], int]:
    """Every page in turn (each cursor the last row of the one before), and the total."""
    out: list[list[Any]] = []
    after = None
    while True:
        counted: list[Any] = []
        pager = UsagePager(accept_org(org), counted.append, limit, after)
        page = pager.feed_all(iter(records))
        out.append(page.rows)
        if not page.has_more:
            return out, sum(row[1] for row in counted)
        after = page.rows[-1][0]


def held(records: list[dict[str, Any]], org: str, limit: int
         ) -> tuple[list[list[Any]], int]:
    """The same, from every record held at once (what the admin API did)."""
    rows = [r for x in one_per_request(records) if (r := accept_org(org)(x)) is not None]
    chunks = [rows[i:i + limit] for i in range(0, len(rows), limit)] or [[]]
    return chunks, sum(r[1] for r in rows)


def test_random_logs_page_as_if_every_record_were_held() -> None:
    """Duplicates, `lost` records replaced later (or never), damaged ones, two orgs: the
    pages, in order, and the totals are the slicing's."""
    rnd = random.Random(7)
    for _ in range(300):
        n = rnd.randint(0, 30)
        records: list[dict[str, Any]] = []
        for i in range(n):
            records.append(rec(f"r{i}", rnd.choice("ab"), rnd.choice([200, 200, LOST]),
                               rnd.choice([1, 2, -1]) if rnd.random() < 0.2 else 1))
        for _ in range(rnd.randint(0, 10)):  # redeliveries and late settlements
            if records:
                again = dict(rnd.choice(records[:n]))
                again["status"] = rnd.choice([200, LOST])
                records.insert(rnd.randint(0, len(records)), again)
        limit = rnd.randint(1, 5)
        assert pages(records, "a", limit) == held(records, "a", limit), records


def test_a_late_real_record_takes_the_lost_ones_place() -> None:
    records = [rec("r0"), rec("r1", status=LOST, cost=9), rec("r2"), rec("r1", cost=2)]
    got, total = pages(records, "a", 2)
    assert got == [[("r0", 1, 200), ("r1", 2, 200)], [("r2", 1, 200)]]
    assert total == 4


def test_a_cursor_must_name_a_selected_record() -> None:
    for after in ("nope", "b0", "bad"):
        pager = UsagePager(accept_org("a"), lambda row: None, 2, after)
        with pytest.raises(UnknownAfter):
            pager.feed_all([rec("a0"), rec("b0", org="b"), rec("bad", cost=-1)])


def test_only_the_page_is_kept() -> None:
    """A hundred thousand records after the cursor: the pager holds the page and one
    more row, not the records it has counted."""
    pager = UsagePager(accept_org("a"), lambda row: None, 10, "r5")
    for i in range(100_000):
        pager.feed(rec(f"r{i}"))
    kept = pager._window
    assert len(kept) == 11
    page = pager.finish()
    assert [r[0] for r in page.rows] == [f"r{i}" for i in range(6, 16)] and page.has_more
