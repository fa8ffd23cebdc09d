"""The embedded limit store: one process, plain dictionaries.

Every method runs to completion without an await, so on asyncio's single thread a
check and its reservation are one atomic step; no locks. The arithmetic is
policy/limits.py's, called directly; the Redis store's Lua mirrors this file line
for line, and the contract tests hold the two to identical Decisions.

Liveness rule shared with the Redis store: a reservation (its concurrency lease,
its tokens, its budget hold) is live while `now < admitted_at + ask.lease_s`.
Expired ones stop counting; a settle that arrives after its lease charges and
refunds nothing (the hold was already given back, so charging could pass the
budget).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from policy.limits import (
    WINDOW_S,
    Ask,
    Decision,
    GcraResult,
    Limits,
    bucket_level,
    bucket_refund,
    bucket_reset_s,
    bucket_take,
    budget_admits,
    budget_charge,
    gcra,
)

# Lua numbers are doubles: integers are exact below 2**53 (about 9 million USD in nano).
MAX_EXACT = 2**53 - 1


def check_ask(limits: Limits, ask: Ask) -> None:
    """Refuse inputs the arithmetic cannot keep exact (a caller's bug, not a denial)."""
    if ask.tokens < 0 or not 0 <= ask.cost_nano <= MAX_EXACT:
        raise ValueError("ask.tokens and ask.cost_nano must be >= 0 (cost below 2**53)")
    if not ask.lease_s > 0:
        raise ValueError("ask.lease_s must be > 0")
    if limits.budget_nano is not None and not 0 <= limits.budget_nano <= MAX_EXACT:
        raise ValueError("budget_nano must be in [0, 2**53)")


def check_usage(used_tokens: int, cost_nano: int) -> None:
    if used_tokens < 0 or not 0 <= cost_nano <= MAX_EXACT:
        raise ValueError("used_tokens and cost_nano must be >= 0 (cost below 2**53)")


@dataclass(slots=True)
class _Reservation:
    tokens: int | None  # taken from the TPM bucket; None when the key had no tpm
    exp: float  # lease expiry


def _expired(heap: list[tuple[float, str]], live: dict[str, Any], now: float,
             exp_of: Callable[[Any], float]) -> list[str]:
    """Pop the ids whose expiry has passed, in O(log n) each (lazy deletion: an id that
    was settled, or re-added with another expiry, is skipped)."""
    out = []
    while heap and heap[0][0] <= now:
        exp, rid = heapq.heappop(heap)
        if rid in live and exp_of(live[rid]) == exp:
            out.append(rid)
    if len(heap) > 4 * len(live) + 64:  # settled entries pile up: compact, amortised O(1)
        heap[:] = [(e, r) for e, r in heap if r in live and exp_of(live[r]) == e]
        heapq.heapify(heap)
    return out


@dataclass(slots=True)
class _KeyState:
    tat: float | None = None  # GCRA theoretical arrival time
    level: float | None = None  # TPM bucket content at `ts` (None: full)
    ts: float = 0.0
    leases: dict[str, float] = field(default_factory=dict)  # request_id -> expiry
    res: dict[str, _Reservation] = field(default_factory=dict)
    lease_heap: list[tuple[float, str]] = field(default_factory=list)
    res_heap: list[tuple[float, str]] = field(default_factory=list)


@dataclass(slots=True)
class _Ledger:
    spent: int = 0
    reserved: int = 0  # always the sum of `holds` costs
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)  # rid -> (cost, exp)
    heap: list[tuple[float, str]] = field(default_factory=list)

    def purge(self, now: float) -> None:
        for rid in _expired(self.heap, self.holds, now, lambda h: h[1]):
            self.reserved -= self.holds.pop(rid)[0]


class MemoryLimitStore:
    """Limits of one process. State is per key_id; budgets per (key_id, period)."""

    def __init__(self, *, window_s: float = WINDOW_S) -> None:
        self._window = window_s
        self._keys: dict[str, _KeyState] = {}
        self._ledgers: dict[tuple[str, str], _Ledger] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def admit(self, limits: Limits, ask: Ask, now: float) -> Decision:
        check_ask(limits, ask)
        w, rid = self._window, ask.request_id
        st = self._keys.setdefault(ask.key_id, _KeyState())
        # Expired leases and reservations are dropped first (invisible: they no longer count).
        for r in _expired(st.lease_heap, st.leases, now, lambda e: e):
            del st.leases[r]
        for r in _expired(st.res_heap, st.res, now, lambda r: r.exp):
            del st.res[r]

        reason, retry = "", None
        tracked = (limits.tpm is not None or limits.max_concurrent is not None
                   or limits.budget_nano is not None)
        if tracked and rid in st.res:
            reason = "duplicate"  # the same request_id is still in flight

        # requests: GCRA
        g = None
        if limits.rpm is not None:
            g = gcra(now if st.tat is None else st.tat, now, limits.rpm, w)
            if not g.allowed and not reason:
                reason, retry = "requests", g.retry_after_s

        # concurrency: live leases
        if (limits.max_concurrent is not None and not reason
                and len(st.leases) >= limits.max_concurrent):
            reason = "concurrency"

        # tokens: the bucket must hold the whole reservation
        level = after = 0.0
        if limits.tpm is not None:
            cap = limits.tpm
            level = float(cap) if st.level is None else bucket_level(st.level, st.ts, now, cap, w)
            after = level
            if ask.tokens > cap:
                reason = reason or "tokens_too_large"
            else:
                ok, after, wait = bucket_take(level, ask.tokens, cap, w)
                if not ok and not reason:
                    reason, retry = "tokens", wait

        # budget: spent + live holds + this worst case
        ledger = None
        if limits.budget_nano is not None and not reason:
            ledger = self._ledgers.setdefault((ask.key_id, ask.period), _Ledger())
            ledger.purge(now)
            if not budget_admits(ledger.spent, ledger.reserved, ask.cost_nano,
                                 limits.budget_nano):
                reason = "budget"

        if reason:
            return _decision(limits, False, reason, retry, g, st.tat, now, level, w)

        # Admitted: reserve everything, still without an await.
        exp = now + ask.lease_s
        if g is not None:
            st.tat = g.tat
        if limits.tpm is not None:
            st.level, st.ts = after, now
        if limits.max_concurrent is not None:
            st.leases[rid] = exp
            heapq.heappush(st.lease_heap, (exp, rid))
        if ledger is not None:
            ledger.reserved += ask.cost_nano
            ledger.holds[rid] = (ask.cost_nano, exp)
            heapq.heappush(ledger.heap, (exp, rid))
        if tracked:
            st.res[rid] = _Reservation(ask.tokens if limits.tpm is not None else None, exp)
            heapq.heappush(st.res_heap, (exp, rid))
        return _decision(limits, True, "", None, g, st.tat, now, after, w)

    async def settle(self, limits: Limits, ask: Ask, used_tokens: int, cost_nano: int,
                     now: float) -> None:
        check_usage(used_tokens, cost_nano)
        st = self._keys.get(ask.key_id)
        res = st.res.pop(ask.request_id, None) if st is not None else None
        if st is None or res is None:
            return  # unknown, expired and purged, or already settled: a no-op
        st.leases.pop(ask.request_id, None)
        live = now < res.exp
        ledger = self._ledgers.get((ask.key_id, ask.period))
        hold = ledger.holds.pop(ask.request_id, None) if ledger is not None else None
        if ledger is not None and hold is not None:
            ledger.reserved -= hold[0]
            if live:
                ledger.spent += budget_charge(hold[0], cost_nano)
        if live and res.tokens is not None and limits.tpm is not None:
            cap = limits.tpm
            level = float(cap) if st.level is None else bucket_level(st.level, st.ts, now, cap,
                                                                     self._window)
            st.level, st.ts = bucket_refund(level, res.tokens, used_tokens, cap), now

    async def consume(self, limits: Limits, key_id: str, requests: int, tokens: int,
                      now: float) -> None:
        st = self._keys.setdefault(key_id, _KeyState())
        w = self._window
        if limits.rpm is not None and requests > 0:
            st.tat = max(now if st.tat is None else st.tat, now) + requests * w / limits.rpm
        if limits.tpm is not None and tokens > 0:
            cap = limits.tpm
            level = float(cap) if st.level is None else bucket_level(st.level, st.ts, now, cap, w)
            st.level, st.ts = level - tokens, now

    async def budget(self, key_id: str, org: str, period: str, now: float) -> tuple[int, int]:
        ledger = self._ledgers.get((key_id, period))
        if ledger is None:
            return 0, 0
        ledger.purge(now)
        return ledger.spent, ledger.reserved


def _decision(limits: Limits, allowed: bool, reason: str, retry: float | None,
              g: GcraResult | None, tat: float | None, now: float, level: float,
              w: float) -> Decision:
    """Header material: the state after this decision (a denial consumed nothing)."""
    rem_r: int | None = None
    reset_r = 0.0
    if limits.rpm is not None and g is not None:
        if not g.allowed:
            rem_r, reset_r = 0, g.reset_s
        elif allowed:
            rem_r, reset_r = g.remaining, g.reset_s
        else:  # admissible by GCRA but denied by a later check: nothing was taken
            rem_r = min(g.remaining + 1, limits.rpm)
            reset_r = max(now if tat is None else tat, now) - now
    rem_t: int | None = None
    reset_t = 0.0
    if limits.tpm is not None:
        rem_t, reset_t = math.floor(level), bucket_reset_s(level, limits.tpm, w)
    return Decision(allowed, reason, retry, limits.rpm, rem_r, reset_r,
                    limits.tpm, rem_t, reset_t)
