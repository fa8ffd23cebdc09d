"""Rate limits and budgets as pure arithmetic on an injected clock.

- Requests per minute: GCRA in its continuous-state bucket form (a burst of N, then
  continuous refill at N/min; no fixed-window edges that admit 2N). The bucket keeps
  its content and time, not an absolute theoretical arrival time: at epoch-sized clocks
  a double holds an arrival time to ~0.24 us, so adding 60/N s per request drifted
  (rpm 50,000 admitted 50,001 in a burst, 1,000,000 refused 1,357 it had room for).
- Tokens per minute: a token bucket of capacity N refilling at N/min. Admission
  takes the request's ceiling (prompt bound + max_tokens); the end of the
  request gives back what it did not use.
- Budgets: integer nano-USD (exact; Redis and Lua keep integers exact to 2^53).
  Admission reserves the worst-case cost; settlement charges the real cost (an
  overrun past the hold too), and a spent budget admits nothing more.
- Periods and OpenAI's `x-ratelimit-*` headers.
policy/admission.py applies these to a key's state; every store (memory, Redis/Lua)
performs exactly that arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache

from policy.config import Price

NANO_PER_USD = 10**9
WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Limits:
    """A key's limits; None means unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    budget_nano: int | None = None
    budget_period: str = "month"

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.rpm, self.tpm, self.max_concurrent,
                                           self.budget_nano))


@dataclass(frozen=True, slots=True)
class HoldRecord:
    """What the usage record of a lost hold says about its request (see
    policy.admission.lost_record): the request as admitted, with its worst case."""

    model: str  # the alias the client asked for
    upstream_model: str
    endpoint: str
    stream: bool
    prompt_tokens: int  # the prompt bound
    completion_tokens: int  # the completion bound (max_tokens x every multiplier)
    started_at: str  # as UsageRecord.started_at (ISO 8601, UTC, "Z")
    key_id: str = ""  # the requesting key, when the hold is its org's ("": Ask.key_id)
    # The ledgers this request is charged to (UsageRecord's fields of the same names).
    key_budget_period: str | None = None
    org_budget_period: str | None = None


@dataclass(frozen=True, slots=True)
class Ask:
    """What one request asks to reserve at admission."""

    request_id: str
    key_id: str
    org: str
    tokens: int  # TPM reservation: prompt bound + completion ceiling
    cost_nano: int  # worst-case cost
    period: str  # budget period id, see period_id()
    lease_s: float  # after this, an unsettled hold (a lost replica) is charged in full
    # The material of the `lost` usage record written if the hold is never settled;
    # None: this hold writes none (an org's hold whose key holds too, GET /v1/models).
    record: HoldRecord | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str = ""  # requests | tokens | tokens_too_large | concurrency | budget
    retry_after_s: float | None = None
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float = 0.0
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float = 0.0


# -- requests: GCRA --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GcraResult:
    allowed: bool
    level: float  # requests left in the bucket after this (unchanged when denied)
    remaining: int
    reset_s: float  # until the full burst is available again
    retry_after_s: float


def gcra(level: float, limit: int, window_s: float = WINDOW_S) -> GcraResult:
    """One request against a bucket of `limit` requests refilling at `limit` a window,
    holding `level` now (bucket_level): the theoretical arrival time is
    now + (limit - level) x window / limit."""
    if level < 1:
        return GcraResult(False, level, 0, (limit - level) * window_s / limit,
                          (1 - level) * window_s / limit)
    after = level - 1
    return GcraResult(True, after, min(math.floor(after), limit - 1),
                      (limit - after) * window_s / limit, 0.0)


# -- tokens: a bucket with reservations --------------------------------------------


def bucket_level(level: float, ts: float, now: float, capacity: int,
                 window_s: float = WINDOW_S) -> float:
    """The bucket's content at `now`, refilled continuously, at most `capacity`."""
    return min(float(capacity), level + max(0.0, now - ts) * capacity / window_s)


def bucket_take(level: float, want: int, capacity: int,
                window_s: float = WINDOW_S) -> tuple[bool, float, float]:
    """(allowed, new level, retry_after_s) for taking `want` tokens from `level`."""
    if want <= level:
        return True, level - want, 0.0
    return False, level, (want - level) * window_s / capacity


def bucket_reset_s(level: float, capacity: int, window_s: float = WINDOW_S) -> float:
    return max(0.0, (capacity - level) * window_s / capacity)


def bucket_refund(level: float, reserved: int, used: int, capacity: int) -> float:
    """Settle a reservation: give back what was not used (or take the overrun)."""
    return min(float(capacity), level + (reserved - used))


# -- budgets ------------------------------------------------------------------------


def cost_nano(prompt_tokens: int, completion_tokens: int, price: Price) -> int:
    """Cost in nano-USD, rounded up to the next nano-dollar (never undercharged). In
    exact integers: Decimal's context keeps 28 digits, and a price with more would lose
    the last ones before the rounding up (Fraction arithmetic was ~9 µs a call)."""
    ni, di = _ratio(price.input)
    no, do = _ratio(price.output)
    per_1k = (prompt_tokens * ni * do + completion_tokens * no * di) * (NANO_PER_USD // 1000)
    return -(-per_1k // (di * do))


def usd_to_nano(usd: Decimal) -> int:
    """USD in nano-USD, rounded up, exactly (whatever the digits). ValueError for a
    NaN or an infinity (an unreadable amount, as it was)."""
    if not usd.is_finite():
        raise ValueError(f"not an amount: {usd}")
    n, d = _ratio(usd)
    return -(-n * NANO_PER_USD // d)


@lru_cache(maxsize=4096)
def _ratio(d: Decimal) -> tuple[int, int]:
    """A decimal as an exact integer ratio (a model's few prices: cached). ValueError for
    a NaN or an infinity."""
    return d.as_integer_ratio()


def nano_to_usd(nano: int) -> Decimal:
    return Decimal(nano) / NANO_PER_USD


def usd_text(nano: int) -> str:
    """`nano` in dollars as plain decimal text, exact, with no trailing zeros ("0.05")."""
    return format(nano_to_usd(nano).normalize() if nano else Decimal(0), "f")


def budget_admits(spent: int, reserved: int, ask: int, budget: int) -> bool:
    """Whether the worst case fits beside what is spent and held (never once spent > budget)."""
    return spent + reserved + ask <= budget


def period_id(period: str, now: datetime) -> str:
    """The budget period a moment falls in: calendar days and months in UTC."""
    now = now.astimezone(UTC)
    if period == "day":
        return f"day:{now:%Y-%m-%d}"
    if period == "month":
        return f"month:{now:%Y-%m}"
    return "total"


def period_start(period: str, now: datetime) -> datetime | None:
    """When the period `now` falls in began (None for `total`)."""
    now = now.astimezone(UTC)
    if period == "day":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return None


def previous_period_id(period: str, now: datetime) -> str | None:
    """The id of the period before the one `now` falls in (None for `total`)."""
    start = period_start(period, now)
    return None if start is None else period_id(period, start - timedelta(seconds=1))


def period_reset_s(period: str, now: datetime) -> float | None:
    """Seconds until the period ends (None for `total`: it never resets)."""
    now = now.astimezone(UTC)
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        nxt = datetime.fromtimestamp(start.timestamp() + 86400, UTC)
    elif period == "month":
        y, m = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
        nxt = datetime(y, m, 1, tzinfo=UTC)
    else:
        return None
    return (nxt - now).total_seconds()


# -- OpenAI's headers -----------------------------------------------------------------


def format_reset(seconds: float) -> str:
    """OpenAI's duration style: `20ms`, `1s`, `6m0s`, `1h2m3s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    s = math.ceil(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    if m:
        return f"{m}m{sec}s"
    return f"{sec}s"


RATE_HEADER_NAMES = (
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
)


def rate_headers(d: Decision) -> list[tuple[str, str]]:
    """OpenAI's rate-limit headers (names in RATE_HEADER_NAMES) for the limits a key has."""
    out: list[tuple[str, str]] = []
    if d.limit_requests is not None:
        out += [
            ("x-ratelimit-limit-requests", str(d.limit_requests)),
            ("x-ratelimit-remaining-requests", str(max(0, d.remaining_requests or 0))),
            ("x-ratelimit-reset-requests", format_reset(d.reset_requests_s)),
        ]
    if d.limit_tokens is not None:
        out += [
            ("x-ratelimit-limit-tokens", str(d.limit_tokens)),
            ("x-ratelimit-remaining-tokens", str(max(0, d.remaining_tokens or 0))),
            ("x-ratelimit-reset-tokens", format_reset(d.reset_tokens_s)),
        ]
    return out


def tightest(key: Decision, org: Decision) -> Decision:
    """The rate-limit header material of two admissions (the key's and its org's): for
    requests and for tokens, the limit with less remaining (a client paces itself by the
    headers, so they show the limit it will meet first)."""
    req = org if org.limit_requests is not None and (
        key.limit_requests is None
        or (org.remaining_requests or 0) < (key.remaining_requests or 0)) else key
    tok = org if org.limit_tokens is not None and (
        key.limit_tokens is None
        or (org.remaining_tokens or 0) < (key.remaining_tokens or 0)) else key
    return replace(key, limit_requests=req.limit_requests,
                   remaining_requests=req.remaining_requests,
                   reset_requests_s=req.reset_requests_s, limit_tokens=tok.limit_tokens,
                   remaining_tokens=tok.remaining_tokens, reset_tokens_s=tok.reset_tokens_s)


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
