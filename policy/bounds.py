"""The largest limits the arithmetic keeps exact. Redis's Lua numbers are doubles, so
counts and nano-USD amounts are exact below 2**53; a limit past that is refused where it
is written (config, `keys`, the admin API), not found out by every request later."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from pydantic import AfterValidator, Field, PlainSerializer

MAX_EXACT = 2**53 - 1
# A budget in USD whose nano-USD amount is at most MAX_EXACT (about 9 million USD).
MAX_BUDGET_USD = Decimal(MAX_EXACT) / 10**9
# Budgets are kept in whole nano-USD: a finer amount would be rounded, and a ledger
# could then spend past what was written.
BUDGET_DECIMALS = 9
# A budget field: whole nano-USD up to MAX_BUDGET_USD, written out as a plain decimal
# ("0.000000001", never "1E-9").
BudgetUsd = Annotated[
    Decimal, Field(ge=0, le=MAX_BUDGET_USD, decimal_places=BUDGET_DECIMALS),
    AfterValidator(lambda v: abs(v) if v == 0 else v),  # -0.0 is 0.0
    PlainSerializer(lambda v: format(v, "f"), return_type=str, when_used="json")]
# Requests, tokens or streams per limit.
MAX_COUNT = MAX_EXACT
# A limit's count as a client writes it: a JSON or YAML integer (not "5", not true).
Count = Annotated[int, Field(strict=True, ge=1, le=MAX_COUNT)]
