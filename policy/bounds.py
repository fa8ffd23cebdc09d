"""The largest limits the arithmetic keeps exact. Redis's Lua numbers are doubles, so
counts and nano-USD amounts are exact below 2**53; a limit past that is refused where it
is written (config, `keys`, the admin API), not found out by every request later."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, PlainSerializer

MAX_EXACT = 2**53 - 1
# A budget in USD whose nano-USD amount is at most MAX_EXACT (about 9 million USD).
MAX_BUDGET_USD = Decimal(MAX_EXACT) / 10**9
# Budgets are kept in whole nano-USD: a finer amount would be rounded, and a ledger
# could then spend past what was written.
BUDGET_DECIMALS = 9
# An amount of money written as text: ASCII digits and one point. Python's Decimal also
# reads "1_00" (100: a typo for "1.00" gave a budget 100 times larger), other scripts'
# digits ("١٢") and spaces around it (admin tester).
PLAIN_AMOUNT = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")


def plain_amount(v: Any) -> Any:
    """A string amount as `PLAIN_AMOUNT` allows (an exponent too: "1e2"), else a
    ValueError (other types pass)."""
    if isinstance(v, str) and not PLAIN_AMOUNT.fullmatch(v):
        raise ValueError(f"expected an amount in ASCII digits with at most one '.' (and "
                         f"an exponent, as in '1e3'), got {v[:40]!r}")
    return v


# A budget field: whole nano-USD up to MAX_BUDGET_USD, written out as a plain decimal
# ("0.000000001", never "1E-9").
BudgetUsd = Annotated[
    Decimal, BeforeValidator(plain_amount),
    Field(ge=0, le=MAX_BUDGET_USD, decimal_places=BUDGET_DECIMALS),
    AfterValidator(lambda v: abs(v) if v == 0 else v),  # -0.0 is 0.0
    PlainSerializer(lambda v: format(v, "f"), return_type=str, when_used="json")]
# Requests, tokens or streams per limit.
MAX_COUNT = MAX_EXACT
# A limit's count as a client writes it: a JSON or YAML integer (not "5", not true).
Count = Annotated[int, Field(strict=True, ge=1, le=MAX_COUNT)]
