"""policy/limits.py: GCRA, the token bucket, money, budget periods and OpenAI's headers,
as exact values on a fixed clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from pydantic import ValidationError

from policy.config import Price
from policy.limits import (
    RATE_HEADER_NAMES,
    Decision,
    GcraResult,
    Limits,
    bucket_level,
    bucket_refund,
    bucket_reset_s,
    bucket_take,
    budget_admits,
    cost_nano,
    format_reset,
    gcra,
    nano_to_usd,
    period_id,
    period_reset_s,
    period_start,
    previous_period_id,
    rate_headers,
    retry_after_header,
    tightest,
    usd_to_nano,
)

# -- GCRA ---------------------------------------------------------------------------------


def test_gcra_a_burst_of_n_then_refusal() -> None:
    level, results = 3.0, []  # a fresh key: its bucket is full
    for _ in range(4):
        g = gcra(level, 3)
        results.append(g)
        level = g.level
    assert results == [
        GcraResult(True, 2.0, 2, 20.0, 0.0),
        GcraResult(True, 1.0, 1, 40.0, 0.0),
        GcraResult(True, 0.0, 0, 60.0, 0.0),
        GcraResult(False, 0.0, 0, 60.0, 20.0),  # a refusal takes nothing
    ]


def test_gcra_refills_continuously_at_n_per_minute() -> None:
    # Three taken at 100 with a limit of 3: one more every 20 s.
    assert gcra(bucket_level(0.0, 100.0, 119.999, 3), 3).allowed is False
    g = gcra(bucket_level(0.0, 100.0, 120.0, 3), 3)
    assert g == GcraResult(True, 0.0, 0, 60.0, 0.0)
    assert gcra(bucket_level(g.level, 120.0, 130.0, 3), 3) == GcraResult(
        False, 0.5, 0, 50.0, 10.0)
    assert gcra(bucket_level(g.level, 120.0, 140.0, 3), 3).allowed
    # Idle for a whole window: the full burst again, never more.
    assert gcra(bucket_level(g.level, 120.0, 240.0, 3), 3) == GcraResult(
        True, 2.0, 2, 20.0, 0.0)
    assert gcra(bucket_level(g.level, 120.0, 10_000.0, 3), 3).remaining == 2


def test_gcra_retry_after_is_when_the_next_one_fits() -> None:
    g = gcra(-4.0, 6)  # 4 owed (usage counted after an outage): 1 more in 50 s
    assert (g.allowed, g.retry_after_s, g.reset_s) == (False, 50.0, 100.0)
    assert gcra(bucket_level(-4.0, 100.0, 100.0 + g.retry_after_s, 6), 6).allowed


# -- the token bucket ---------------------------------------------------------------------


def test_bucket_level_refills_continuously_up_to_capacity() -> None:
    assert bucket_level(400.0, 0.0, 6.0, 1000) == 500.0  # 1000/min: 100 in 6 s
    assert bucket_level(400.0, 0.0, 60.0, 1000) == 1000.0
    assert bucket_level(900.0, 0.0, 60.0, 1000) == 1000.0  # never past capacity
    assert bucket_level(400.0, 10.0, 5.0, 1000) == 400.0  # a clock going back adds nothing
    assert bucket_level(-500.0, 0.0, 30.0, 1000) == 0.0  # a debt is paid off first


def test_bucket_take() -> None:
    assert bucket_take(500.0, 200, 1000) == (True, 300.0, 0.0)
    assert bucket_take(500.0, 500, 1000) == (True, 0.0, 0.0)
    assert bucket_take(500.0, 600, 1000) == (False, 500.0, 6.0)  # 100 missing at 1000/min
    assert bucket_take(0.0, 1000, 1000) == (False, 0.0, 60.0)


def test_bucket_refund_and_reset() -> None:
    assert bucket_refund(300.0, 200, 50, 1000) == 450.0  # 150 unused come back
    assert bucket_refund(300.0, 200, 500, 1000) == 0.0  # the overrun is taken
    assert bucket_refund(100.0, 200, 500, 1000) == -200.0  # ...even below zero
    assert bucket_refund(900.0, 200, 0, 1000) == 1000.0  # never past capacity
    assert bucket_reset_s(250.0, 1000) == 45.0
    assert bucket_reset_s(1000.0, 1000) == 0.0
    assert bucket_reset_s(-500.0, 1000) == 90.0


# -- money --------------------------------------------------------------------------------


def test_cost_nano_rounds_up_to_the_next_nano_dollar() -> None:
    price = Price(input=Decimal("0.0015"), output=Decimal("0.002"))
    assert cost_nano(1, 0, price) == 1_500
    assert cost_nano(1000, 500, price) == 1_500_000 + 1_000_000
    tiny = Price(input=Decimal("0.0000001"))  # 0.1 nano-USD a token
    assert [cost_nano(n, 0, tiny) for n in (0, 1, 3, 10, 11, 20)] == [0, 1, 1, 1, 2, 2]
    assert cost_nano(10**6, 10**6, Price()) == 0


def test_cost_nano_is_exact_whatever_the_price_s_digits() -> None:
    # Decimal's default context keeps 28 digits: a price with more (quoted in the policy
    # file, so exact) lost its last ones in the product, and a cost just above a whole
    # nano-dollar was rounded down to it, one nano-USD in the user's favour.
    price = Price(input=Decimal("0.000001" + "0" * 33 + "1"))  # 1e-6 + 1e-40 per 1k
    assert cost_nano(999_999, 0, price) == 1_000_000  # 999,999 nano and a little more
    assert cost_nano(0, 999_999, Price(output=price.input)) == 1_000_000
    exact = Price(input=Decimal("0.000001" + "0" * 40))  # the same digits, none past them
    assert cost_nano(999_999, 0, exact) == 999_999
    big = Price(input=Decimal("999.999999999999999999999999999999"),
                output=Decimal("0.0000000000000000000000000000000007"))
    assert cost_nano(2**40, 2**40, big) == 2**40 * 10**9  # less than a nano short of it
    assert usd_to_nano(Decimal("1." + "0" * 40 + "1")) == 10**9 + 1


def test_usd_and_nano() -> None:
    assert usd_to_nano(Decimal("0.1")) == 100_000_000
    assert usd_to_nano(Decimal("0.0000000001")) == 1  # a tenth of a nano-dollar rounds up
    assert usd_to_nano(Decimal(0)) == 0
    assert nano_to_usd(1_500_000_000) == Decimal("1.5")
    assert nano_to_usd(1) == Decimal("0.000000001")


def test_budget_admits_up_to_exactly_the_budget() -> None:
    assert budget_admits(400, 500, 100, 1000)
    assert not budget_admits(400, 500, 101, 1000)
    assert not budget_admits(1000, 0, 1, 1000)
    assert not budget_admits(1200, 0, 0, 1000)  # spent past it (an overrun): nothing fits


def test_limits_any() -> None:
    assert not Limits().any
    assert not Limits(budget_period="day").any
    assert Limits(rpm=1).any and Limits(budget_nano=0).any


# -- budget periods -----------------------------------------------------------------------


@pytest.mark.parametrize(("now", "period", "pid", "reset"), [
    (datetime(2025, 3, 9, 23, 59, 59, 500_000, UTC), "day", "day:2025-03-09", 0.5),
    (datetime(2025, 3, 10, tzinfo=UTC), "day", "day:2025-03-10", 86_400.0),
    (datetime(2025, 2, 28, 23, tzinfo=UTC), "month", "month:2025-02", 3_600.0),
    (datetime(2024, 2, 28, 23, tzinfo=UTC), "month", "month:2024-02", 86_400.0 + 3_600.0),
    (datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC), "month", "month:2025-12", 1.0),
    (datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC), "day", "day:2025-12-31", 1.0),
    (datetime(2026, 1, 1, tzinfo=UTC), "month", "month:2026-01", 31 * 86_400.0),
    (datetime(2026, 1, 1, tzinfo=UTC), "day", "day:2026-01-01", 86_400.0),
    # Periods are UTC: 01:00 on 1 January at +02:00 is still December.
    (datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=2))), "month", "month:2025-12",
     3_600.0),
    (datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=2))), "day", "day:2025-12-31",
     3_600.0),
])
def test_period_id_and_reset(now: datetime, period: str, pid: str, reset: float) -> None:
    assert period_id(period, now) == pid
    assert period_reset_s(period, now) == reset


@pytest.mark.parametrize(("now", "period", "before"), [
    (datetime(2026, 1, 1, tzinfo=UTC), "day", "day:2025-12-31"),
    (datetime(2026, 1, 1, tzinfo=UTC), "month", "month:2025-12"),
    (datetime(2024, 3, 1, 0, 30, tzinfo=UTC), "day", "day:2024-02-29"),
    (datetime(2024, 3, 31, 23, 59, tzinfo=UTC), "month", "month:2024-02"),
    (datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=2))), "day", "day:2025-12-30"),
    (datetime(2026, 5, 5, tzinfo=UTC), "total", None),
])
def test_the_period_before(now: datetime, period: str, before: str | None) -> None:
    assert previous_period_id(period, now) == before
    start = period_start(period, now)
    assert start is None or (start <= now and period_id(period, start) == period_id(
        period, now))


def test_total_never_resets() -> None:
    now = datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert period_id("total", now) == "total"
    assert period_reset_s("total", now) is None


# -- OpenAI's headers ---------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "text"), [
    (0.02, "20ms"), (0, "0ms"), (-3.0, "0ms"), (0.0001, "1ms"), (0.999, "999ms"),
    (1, "1s"), (1.2, "2s"), (59, "59s"), (59.5, "1m0s"), (360, "6m0s"), (61, "1m1s"),
    (3600, "1h0m0s"), (3723, "1h2m3s"), (90_061, "25h1m1s"),
])
def test_format_reset(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def test_rate_headers_for_both_limits() -> None:
    d = Decision(True, "", None, 60, 59, 1.0, 1000, 400, 36.0)
    assert rate_headers(d) == [
        ("x-ratelimit-limit-requests", "60"),
        ("x-ratelimit-remaining-requests", "59"),
        ("x-ratelimit-reset-requests", "1s"),
        ("x-ratelimit-limit-tokens", "1000"),
        ("x-ratelimit-remaining-tokens", "400"),
        ("x-ratelimit-reset-tokens", "36s"),
    ]
    assert [name for name, _ in rate_headers(d)] == list(RATE_HEADER_NAMES)


def test_rate_headers_only_for_the_limits_a_key_has() -> None:
    assert rate_headers(Decision(True)) == []
    assert rate_headers(Decision(False, "requests", 12.0, 5, 0, 60.0)) == [
        ("x-ratelimit-limit-requests", "5"),
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-reset-requests", "1m0s"),
    ]
    # A bucket in debt shows 0 remaining, never a negative count.
    d = Decision(False, "tokens", 30.0, limit_tokens=1000, remaining_tokens=-500,
                 reset_tokens_s=90.0)
    assert rate_headers(d) == [
        ("x-ratelimit-limit-tokens", "1000"),
        ("x-ratelimit-remaining-tokens", "0"),
        ("x-ratelimit-reset-tokens", "1m30s"),
    ]


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert [retry_after_header(s) for s in (0, 0.1, 1.0, 1.5, 648_000)] == [
        "1", "1", "1", "2", "648000"]


def test_the_headers_show_the_limit_met_first_key_or_org() -> None:
    key = Decision(True, limit_tokens=1000, remaining_tokens=900, reset_tokens_s=1.0)
    org = Decision(True, limit_requests=60, remaining_requests=5, reset_requests_s=2.0,
                   limit_tokens=50_000, remaining_tokens=100, reset_tokens_s=3.0)
    both = tightest(key, org)
    # Requests: only the org limits them. Tokens: the org has less left.
    assert (both.limit_requests, both.remaining_requests, both.reset_requests_s) == (60, 5, 2.0)
    assert (both.limit_tokens, both.remaining_tokens, both.reset_tokens_s) == (50_000, 100, 3.0)
    assert tightest(key, Decision(True)) == key  # an org without rate limits
    roomy = Decision(True, limit_tokens=50_000, remaining_tokens=49_000)
    assert tightest(key, roomy).remaining_tokens == 900


def test_a_price_is_priced_quickly_whatever_it_is_written_as() -> None:
    """A price's digits are bounded (review: `1e-3000000` took 0.8 s a request to
    price, on the event loop): too fine a price is refused, trailing zeros dropped."""
    with pytest.raises(ValidationError, match="no more than 40 decimal places"):
        Price(input="1e-3000000")
    zeros = Price(input="1.5" + "0" * 300_000, output="2.50")
    assert (zeros.input, zeros.output) == (Decimal("1.5"), Decimal("2.5"))
    assert str(zeros.input) == "1.5" and str(Price(input="100").input) == "100"
    assert cost_nano(1000, 1000, zeros) == 4_000_000_000
