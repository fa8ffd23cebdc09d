"""policy/usage.py: token usage from OpenAI `usage` blocks, exact cost, the usage record."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from policy.config import Price
from policy.usage import (
    Usage,
    UsageRecord,
    charged_usd,
    cost_usd,
    make_record,
    usage_from_obj,
)

PRICE = Price(input=Decimal("0.50"), output=Decimal("1.50"))


def test_cost_is_exact_decimal() -> None:
    price = Price(input=Decimal("0.1"), output=Decimal("0.3"))
    assert cost_usd(Usage(3, 7), price) == Decimal("0.0024")
    assert cost_usd(Usage(0, 0), price) == 0
    assert Usage(3, 7).total_tokens == 10


@given(st.integers(0, 10**7), st.integers(0, 10**7))
def test_cost_is_additive(p: int, c: int) -> None:
    assert cost_usd(Usage(p, c), PRICE) == cost_usd(Usage(p, 0), PRICE) + cost_usd(
        Usage(0, c), PRICE)


def test_a_record_costs_what_the_ledger_charges() -> None:
    """A price finer than a nano-dollar per token: the record says what settlement
    charged (rounded up per request), so records sum to the ledger."""
    fine = Price(input=Decimal("0.0000000007"), output=Decimal("0.0000000013"))
    assert cost_usd(Usage(3, 1), fine) == Decimal("0.0000000000034")
    assert charged_usd(Usage(3, 1), fine) == Decimal("0.000000001")
    assert charged_usd(Usage(3, 7), PRICE) == cost_usd(Usage(3, 7), PRICE)


def test_usage_from_obj_reads_only_well_formed_blocks() -> None:
    assert usage_from_obj({"prompt_tokens": 3, "completion_tokens": 4}) == Usage(3, 4)
    # Embeddings-style: no completion tokens.
    assert usage_from_obj({"prompt_tokens": 5, "total_tokens": 5}) == Usage(5, 0)
    for bad in (None, [], {}, {"prompt_tokens": -1}, {"prompt_tokens": 1.5},
                {"prompt_tokens": True}, {"prompt_tokens": 1, "completion_tokens": "2"},
                {"prompt_tokens": 1, "completion_tokens": -2}):
        assert usage_from_obj(bad) is None, bad


def test_usage_from_obj_reads_every_endpoint_shape() -> None:
    # vLLM's pooling UsageInfo may carry a null completion count.
    assert usage_from_obj({"prompt_tokens": 5, "total_tokens": 5,
                           "completion_tokens": None}) == Usage(5, 0)
    # The Responses API: input / output tokens, with details.
    assert usage_from_obj({"input_tokens": 28, "input_tokens_details": {"cached_tokens": 0},
                           "output_tokens": 3, "output_tokens_details": {},
                           "total_tokens": 31}) == Usage(28, 3)
    assert usage_from_obj({"input_tokens": 4}) == Usage(4, 0)
    for bad in ({"input_tokens": "4"}, {"input_tokens": 4, "output_tokens": -1},
                {"output_tokens": 3}):
        assert usage_from_obj(bad) is None, bad


def test_make_record_fills_every_field() -> None:
    rec = make_record(
        request_id="r-1", key_id="k", org="o", model="demo", upstream_model="tiny-llama",
        backend="http://b:8000", usage=Usage(1000, 2000), price=PRICE, status=200,
        stream=True, estimated=False,
        started_at=datetime(2026, 11, 23, 12, 0, 1, 250000, tzinfo=UTC),
        duration_ms=12.34567, endpoint="chat", key_budget_period="month:2026-11",
        sequences=2, prompt_bound=1200, completion_bound=4000,
    )
    assert rec == UsageRecord(
        request_id="r-1", key_id="k", org="o", model="demo", upstream_model="tiny-llama",
        backend="http://b:8000", prompt_tokens=1000, completion_tokens=2000,
        total_tokens=3000, cost_usd="3.5", status=200, stream=True, estimated=False,
        started_at="2026-11-23T12:00:01.250000Z", duration_ms=12.346, endpoint="chat",
        key_budget_period="month:2026-11", org_budget_period=None, sequences=2,
        prompt_bound=1200, completion_bound=4000,
    )
    assert list(rec.to_dict()) == [
        "request_id", "key_id", "org", "model", "upstream_model", "backend",
        "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd", "status", "stream",
        "estimated", "started_at", "duration_ms", "endpoint", "key_budget_period",
        "org_budget_period", "sequences", "prompt_bound", "completion_bound"]
    assert rec.to_dict()["cost_usd"] == "3.5"


def test_record_cost_is_a_plain_decimal_string() -> None:
    def cost(usage: Usage, price: Price = PRICE) -> str:
        return make_record(request_id="r", key_id="k", org="o", model="m", upstream_model="u",
                           backend="", usage=usage, price=price, status=200, stream=False,
                           estimated=False, started_at=datetime(2026, 1, 1, tzinfo=UTC),
                           duration_ms=0.0, endpoint="chat").cost_usd

    assert cost(Usage(0, 0)) == "0"
    assert cost(Usage(1, 0)) == "0.0005"  # never "5E-4"
    assert cost(Usage(2000, 0)) == "1"  # never "1.000"
    assert cost(Usage(1, 0), Price(input=Decimal("0.000001"))) == "0.000000001"
