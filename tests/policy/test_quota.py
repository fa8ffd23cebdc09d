"""policy/quota.py: the limits of keys and orgs, the org's hold, and the 429 a denial
becomes, with exact headers (retry-after, or x-should-retry: false when waiting cannot
help)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from pydantic import ValidationError

from policy.config import OrgLimits
from policy.keyrecord import KeyRecord
from policy.keys import limits_of
from policy.limits import Ask, Decision, Limits
from policy.quota import exhausted, limits_from, org_hold, refusal

# -- org limits ---------------------------------------------------------------------------

STARTED = datetime(2026, 11, 23, 12, tzinfo=UTC)


def test_org_hold() -> None:
    org = OrgLimits(rpm=10, tpm=5000, max_concurrent=3, budget_usd=Decimal("2.5"),
                    budget_period="day")
    a = Ask("r1", "k1", "acme", 100, 5, "month:2026-11", 150.0)
    limits, held = org_hold(org, a, STARTED)
    assert limits == Limits(10, 5000, 3, 2_500_000_000, "day")
    assert held == Ask("r1", "org:acme", "acme", 100, 5, "day:2026-11-23", 150.0)


def test_org_hold_defaults() -> None:
    a = Ask("r1", "k1", "acme", 0, 0, "total", 1.0)
    assert org_hold(OrgLimits(), a, STARTED) == (
        Limits(budget_period="month"), Ask("r1", "org:acme", "acme", 0, 0, "month:2026-11", 1.0))
    assert org_hold(OrgLimits(budget_period="total"), a, STARTED)[1].period == "total"


def test_limits_from_a_key_record_is_the_keys_limits() -> None:
    rec = KeyRecord(id="k1", org="acme", sha256="0" * 64, rpm=5, tpm=7, max_concurrent=2,
                    budget_usd=Decimal("0.000000002"), budget_period="total")
    assert limits_from(rec) == limits_of(rec) == Limits(5, 7, 2, 2, "total")
    # Budgets are whole nano-USD: a finer one would be rounded (up: spend past it).
    with pytest.raises(ValidationError, match="no more than 9 decimal places"):
        KeyRecord(id="k1", org="acme", sha256="0" * 64, budget_usd=Decimal("0.0000000011"))


# -- the 429 a denial becomes -------------------------------------------------------------


def denied(reason: str, retry: float | None = None) -> Decision:
    """A denial for a key with 60 RPM and 1000 TPM, neither touched."""
    return Decision(False, reason, retry, 60, 60, 0.0, 1000, 1000, 0.0)


RATE = [("x-ratelimit-limit-requests", "60"), ("x-ratelimit-remaining-requests", "60"),
        ("x-ratelimit-reset-requests", "0ms"), ("x-ratelimit-limit-tokens", "1000"),
        ("x-ratelimit-remaining-tokens", "1000"), ("x-ratelimit-reset-tokens", "0ms")]


def test_budget_refusal_retries_when_the_period_resets() -> None:
    e = refusal(denied("budget"), Limits(budget_nano=1, budget_period="month"), STARTED)
    assert (e.status, e.code, e.type) == (429, "insufficient_quota", "insufficient_quota")
    assert e.message.startswith("This API key's budget for the period is exhausted, or too")
    assert e.message.endswith("held until it ends).")
    # 7.5 days to December: said, but past what the SDKs wait, so they make no retry
    # (they would retry within seconds, each refused).
    assert list(e.headers) == [*RATE, ("retry-after", "648000"), ("x-should-retry", "false")]
    late = datetime(2026, 11, 23, 23, 59, 59, 200_000, UTC)
    e = refusal(Decision(False, "budget"), Limits(budget_nano=1, budget_period="day"), late)
    assert list(e.headers) == [("retry-after", "1")]
    # Up to a minute the SDKs wait and retry: no x-should-retry.
    at_60 = datetime(2026, 11, 23, 23, 59, 0, tzinfo=UTC)
    e = refusal(Decision(False, "budget"), Limits(budget_nano=1, budget_period="day"), at_60)
    assert list(e.headers) == [("retry-after", "60")]
    at_61 = datetime(2026, 11, 23, 23, 58, 59, tzinfo=UTC)
    e = refusal(Decision(False, "budget"), Limits(budget_nano=1, budget_period="day"), at_61)
    assert list(e.headers) == [("retry-after", "61"), ("x-should-retry", "false")]


@pytest.mark.parametrize("period", ["day", "month", "total"])
def test_a_request_dearer_than_the_whole_budget_is_never_retried(period: str) -> None:
    """Its worst case is more than a whole period's budget: no reset can help."""
    limits = Limits(budget_nano=1000, budget_period=period)
    e = refusal(Decision(False, "budget"), limits, STARTED, cost_nano=1001)
    assert (e.status, e.code) == (429, "insufficient_quota")
    assert ("x-should-retry", "false") in e.headers
    assert not any(k == "retry-after" for k, _ in e.headers)
    assert "whole budget" in e.message
    # At the budget exactly it fits a fresh period: the reset is said (hours away, so
    # beyond the SDKs' automatic retries).
    e = refusal(Decision(False, "budget"), limits, STARTED, cost_nano=1000)
    assert any(k == "retry-after" for k, _ in e.headers) == (period != "total")
    assert "whole budget" not in e.message


@pytest.mark.parametrize("period", ["day", "month", "total"])
def test_a_budget_held_by_requests_in_flight_is_retried_soon(period: str) -> None:
    """Unspent but held: the holds end with their requests, not with the period."""
    e = refusal(Decision(False, "budget_held"), Limits(budget_nano=1000, budget_period=period),
                STARTED, cost_nano=500)
    assert (e.status, e.code, e.type) == (429, "insufficient_quota", "insufficient_quota")
    assert e.headers == (("retry-after", "1"),)
    assert "in flight" in e.message
    # Even held, a request dearer than the whole budget never fits.
    e = refusal(Decision(False, "budget_held"), Limits(budget_nano=1000, budget_period=period),
                STARTED, cost_nano=1001)
    assert e.headers == (("x-should-retry", "false"),)


def test_only_too_little_left_says_a_budget_is_spent() -> None:
    """The alerts' `budget.request_refused`: spend seldom reaches the budget (a request
    is refused once what is left is below its worst case), so that refusal is said.
    Neither a request dearer than the whole budget nor holds in flight is the budget's."""
    limits = Limits(budget_nano=1000, budget_period="day")
    assert exhausted(Decision(False, "budget"), limits, 300)
    assert exhausted(Decision(False, "budget"), limits, 1000)
    assert not exhausted(Decision(False, "budget"), limits, 1001)
    assert not exhausted(Decision(False, "budget_held"), limits, 300)
    for reason in ("requests", "tokens", "tokens_too_large", "concurrency"):
        assert not exhausted(Decision(False, reason), limits, 300)


def test_an_orgs_refusal_names_the_organization() -> None:
    lim = Limits(budget_nano=1000, budget_period="month")
    for reason, cost in (("budget", 10), ("budget_held", 10), ("budget", 1001)):
        e = refusal(Decision(False, reason), lim, STARTED, cost_nano=cost, org=True)
        assert "this organization's" in e.message.lower() and "API key" not in e.message
        e = refusal(Decision(False, reason), lim, STARTED, cost_nano=cost)
        assert "this api key's" in e.message.lower()


@pytest.mark.parametrize("reason", ["requests", "tokens", "tokens_too_large", "concurrency"])
def test_an_orgs_rate_refusal_names_the_organization(reason: str) -> None:
    e = refusal(denied(reason, 1.0), Limits(rpm=60, tpm=1000, max_concurrent=1), STARTED,
                org=True)
    assert "organization" in e.message and "API key" not in e.message


def test_a_total_budget_refusal_says_it_never_resets() -> None:
    e = refusal(Decision(False, "budget"), Limits(budget_nano=1, budget_period="total"),
                STARTED)
    assert e.message.endswith("held until it ends). It does not reset.")
    assert e.headers == (("x-should-retry", "false"),)


@pytest.mark.parametrize(("reason", "retry", "type_", "message", "retry_after"), [
    ("requests", 12.3, "requests",
     "Rate limit reached for requests per minute. Retry after the time given.", "13"),
    ("tokens", 0.2, "tokens",
     "Rate limit reached for tokens per minute. Retry after the time given.", "1"),
    # OpenAI's type for "Request too large ... on tokens per min" (limits tester: it was
    # the generic rate_limit_error, where every other tokens refusal says "tokens").
    ("tokens_too_large", None, "tokens",
     "This request reserves more tokens than the per-minute limit allows; "
     "lower max_tokens or the prompt.", None),
    ("concurrency", None, None, "Too many requests in flight for this API key.", "1"),
    ("duplicate", None, None, "Rate limit reached.", "1"),
])
def test_rate_refusals(reason: str, retry: float | None, type_: str | None, message: str,
                       retry_after: str | None) -> None:
    e = refusal(denied(reason, retry), Limits(rpm=60, tpm=1000), STARTED)
    assert (e.status, e.code, e.type, e.message) == (429, "rate_limit_exceeded", type_,
                                                     message)
    hint = ([("retry-after", retry_after)] if retry_after else
            [("x-should-retry", "false")] if reason == "tokens_too_large" else [])
    assert list(e.headers) == RATE + hint


def test_a_too_large_request_gets_no_retry_after_even_behind_the_rate_limit() -> None:
    d = Decision(False, "tokens_too_large", 5.0)
    assert refusal(d, Limits(tpm=10), STARTED).headers == (("x-should-retry", "false"),)


@pytest.mark.parametrize(("other", "want"), [
    (("tokens", 40.0), "40"), (("requests", 7.0), "12"), (("concurrency", None), "12"),
    (("tokens_too_large", None), "12"), (None, "12")])
def test_a_refusal_waits_for_the_other_partys_rate_too(
        other: tuple[str, float | None] | None, want: str) -> None:
    """Limits tester (one key's two rates; the same with its org's): a client waiting out
    one rate's retry-after was refused again by the other. The key's rate spent beside
    its org's (or the org's beside the key's): the longer wait."""
    o = None if other is None else denied(*other)
    e = refusal(denied("requests", 12.0), Limits(rpm=60), STARTED, org=True, other=o)
    assert dict(e.headers)["retry-after"] == want


def test_a_request_past_the_whole_budget_says_both_costs() -> None:
    """New-user tester: a $0.05 key refused an 8-token prompt with max_tokens 5 ("lower
    max_tokens or the prompt"), its hold mostly the chat template's allowance: the
    message says the worst case and the budget, and what the worst case holds."""
    e = refusal(Decision(False, "budget"), Limits(budget_nano=50_000_000,
                                                  budget_period="month"),
                STARTED, cost_nano=286_500_000)
    assert "($0.2865: its prompt's bound, with the chat template's own tokens" in e.message
    assert "whole budget for a period ($0.05)" in e.message
