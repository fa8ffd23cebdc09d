"""policy/audit.py: exact drift arithmetic, grouping by period, holds, backends."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from policy.audit import (
    LedgerBalance,
    VllmCounters,
    audit_backend,
    audit_ledgers,
    in_window,
    period_end,
    record_nano,
    valid_records,
)
from policy.config import Price
from policy.limits import cost_nano
from policy.usage import Usage, make_record

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
PRICE = Price(input=Decimal("0.50"), output=Decimal("1.50"))
ODD = Price(input=Decimal("0.0003"), output=Decimal("0.0007"))  # fractions of a nano


def rec(rid: str, cost: str, key: str = "k1", org: str = "acme",
        at: str = "2026-03-15T10:00:00Z", **extra: Any) -> dict[str, Any]:
    return {"request_id": rid, "key_id": key, "org": org, "cost_usd": cost,
            "started_at": at, "prompt_tokens": 1, "completion_tokens": 1, **extra}


def real_record(rid: str, usage: Usage, price: Price, started: datetime) -> dict[str, Any]:
    """A record as the gateway writes it (policy.usage.make_record)."""
    return make_record(
        request_id=rid, key_id="k1", org="acme", model="demo", upstream_model="m",
        backend="http://b:8000", usage=usage, price=price, status=200, stream=False,
        estimated=False, started_at=started, duration_ms=1.0, endpoint="chat",
        key_budget_period="total",
    ).to_dict()


def one(ledgers: list[LedgerBalance], records: list[dict[str, Any]],
        periods: dict[str, str] | None = None, strict: bool = False) -> list[str]:
    [a] = audit_ledgers(ledgers, valid_records(records), periods or {"k1": "total"}, NOW)
    return a.problems(strict)


def test_the_ledger_equals_the_sum_of_per_request_charges_exactly() -> None:
    # Settlement charges cost_nano per request (rounded up each time); the record keeps
    # the exact cost: the audit rounds each record up the same way, never the sum.
    usages = [Usage(p, c) for p in (0, 1, 7, 333) for c in (0, 1, 13, 1001)]
    for price in (PRICE, ODD):
        records = [real_record(f"r{i}", u, price, NOW) for i, u in enumerate(usages)]
        spent = sum(cost_nano(u.prompt_tokens, u.completion_tokens, price) for u in usages)
        assert [record_nano(r) for r in records] == [
            cost_nano(u.prompt_tokens, u.completion_tokens, price) for u in usages]
        assert one([LedgerBalance("k1", "total", spent, 0)], records) == []
        assert one([LedgerBalance("k1", "total", spent + 1, 0)], records) == [
            f"spent {spent + 1} nano-USD, records {spent}"]


def test_rounding_is_per_record_not_per_sum() -> None:
    records = [rec(f"r{i}", "0.0000000001") for i in range(3)]  # 0.1 nano each
    assert [record_nano(r) for r in records] == [1, 1, 1]
    assert one([LedgerBalance("k1", "total", 3, 0)], records) == []
    assert one([LedgerBalance("k1", "total", 1, 0)], records)  # ceil(0.3) is not it


def test_records_group_by_the_owners_period() -> None:
    records = [rec("a", "0.000000002", at="2026-03-14T23:59:59Z"),
               rec("b", "0.000000003", at="2026-03-15T00:00:00Z"),
               rec("c", "0.000000005", at="2026-02-28T10:00:00+00:00")]
    ledgers = [LedgerBalance("k1", "day:2026-03-14", 2, 0),
               LedgerBalance("k1", "day:2026-03-15", 3, 0),
               LedgerBalance("org:acme", "month:2026-03", 5, 0)]
    out = audit_ledgers(ledgers, valid_records(records),
                        {"k1": "day", "org:acme": "month"}, NOW)
    got = {(a.owner, a.period): (a.spent, a.records_nano, a.problems()) for a in out}
    assert got == {
        ("k1", "day:2026-02-28"): (0, 5, ["spent 0 nano-USD, records 5"]),
        ("k1", "day:2026-03-14"): (2, 2, []),
        ("k1", "day:2026-03-15"): (3, 3, []),
        ("org:acme", "month:2026-02"): (0, 5, ["spent 0 nano-USD, records 5"]),
        ("org:acme", "month:2026-03"): (5, 5, []),
    }
    assert not next(a for a in out if a.period == "day:2026-02-28").ledger_found
    # --since: only the periods that end after it, each compared whole.
    since = datetime(2026, 3, 14, 12, tzinfo=UTC)
    later = audit_ledgers(ledgers, valid_records(records), {"k1": "day", "org:acme": "month"},
                          NOW, since)
    assert [(a.owner, a.period) for a in later] == [
        ("k1", "day:2026-03-14"), ("k1", "day:2026-03-15"), ("org:acme", "month:2026-03")]


def test_records_count_in_the_ledgers_they_say_they_were_charged_to() -> None:
    """A key's budget added, its period changed, removed and restored: each record says
    which ledgers its settlement charged (none while the key had no budget), so every
    ledger balances, whatever the key's budget period is now."""
    k = {"key_budget_period": None, "org_budget_period": "month:2026-03"}
    records = [
        rec("free-1", "0.000000002", **k),  # no key budget yet
        rec("day-1", "0.000000003", **{**k, "key_budget_period": "day:2026-03-15"}),
        rec("month-1", "0.000000005", **{**k, "key_budget_period": "month:2026-03"}),
        rec("free-2", "0.000000007", **k),  # the budget removed for a while
        rec("month-2", "0.000000011", **{**k, "key_budget_period": "month:2026-03"}),
        # A record of an older tokenbooth says nothing: grouped by the period kind now.
        rec("old", "0.000000013", at="2026-03-01T00:00:00Z"),
    ]
    ledgers = [LedgerBalance("k1", "day:2026-03-15", 3, 0),
               LedgerBalance("k1", "month:2026-03", 5 + 11 + 13, 0),
               LedgerBalance("org:acme", "month:2026-03", 2 + 3 + 5 + 7 + 11 + 13, 0)]
    out = audit_ledgers(ledgers, valid_records(records),
                        {"k1": "month", "org:acme": "month"}, NOW)
    assert {(a.owner, a.period): (a.records, a.problems()) for a in out} == {
        ("k1", "day:2026-03-15"): (1, []),
        ("k1", "month:2026-03"): (3, []),
        ("org:acme", "month:2026-03"): (6, []),
    }
    # A record saying it was charged where the ledger shows nothing is drift, as before.
    extra = rec("lost-charge", "0.000000001", key_budget_period="day:2026-03-15",
                org_budget_period=None)
    out = audit_ledgers(ledgers, valid_records([*records, extra]),
                        {"k1": "month", "org:acme": "month"}, NOW)
    assert [(a.period, a.problems()) for a in out if a.problems()] == [
        ("day:2026-03-15", ["spent 3 nano-USD, records 4"])]


def test_owners_without_a_budget_are_not_audited_unless_a_ledger_shows_one() -> None:
    records = [rec("a", "0.000000002", key="k9")]
    assert audit_ledgers([], valid_records(records), {}, NOW) == []
    # A key the CLI cannot list (a validation service's): its ledgers give its period.
    [a] = audit_ledgers([LedgerBalance("k9", "month:2026-03", 2, 0)],
                        valid_records(records), {}, NOW)
    assert (a.period, a.problems()) == ("month:2026-03", [])


def test_held_requests_are_left_out_and_expired_holds_are_drift_only_when_strict() -> None:
    live, gone = NOW.timestamp() + 60, NOW.timestamp() - 1
    records = [rec("done", "0.000000004"), rec("settling", "0.000000007")]
    ledger = LedgerBalance("k1", "total", 4, 30,
                           {"settling": (10, live), "other": (15, live), "dead": (5, gone)},
                           lost={"old": 9})
    [a] = audit_ledgers([ledger], valid_records(records), {"k1": "total"}, NOW)
    assert (a.records, a.settling, a.records_nano) == (1, 1, 4)
    assert (a.live_holds, a.live_nano, a.expired_holds, a.expired_nano) == (2, 25, 1, 5)
    assert a.lost_charges == 1
    assert a.problems() == []
    assert a.problems(strict=True) == ["1 expired hold(s) not settled"]


def test_a_reserved_counter_that_is_not_its_holds_is_drift() -> None:
    ledger = LedgerBalance("k1", "total", 0, 11, {"x": (10, NOW.timestamp() + 5)})
    assert one([ledger], []) == ["reserved 11 nano-USD, holds 10"]


@pytest.mark.parametrize("bad", [
    {"cost_usd": "abc"}, {"cost_usd": "NaN"}, {"started_at": "yesterday"},
    {"key_id": None}, {"prompt_tokens": "3"}, {"cost_usd": "-0.034"}, {"cost_usd": 0.33},
])
def test_malformed_records_name_the_request(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="usage record 'r1' is malformed"):
        valid_records([{**rec("r1", "0.1"), **bad}])
    with pytest.raises(ValueError, match="usage record 'r2' is malformed"):
        valid_records([{k: v for k, v in rec("r2", "0.1").items() if k != "org"}])


def test_a_cost_that_is_no_number_says_so_in_words() -> None:
    """It read `InvalidOperation: [<class 'decimal.ConversionSyntax'>]`."""
    with pytest.raises(ValueError) as e:
        valid_records([{**rec("r1", "0.1"), "cost_usd": "abc"}])
    assert str(e.value) == ("usage record 'r1' is malformed (ValueError: cost_usd 'abc' is "
                            "not a decimal number)")


def test_period_ends() -> None:
    assert period_end("total") is None
    assert period_end("day:2026-03-15") == datetime(2026, 3, 16, tzinfo=UTC)
    assert period_end("month:2026-11") == datetime(2026, 12, 1, tzinfo=UTC)
    assert period_end("month:2026-12") == datetime(2027, 1, 1, tzinfo=UTC)
    assert in_window("total", NOW) and not in_window("day:2026-03-14", NOW)
    with pytest.raises(ValueError):
        period_end("week:2026-11")


def _backend_records() -> list[dict[str, Any]]:
    b = "http://vllm:8000"
    return [
        rec("old", "0", backend=b, prompt_tokens=100, completion_tokens=100,
            at="2026-03-15T08:00:00Z"),
        rec("a", "0", backend=b + "/", prompt_tokens=10, completion_tokens=20),
        rec("b", "0", backend=b, prompt_tokens=5, completion_tokens=6, estimated=False),
        rec("elsewhere", "0", backend="http://other:8000", prompt_tokens=1000,
            completion_tokens=1000),
    ]


def test_backend_counters_against_records_since_the_process_started() -> None:
    start = datetime(2026, 3, 15, 9, tzinfo=UTC).timestamp()
    records = valid_records(_backend_records())
    ok = audit_backend(VllmCounters("http://vllm:8000/", 15, 26, start), records)
    assert (ok.records, ok.prompt_tokens, ok.completion_tokens, ok.drift) == (2, 15, 26, False)
    assert audit_backend(VllmCounters("http://vllm:8000", 16, 26, start), records).drift
    assert audit_backend(VllmCounters("http://vllm:8000", 15, 25, start), records).drift
    # No process_start_time_seconds: every record of the backend counts.
    assert not audit_backend(VllmCounters("http://vllm:8000", 115, 126, None), records).drift


def test_vllm_counts_a_prompt_once_per_sequence() -> None:
    """`n: 3`: the usage (and record) counts the prompt once, vLLM's counter three times
    (one request per sequence); a record of an older tokenbooth says nothing (1)."""
    start = datetime(2026, 3, 15, 9, tzinfo=UTC).timestamp()
    records = valid_records([*_backend_records(), {**rec(
        "n3", "0", backend="http://vllm:8000", prompt_tokens=4, completion_tokens=9),
        "sequences": 3}])
    a = audit_backend(VllmCounters("http://vllm:8000", 15 + 12, 26 + 9, start), records)
    assert (a.prompt_tokens, a.completion_tokens, a.drift) == (27, 35, False)
    assert audit_backend(VllmCounters("http://vllm:8000", 15 + 4, 35, start), records).drift


def test_estimated_records_are_apart_and_bound_the_counters_from_below_only() -> None:
    records = valid_records([*_backend_records(), rec(
        "cut", "0", backend="http://vllm:8000", prompt_tokens=7, completion_tokens=3,
        estimated=True)])
    start = datetime(2026, 3, 15, 9, tzinfo=UTC).timestamp()
    a = audit_backend(VllmCounters("http://vllm:8000", 30, 40, start), records)
    assert (a.records, a.estimated_records, a.estimated_prompt, a.estimated_completion) == (
        2, 1, 7, 3)
    assert not a.drift
    # Within the bounds, but past what the records charged: said (real-vLLM tester).
    assert a.charged_short == (30 - 15 - 7, 40 - 26 - 3)
    assert audit_backend(VllmCounters("http://vllm:8000", 22, 29, start),
                         records).charged_short == (0, 0)
    assert audit_backend(VllmCounters("http://vllm:8000", 14, 40, start), records).drift


def test_estimated_records_with_their_bounds_cap_the_counters_from_above() -> None:
    """A client that left mid-stream made an estimated record, and from then on tokens
    served past the gateway went unseen (20,062 generated against 12 recorded, "ok"): the
    estimated requests' holds now cap what the counters may exceed the records by."""
    cut = {**rec("cut", "0", backend="http://vllm:8000", prompt_tokens=7, completion_tokens=3,
                 estimated=True), "prompt_bound": 9, "completion_bound": 50, "sequences": 2}
    records = valid_records([*_backend_records(), cut])
    start = datetime(2026, 3, 15, 9, tzinfo=UTC).timestamp()
    a = audit_backend(VllmCounters("http://vllm:8000", 15 + 18, 26 + 50, start), records)
    assert (a.estimated_prompt_bound, a.estimated_completion_bound, a.drift) == (18, 50, False)
    # Its prompt as vLLM counts it, once per sequence (the report read 7 for 14).
    assert a.estimated_prompt == 14
    for p, g in ((15 + 19, 26), (15, 26 + 51), (15, 20_062)):
        assert audit_backend(VllmCounters("http://vllm:8000", p, g, start), records).drift
    # A record without bounds (an older tokenbooth's) leaves the ceiling unknown.
    older = {k: v for k, v in cut.items() if not k.endswith("_bound")}
    b = audit_backend(VllmCounters("http://vllm:8000", 15, 20_062, start),
                      valid_records([*_backend_records(), cut, {**older, "request_id": "o"}]))
    assert (b.estimated_completion_bound, b.drift) == (None, False)


def test_periods_begun_before_records_were_trimmed_are_not_compared() -> None:
    """usage.retention_s with no usage.sink trims records for good: a ledger whose period
    began before the trim cannot be balanced against what is left, and is not drift for
    it (its holds still are); a later period is compared as ever."""
    horizon = datetime(2026, 3, 14, 6, 0, tzinfo=UTC)
    left = [rec("r2", "0.25", at="2026-03-15T10:00:00Z")]
    ledgers = [LedgerBalance("k1", "total", 1_000_000_000, 0),  # $1, most of it trimmed
               LedgerBalance("k2", "day:2026-03-14", 999, 0),  # began before the trim
               LedgerBalance("k2", "day:2026-03-15", 999, 0)]  # after: still compared
    audits = audit_ledgers(ledgers, valid_records(left), {"k1": "total", "k2": "day"}, NOW,
                           trimmed_before=horizon)
    got = {(a.owner, a.period): (a.trimmed, a.problems()) for a in audits}
    assert got == {("k1", "total"): (True, []),
                   ("k2", "day:2026-03-14"): (True, []),
                   ("k2", "day:2026-03-15"): (False, ["spent 999 nano-USD, records 0"])}
    held = LedgerBalance("k1", "total", 0, 11, {"x": (10, NOW.timestamp() + 5)})
    [a] = audit_ledgers([held], [], {"k1": "total"}, NOW, trimmed_before=horizon)
    assert a.problems() == ["reserved 11 nano-USD, holds 10"]
    # Without a trim, the same total ledger is drift.
    [a] = audit_ledgers(ledgers[:1], valid_records(left), {"k1": "total"}, NOW)
    assert a.problems() == ["spent 1000000000 nano-USD, records 250000000"]
