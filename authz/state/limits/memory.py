"""The embedded limit store: one process, plain dictionaries.

State per key (`KeyState`) and per key and budget period (`Ledger`), changed only by
policy/admission.py's transitions. Every method runs to completion without an await,
so on asyncio's single thread a check and its reservation are one atomic step; no
locks. The contract tests hold this store and the Redis one to identical results.
"""

from __future__ import annotations

from policy import admission
from policy.admission import KeyState, Ledger, Settled
from policy.limits import WINDOW_S, Ask, Decision, Limits


class MemoryLimitStore:
    """Limits of one process. State is per key_id; budgets per (key_id, period)."""

    def __init__(self, *, window_s: float = WINDOW_S) -> None:
        self._window = window_s
        self._keys: dict[str, KeyState] = {}
        self._ledgers: dict[tuple[str, str], Ledger] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def admit(self, limits: Limits, ask: Ask, now: float) -> Decision:
        key = self._keys.setdefault(ask.key_id, KeyState())
        ledger = (self._ledgers.setdefault((ask.key_id, ask.period), Ledger())
                  if limits.budget_nano is not None else None)
        return admission.admit(limits, ask, key, ledger, now, self._window)

    async def settle(self, limits: Limits, ask: Ask, used_tokens: int, cost_nano: int,
                     now: float) -> Settled:
        return admission.settle(limits, ask, used_tokens, cost_nano,
                                self._keys.get(ask.key_id),
                                self._ledgers.get((ask.key_id, ask.period)), now, self._window)

    async def consume(self, limits: Limits, key_id: str, requests: int, tokens: int,
                      now: float) -> None:
        key = self._keys.setdefault(key_id, KeyState())
        admission.consume(limits, key, requests, tokens, now, self._window)

    async def budget(self, key_id: str, org: str, period: str, now: float) -> tuple[int, int]:
        ledger = self._ledgers.get((key_id, period))
        return (0, 0) if ledger is None else ledger.balance(now)
