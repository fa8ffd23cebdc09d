"""The embedded limit store: one process, plain dictionaries.

State per key (`KeyState`) and per key and budget period (`Ledger`), changed only by
policy/admission.py's transitions. Every method runs to completion without an await,
so on asyncio's single thread a check and its reservation are one atomic step; no
locks. The contract tests hold this store and the Redis one to identical results.
`sweep` finds the holds whose lease ended through one heap of (expiry, key_id), so it
never walks every key. The heap holds one live entry per key with holds (its earliest
lease end), not one per hold: a hold settled long before its lease ends leaves nothing
behind, so memory follows the keys in use, not the request rate times the lease.
"""

from __future__ import annotations

import heapq

from policy import admission
from policy.admission import KeyState, Ledger, Settled, settled
from policy.limits import WINDOW_S, Ask, Decision, Limits

MAX_BATCHES = 100_000  # `consume` batch ids remembered (a repeat comes within seconds)


class MemoryLimitStore:
    """Limits of one process. State is per key_id; budgets per (key_id, period)."""

    def __init__(self, *, window_s: float = WINDOW_S) -> None:
        self._window = window_s
        self._keys: dict[str, KeyState] = {}
        self._ledgers: dict[tuple[str, str], Ledger] = {}
        self._due: list[tuple[float, str]] = []  # (when to sweep, key_id)
        self._next: dict[str, float] = {}  # key_id -> its live entry in `_due`
        self._batches: dict[str, None] = {}  # `consume` batch ids counted, oldest first

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def admit(self, limits: Limits, ask: Ask, now: float, take: bool = True
                    ) -> Decision:
        if take:
            key = self._keys.setdefault(ask.key_id, KeyState())
            ledger = (self._ledgers.setdefault((ask.key_id, ask.period), Ledger())
                      if limits.budget_nano is not None else None)
        else:  # a look: a key never seen stays unseen
            key = self._keys.get(ask.key_id) or KeyState()
            ledger = (self._ledgers.get((ask.key_id, ask.period)) or Ledger()
                      if limits.budget_nano is not None else None)
        d = admission.admit(limits, ask, key, ledger, now, self._window, take)
        if take and d.allowed and admission.tracked(limits):
            self._schedule(ask.key_id, now + ask.lease_s)
        return d

    async def retake(self, limits: Limits, ask: Ask, now: float) -> None:
        """`admission.retake`: an admission that was allowed, replayed (the durable
        store's journal)."""
        key = self._keys.setdefault(ask.key_id, KeyState())
        ledger = (self._ledgers.setdefault((ask.key_id, ask.period), Ledger())
                  if limits.budget_nano is not None else None)
        admission.retake(limits, ask, key, ledger, now, self._window)
        if admission.tracked(limits) and ask.request_id in key.holds:
            self._schedule(ask.key_id, now + ask.lease_s)

    def _schedule(self, key_id: str, at: float) -> None:
        """Sweep `key_id` at `at` unless it is due sooner already."""
        due = self._next.get(key_id)
        if due is not None and due <= at:
            return
        self._next[key_id] = at
        heapq.heappush(self._due, (at, key_id))
        if len(self._due) > 2 * len(self._next) + 64:  # superseded entries: compact
            self._due = [(t, k) for k, t in self._next.items()]
            heapq.heapify(self._due)

    async def release(self, limits: Limits, ask: Ask, admitted: float, now: float
                      ) -> Settled:
        if self.held_since_other(ask, admitted):
            return settled(ask, 0, 0, applied=False)
        return await self.settle(limits, ask, 0, 0, now)

    def held_since_other(self, ask: Ask, admitted: float) -> bool:
        """Whether the hold under `ask`'s id (live, or charged as lost) is another
        request's than the one admitted at `admitted`: its lease ends at another time."""
        exp, rid = admitted + ask.lease_s, ask.request_id
        key = self._keys.get(ask.key_id)
        hold = key.holds.get(rid) if key is not None else None
        if hold is not None:
            return hold.exp != exp
        ledger = self._ledgers.get((ask.key_id, ask.period))
        if ledger is None:
            return False
        held = ledger.holds.get(rid) or ledger.lost.get(rid)
        return held is not None and held[1] != exp

    async def settle(self, limits: Limits, ask: Ask, used_tokens: int, cost_nano: int,
                     now: float) -> Settled:
        return admission.settle(limits, ask, used_tokens, cost_nano,
                                self._keys.get(ask.key_id),
                                self._ledgers.get((ask.key_id, ask.period)), now, self._window)

    async def consume(self, limits: Limits, key_id: str, requests: int, tokens: int,
                      now: float, batch_id: str = "") -> None:
        if batch_id:
            if batch_id in self._batches:
                return
            self._batches[batch_id] = None
            if len(self._batches) > MAX_BATCHES:
                del self._batches[next(iter(self._batches))]
        key = self._keys.setdefault(key_id, KeyState())
        admission.consume(limits, key, requests, tokens, now, self._window)

    def consumed(self, batch_id: str) -> bool:
        """Whether `consume` counted `batch_id` already."""
        return batch_id in self._batches

    def reset_rates(self, key_id: str) -> None:
        """Forget `key_id`'s request and token rates (full again); its holds stay. The
        local limiter of an outage starts each key from the store's count this way."""
        key = self._keys.get(key_id)
        if key is not None:
            key.requests = key.level = None

    async def budget(self, key_id: str, org: str, period: str, now: float) -> tuple[int, int]:
        ledger = self._ledgers.get((key_id, period))
        return (0, 0) if ledger is None else ledger.balance(now)

    def admitted_under(self, ask: Ask) -> str | None:
        return None  # its state is its own: nothing can go missing under it

    def admitted_under_was(self, ask: Ask, mark: str) -> None:
        return None

    async def sweep(self, now: float) -> list[Ask]:
        """Claim the holds whose lease ended unsettled, each once, charging them in full."""
        due: set[str] = set()
        while self._due and not admission.hold_live(self._due[0][0], now):
            at, key_id = heapq.heappop(self._due)
            if self._next.get(key_id) == at:  # else superseded by a sooner entry
                del self._next[key_id]
                due.add(key_id)
        lost: list[Ask] = []
        for key_id in due:
            key = self._keys.get(key_id)
            if key is None:
                continue
            for hold in admission.sweep(key, now):
                ledger = self._ledgers.get((key_id, hold.ask.period))
                if ledger is not None:
                    ledger.expire(now)
                lost.append(hold.ask)
            rest = [*key.holds.values(), *key.ended.values()]
            if rest:  # the next lease to end (its heap may hold settled ones: sooner)
                self._schedule(key_id, min(h.exp for h in rest))
        return lost

    # -- for the durable store (durable.py): the state itself, to snapshot and restore --

    def state(self) -> tuple[dict[str, KeyState], dict[tuple[str, str], Ledger]]:
        """The live dictionaries (not copies): per key, and per (key, period)."""
        return self._keys, self._ledgers

    def restore(self, keys: dict[str, KeyState],
                ledgers: dict[tuple[str, str], Ledger]) -> None:
        """Replace the whole state (at start, from a snapshot)."""
        self._keys, self._ledgers = keys, ledgers
        self._next = {k: min(h.exp for h in [*ks.holds.values(), *ks.ended.values()])
                      for k, ks in keys.items() if ks.holds or ks.ended}
        self._due = [(t, k) for k, t in self._next.items()]
        heapq.heapify(self._due)
