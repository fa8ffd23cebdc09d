"""The embedded limit store: one process, plain dictionaries.

State per key (`KeyState`) and per key and budget period (`Ledger`), changed only by
policy/admission.py's transitions. Every method runs to completion without an await,
so on asyncio's single thread a check and its reservation are one atomic step; no
locks. The contract tests hold this store and the Redis one to identical results.
`sweep` finds the holds whose lease ended through one heap of (expiry, key_id), so it
never walks every key.
"""

from __future__ import annotations

import heapq

from policy import admission
from policy.admission import KeyState, Ledger, Settled
from policy.limits import WINDOW_S, Ask, Decision, Limits


class MemoryLimitStore:
    """Limits of one process. State is per key_id; budgets per (key_id, period)."""

    def __init__(self, *, window_s: float = WINDOW_S) -> None:
        self._window = window_s
        self._keys: dict[str, KeyState] = {}
        self._ledgers: dict[tuple[str, str], Ledger] = {}
        self._due: list[tuple[float, str]] = []  # (lease expiry, key_id) of every hold

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def admit(self, limits: Limits, ask: Ask, now: float) -> Decision:
        key = self._keys.setdefault(ask.key_id, KeyState())
        ledger = (self._ledgers.setdefault((ask.key_id, ask.period), Ledger())
                  if limits.budget_nano is not None else None)
        d = admission.admit(limits, ask, key, ledger, now, self._window)
        if d.allowed and admission.tracked(limits):
            heapq.heappush(self._due, (now + ask.lease_s, ask.key_id))
        return d

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

    async def sweep(self, now: float) -> list[Ask]:
        """Claim the holds whose lease ended unsettled, each once, charging them in full."""
        due: set[str] = set()
        while self._due and not admission.hold_live(self._due[0][0], now):
            due.add(heapq.heappop(self._due)[1])
        lost: list[Ask] = []
        for key_id in due:
            key = self._keys.get(key_id)
            for hold in admission.sweep(key, now) if key is not None else []:
                ledger = self._ledgers.get((key_id, hold.ask.period))
                if ledger is not None:
                    ledger.expire(now)
                lost.append(hold.ask)
        return lost

    # -- for the durable store (durable.py): the state itself, to snapshot and restore --

    def state(self) -> tuple[dict[str, KeyState], dict[tuple[str, str], Ledger]]:
        """The live dictionaries (not copies): per key, and per (key, period)."""
        return self._keys, self._ledgers

    def restore(self, keys: dict[str, KeyState],
                ledgers: dict[tuple[str, str], Ledger]) -> None:
        """Replace the whole state (at start, from a snapshot)."""
        self._keys, self._ledgers = keys, ledgers
        self._due = [(h.exp, k) for k, ks in keys.items()
                     for h in [*ks.holds.values(), *ks.ended.values()]]
        heapq.heapify(self._due)
