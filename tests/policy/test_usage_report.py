"""policy/usage_report.py: streaming totals, groups, the selection and deduplication."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from authz.state.usage.records import one_per_request
from policy.usage import LOST
from policy.usage_report import (
    IdSet,
    OnePerRequest,
    Selection,
    UsageReport,
    parse_group_by,
)


def rec(rid: str, key: str = "k1", org: str = "o1", model: str = "demo",
        started: str = "2026-03-01T10:15:00Z", cost: str = "0.5", status: Any = 200,
        tokens: tuple[int, int] = (3, 4)) -> dict[str, Any]:
    return {"request_id": rid, "key_id": key, "org": org, "model": model,
            "prompt_tokens": tokens[0], "completion_tokens": tokens[1],
            "total_tokens": sum(tokens), "cost_usd": cost, "status": status,
            "started_at": started}


def run(report: UsageReport, records: list[dict[str, Any]]) -> list[str]:
    counted = [r for r in map(report.feed, records) if r is not None] + report.finish()
    return [r["request_id"] for r in counted]


def test_totals_are_exact_and_each_request_counts_once() -> None:
    report = UsageReport()
    ids = run(report, [rec("a", cost="0.1"), rec("b", cost="0.2"), rec("a", cost="0.1")])
    assert ids == ["a", "b"]
    assert report.totals.as_dict() == {"requests": 2, "prompt_tokens": 6,
                                       "completion_tokens": 8, "total_tokens": 14,
                                       "cost_usd": "0.3"}



def test_a_total_reads_the_same_whatever_scale_its_sum_kept() -> None:
    """PostgreSQL's sum of a numeric column keeps its scale: the same total read
    "10.9404000000" from the sink and "10.9404" from the records."""
    from policy.usage_report import Totals

    assert Totals(Decimal("10.9404000000"), 1).as_dict()["cost_usd"] == "10.9404"
    assert Totals(Decimal("100.000"), 1).as_dict()["cost_usd"] == "100"
    assert Totals(Decimal("0E-10"), 1).as_dict()["cost_usd"] == "0"


def test_a_real_record_supersedes_a_lost_one_either_way_round() -> None:
    lost = rec("x", status=LOST, cost="9", tokens=(100, 100))
    real = rec("x", cost="1")
    for order in ([lost, real], [real, lost]):
        report = UsageReport()
        assert run(report, order) == ["x"]
        assert report.totals.cost_usd == Decimal(1)
    report = UsageReport()
    assert run(report, [lost, rec("y"), lost]) == ["y", "x"]  # a lost one counts at the end
    assert report.totals.cost_usd == Decimal("9.5")


def test_the_streaming_dedup_matches_the_readers_on_a_shuffled_mix() -> None:
    rnd = random.Random(7)
    records = []
    for i in range(3000):
        rid = f"r{rnd.randrange(1200)}"
        records.append(rec(rid, status=LOST if rnd.random() < 0.2 else 200,
                           cost=str(Decimal(i) / 1000)))
    dedup = OnePerRequest()
    mine = [r for r in map(dedup.feed, records) if r is not None] + dedup.finish()
    expected = list(one_per_request(records))
    key = sorted(map(id, mine))
    assert key == sorted(map(id, expected))


def test_selection_by_org_key_and_since() -> None:
    records = [rec("a", org="o1", started="2026-03-01T00:00:00Z"),
               rec("b", org="o2", key="k2", started="2026-03-02T00:00:00+02:00"),
               rec("c", org="o2", key="k3", started="2026-03-03T00:00:00")]
    assert run(UsageReport(Selection(org="o2")), records) == ["b", "c"]
    assert run(UsageReport(Selection(key="k3")), records) == ["c"]
    since = datetime(2026, 3, 1, 22, 0, tzinfo=UTC)  # b started 22:00 UTC on the 1st
    assert run(UsageReport(Selection(since=since)), records) == ["b", "c"]


@pytest.mark.parametrize(("group_by", "expected"), [
    (("org",), {("o1",): 2, ("o2",): 1}),
    (("key",), {("k1",): 2, ("k2",): 1}),
    (("model",), {("demo",): 1, ("big",): 2}),
    (("day",), {("2026-03-01",): 2, ("2026-03-02",): 1}),
    (("hour",), {("2026-03-01T10:00Z",): 1, ("2026-03-01T23:00Z",): 1,
                 ("2026-03-02T00:00Z",): 1}),
    (("org", "model"), {("o1", "big"): 1, ("o1", "demo"): 1, ("o2", "big"): 1}),
])
def test_groups(group_by: tuple[str, ...], expected: dict[tuple[str, ...], int]) -> None:
    records = [rec("a", started="2026-03-01T10:15:00Z"),
               rec("b", model="big", started="2026-03-02T01:00:00+02:00"),
               rec("c", org="o2", key="k2", model="big", started="2026-03-02T00:30:00Z")]
    report = UsageReport(group_by=group_by)
    run(report, records)
    groups = report.groups()
    assert {g: t.requests for g, t in groups} == expected
    assert [g for g, _ in groups] == sorted(expected)
    assert sum(t.cost_usd for _, t in groups) == report.totals.cost_usd


def test_records_that_cannot_be_counted_are_skipped_and_counted() -> None:
    bad = [rec("a") | {"cost_usd": "lots"}, rec("b") | {"started_at": "soon"},
           {k: v for k, v in rec("c").items() if k != "total_tokens"}, {"request_id": 7}]
    report = UsageReport(group_by=("day",))
    assert run(report, [*bad, rec("d")]) == ["d"]
    assert report.skipped == 3 and report.totals.requests == 1


@pytest.mark.parametrize("cost", ["NaN", "sNaN", "Infinity", "-Infinity", "-inf",
                                  "1E+999999999", "1e15", 0.33, 1, None])
def test_a_cost_that_is_no_number_is_skipped(cost: Any) -> None:
    """Decimal reads "NaN" and "Infinity": counted, they made every total NaN; an
    absurd amount overflowed the sum (`tokenbooth usage` died with an internal error). A
    JSON number (records write a string) was summed as an inexact float (records tester:
    $2.860000000000000015543122345), where the admin API left the record out."""
    report = UsageReport(group_by=("org",))
    assert run(report, [rec("a", cost="0.25"), rec("b", cost=cost)]) == ["a"]
    assert report.skipped == 1 and report.totals.cost_usd == Decimal("0.25")


def test_parse_group_by() -> None:
    assert parse_group_by("org") == ("org",)
    assert parse_group_by("org, model,org") == ("org", "model")
    for bad in ("", "tenant", "org,week"):
        with pytest.raises(ValueError, match="key, org, model, day, hour"):
            parse_group_by(bad)
    with pytest.raises(ValueError):
        UsageReport(group_by=("week",))


def test_the_id_set_is_exact_on_distinct_ids_and_small() -> None:
    ids = IdSet(capacity=4)
    words = [f"req-{i:032x}" for i in range(100_000)]
    assert all(ids.add(w) for w in words)
    assert not any(ids.add(w) for w in words[::7])
    assert len(ids) == 100_000
    assert ids.nbytes <= 32 * len(ids)  # at most half empty, 8 bytes a slot
