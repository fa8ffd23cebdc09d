"""Budget periods in time: the period a moment falls in, when it resets, and the audit's
reading of a period id, agree at every moment (UTC calendar days and months, leap days
and year ends included); and the pure transitions keep a hold in the period it was
admitted in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy.admission import KeyState, Ledger, admit, requests_now, requests_save, settle, sweep
from policy.audit import LedgerBalance, audit_ledgers, in_window, period_end, period_start
from policy.config import OrgLimits
from policy.limits import Ask, Limits, gcra, period_id, period_reset_s
from policy.quota import org_hold

MOMENTS = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2199, 12, 31),
                       timezones=st.just(UTC))


@given(MOMENTS, st.sampled_from(["day", "month"]))
def test_a_moment_lies_in_its_period_and_the_reset_is_its_end(t: datetime, kind: str) -> None:
    pid = period_id(kind, t)
    start, end = period_start(pid), period_end(pid)
    assert start is not None and end is not None
    assert start <= t < end
    reset = period_reset_s(kind, t)
    assert reset is not None and reset == pytest.approx((end - t).total_seconds(), abs=1e-6)
    assert 0 < reset <= (86400 if kind == "day" else 31 * 86400)
    # The next period begins at the end: the moment after is in another period.
    assert period_id(kind, end) != pid and period_start(period_id(kind, end)) == end
    assert period_id(kind, end - timedelta(microseconds=1)) == pid


@given(MOMENTS, st.sampled_from(["day", "month", "total"]))
def test_other_zones_read_as_utc(t: datetime, kind: str) -> None:
    tz = timezone(timedelta(hours=-7))
    assert period_id(kind, t.astimezone(tz)) == period_id(kind, t)
    assert period_reset_s(kind, t.astimezone(tz)) == period_reset_s(kind, t)


@pytest.mark.parametrize(("t", "kind", "pid", "reset"), [
    ("2026-12-31T23:59:59+00:00", "month", "month:2026-12", 1.0),
    ("2027-01-01T00:00:00+00:00", "month", "month:2027-01", 31 * 86400.0),
    ("2028-02-29T12:00:00+00:00", "month", "month:2028-02", 12 * 3600.0),
    ("2028-02-28T23:59:59.5+00:00", "day", "day:2028-02-28", 0.5),
    ("2027-02-28T23:59:59+00:00", "month", "month:2027-02", 1.0),
    ("2026-03-10T16:59:59-07:00", "day", "day:2026-03-10", 1.0),  # 23:59:59 UTC
    ("2026-03-10T17:00:00-07:00", "day", "day:2026-03-11", 86400.0),
    ("2026-03-10T17:00:00-07:00", "total", "total", None),
])
def test_boundaries(t: str, kind: str, pid: str, reset: float | None) -> None:
    now = datetime.fromisoformat(t)
    assert period_id(kind, now) == pid
    assert period_reset_s(kind, now) == reset


def test_audit_window_takes_a_period_that_ends_after_since() -> None:
    since = datetime(2027, 1, 1, tzinfo=UTC)
    assert not in_window("month:2026-12", since)  # ended exactly then
    assert in_window("month:2027-01", since)
    assert in_window("day:2026-12-31", since - timedelta(microseconds=1))
    assert in_window("total", since)


# -- the pure transitions across a period's end ---------------------------------------


def test_settled_after_midnight_charges_the_ledger_it_was_admitted_in() -> None:
    lim = Limits(budget_nano=100, budget_period="day")
    key, ledgers = KeyState(), {"day:2026-03-10": Ledger(), "day:2026-03-11": Ledger()}
    t0 = datetime(2026, 3, 10, 23, 59, 59, 900000, tzinfo=UTC).timestamp()
    a = Ask("r1", "k", "o", 0, 100, "day:2026-03-10", 30.0)
    assert admit(lim, a, key, ledgers[a.period], t0).allowed
    b = Ask("r2", "k", "o", 0, 100, "day:2026-03-11", 30.0)
    assert admit(lim, b, key, ledgers[b.period], t0 + 0.2).allowed
    assert settle(lim, a, 0, 40, key, ledgers[a.period], t0 + 1).applied
    assert ledgers["day:2026-03-10"].balance(t0 + 1) == (40, 0)
    assert ledgers["day:2026-03-11"].balance(t0 + 1) == (0, 100)
    # b's lease ends unsettled: charged in full to its own day, nothing to the other.
    assert [h.ask.request_id for h in sweep(key, t0 + 100)] == ["r2"]
    assert ledgers["day:2026-03-11"].balance(t0 + 100) == (100, 0)
    assert ledgers["day:2026-03-10"].balance(t0 + 100) == (40, 0)


@given(st.floats(min_value=0.0, max_value=120.0), st.floats(min_value=0.0, max_value=120.0))
def test_gcra_out_of_order_stamps_admit_no_more(d1: float, d2: float) -> None:
    """A request admitted with an older stamp than the last never finds more room."""
    t, key = 1_700_000_000.0, KeyState()
    requests_save(key, gcra(requests_now(key, 2, t + d1, 60.0), 2).level, t + d1)
    late = gcra(requests_now(key, 2, t + d1 + d2, 60.0), 2)
    early = gcra(requests_now(key, 2, t + d1 + d2 - min(d2, 30.0), 60.0), 2)
    assert early.remaining <= late.remaining


@pytest.mark.parametrize(("started", "key_pid", "org_pid"), [
    ("2026-12-31T23:59:59.999999+00:00", "day:2026-12-31", "month:2026-12"),
    ("2027-01-01T00:00:00+00:00", "day:2027-01-01", "month:2027-01"),
    ("2028-02-29T23:59:59+00:00", "day:2028-02-29", "month:2028-02"),
])
def test_an_org_hold_takes_the_orgs_own_period_at_the_requests_start(
        started: str, key_pid: str, org_pid: str) -> None:
    t = datetime.fromisoformat(started)
    a = Ask("r", "k", "acme", 1, 2, period_id("day", t), 30.0)
    lim, org_ask = org_hold(OrgLimits(budget_usd=Decimal(1), budget_period="month"), a, t)
    assert (a.period, org_ask.period) == (key_pid, org_pid)
    assert org_ask.key_id == "org:acme" and lim.budget_period == "month"


def test_audit_balances_a_request_that_straddles_midnight() -> None:
    """Admitted 23:59:59.9 on Dec 31 (key: day, org: month), recorded and settled after
    midnight: its record names the old ledgers, and the audit balances each period,
    `--since` midnight leaving the old ones out."""
    rec = {"request_id": "r1", "key_id": "k", "org": "acme", "prompt_tokens": 1,
           "completion_tokens": 1, "cost_usd": "0.0000003",
           "started_at": "2026-12-31T23:59:59.900000Z",
           "key_budget_period": "day:2026-12-31", "org_budget_period": "month:2026-12"}
    legacy = {**rec, "request_id": "r2", "started_at": "2027-01-01T00:00:00Z"}
    del legacy["key_budget_period"], legacy["org_budget_period"]
    ledgers = [LedgerBalance("k", "day:2026-12-31", 300, 0),
               LedgerBalance("org:acme", "month:2026-12", 300, 0),
               LedgerBalance("k", "day:2027-01-01", 300, 0),
               LedgerBalance("org:acme", "month:2027-01", 300, 0)]
    kinds = {"k": "day", "org:acme": "month"}
    now = datetime(2027, 1, 1, 0, 1, tzinfo=UTC)
    out = audit_ledgers(ledgers, [rec, legacy], kinds, now)
    assert [(a.owner, a.period, a.records, a.problems()) for a in out] == [
        ("k", "day:2026-12-31", 1, []), ("k", "day:2027-01-01", 1, []),
        ("org:acme", "month:2026-12", 1, []), ("org:acme", "month:2027-01", 1, [])]
    since = audit_ledgers(ledgers, [rec, legacy], kinds, now,
                          since=datetime(2027, 1, 1, tzinfo=UTC))
    assert [(a.owner, a.period) for a in since] == [("k", "day:2027-01-01"),
                                                    ("org:acme", "month:2027-01")]
