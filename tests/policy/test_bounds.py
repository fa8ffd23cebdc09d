"""The largest limits: exactly what the admission arithmetic accepts, refused past it by
every model a limit is written through."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import BaseModel, ValidationError

from policy.admin_schema import KeyCreate
from policy.admission import check_ask
from policy.bounds import MAX_BUDGET_USD, MAX_COUNT, MAX_EXACT
from policy.config import OrgLimits
from policy.keyrecord import KeyRecord
from policy.limits import Ask, Limits, usd_to_nano

ASK = Ask("r", "k", "o", 1, 1, "total", 60.0)


def test_the_largest_budget_is_the_largest_exact_amount() -> None:
    assert usd_to_nano(MAX_BUDGET_USD) == MAX_EXACT
    check_ask(Limits(budget_nano=usd_to_nano(MAX_BUDGET_USD), tpm=MAX_COUNT), ASK)
    with pytest.raises(ValueError):
        check_ask(Limits(budget_nano=usd_to_nano(MAX_BUDGET_USD + Decimal("1e-9"))), ASK)


def _models() -> list[tuple[type[BaseModel], dict[str, object]]]:
    return [(KeyRecord, {"id": "k", "org": "o", "sha256": "0" * 64}),
            (OrgLimits, {}), (KeyCreate, {"org": "o"})]


@pytest.mark.parametrize(("model", "base"), _models())
def test_every_model_takes_the_bound_and_refuses_past_it(
    model: type[BaseModel], base: dict[str, object],
) -> None:
    model.model_validate({**base, "budget_usd": str(MAX_BUDGET_USD), "rpm": MAX_COUNT,
                          "tpm": MAX_COUNT, "max_concurrent": MAX_COUNT})
    for field, value in (("budget_usd", str(MAX_BUDGET_USD + Decimal("1e-9"))),
                         ("budget_usd", "1e400"), ("rpm", MAX_COUNT + 1),
                         ("tpm", 10**23), ("max_concurrent", MAX_COUNT + 1)):
        with pytest.raises(ValidationError) as e:
            model.model_validate({**base, field: value})
        assert e.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize(("model", "base"), _models())
def test_budgets_are_whole_nano_usd_written_as_plain_decimals(
    model: type[BaseModel], base: dict[str, object],
) -> None:
    """A finer budget would be rounded (up: the ledger could spend past what was
    written); one written back out is never in scientific notation."""
    for fine in ("0.0000000015", "1.5E-9", "0.1234567891"):
        with pytest.raises(ValidationError):
            model.model_validate({**base, "budget_usd": fine})
    # Decimal reads these too: "1_00" as 100 (a typo for "1.00"), other scripts' digits,
    # spaces around it (admin tester)
    for odd in ("1_00", "\u0661\u0662", " 2 ", "2\n", "+2", "-0", "NaN", "Infinity"):
        with pytest.raises(ValidationError):
            model.model_validate({**base, "budget_usd": odd})
    for value, shown in (("1E-9", "0.000000001"), ("1e2", "100"), ("0.10", "0.10"),
                         ("1.0000000000", "1.0000000000")):
        out = model.model_validate({**base, "budget_usd": value})
        assert out.model_dump(mode="json")["budget_usd"] == shown
