"""The largest limits the arithmetic keeps exact. Redis's Lua numbers are doubles, so
counts and nano-USD amounts are exact below 2**53; a limit past that is refused where it
is written (config, `keys`, the admin API), not found out by every request later."""

from __future__ import annotations

from decimal import Decimal

MAX_EXACT = 2**53 - 1
# A budget in USD whose nano-USD amount is at most MAX_EXACT (about 9 million USD).
MAX_BUDGET_USD = Decimal(MAX_EXACT) / 10**9
# Requests, tokens or streams per limit.
MAX_COUNT = MAX_EXACT
