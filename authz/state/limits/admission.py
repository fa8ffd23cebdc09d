"""The outage policy around the limit store: admit and settle against it and, when it
cannot answer, fail closed (503) or admit under a local per-replica limiter whose usage
is counted into the store once it is back. The decisions (what is admitted, the 429 a
denial becomes) are policy/admission.py's."""

from __future__ import annotations

import logging
from datetime import datetime

from authz.state.limits.base import LimitStore, LimitStoreUnavailable
from authz.state.limits.memory import MemoryLimitStore
from policy.admission import Settled, refusal, settled, tracked
from policy.config import OnStoreError
from policy.errors import ApiError, service_unavailable
from policy.limits import Ask, Decision, Limits

log = logging.getLogger("tokenbooth.limits")


class Admission:
    """Admits against the shared store; in an outage, per the config's policy, either
    refuses fast (503) or admits under a local per-replica limiter."""

    def __init__(self, store: LimitStore, on_error: OnStoreError | None = None) -> None:
        self._store = store
        self._on_error = on_error or OnStoreError()
        self._local = MemoryLimitStore()
        self._local_ids: set[str] = set()  # admitted locally: settle locally too
        # Usage admitted locally, to count into the shared store once it answers again.
        self._unsynced: list[tuple[Limits, str, int, int]] = []

    def _may_fail_open(self, limits: Limits) -> bool:
        pol = self._on_error
        return limits.budget_nano is None and all(
            policy == "fail_open" for value, policy in (
                (limits.rpm, pol.requests),
                (limits.tpm, pol.tokens),
                (limits.max_concurrent, pol.concurrency),
            ) if value is not None
        )

    async def admit_all(self, org: tuple[Limits, Ask] | None, limits: Limits, ask: Ask,
                        now: datetime) -> Decision:
        """The org's limits first, then the key's; if the key refuses, the org's hold is
        given back (its request-rate slot stays spent: a request did arrive)."""
        if org is not None:
            await self.admit(*org, now)
        try:
            return await self.admit(limits, ask, now)
        except ApiError:
            if org is not None:
                await self.settle(*org, 0, 0, now)
            raise

    async def admit(self, limits: Limits, ask: Ask, now: datetime) -> Decision:
        """A Decision that allowed the request, or an ApiError (429, or 503 failing closed)."""
        if not limits.any:
            return Decision(True)
        try:
            decision = await self._store.admit(limits, ask, now.timestamp())
            if self._unsynced:
                await self._reconcile(now)
        except LimitStoreUnavailable as e:
            if not self._may_fail_open(limits):
                log.error("admission failed closed: %s", e,
                          extra={"request_id": ask.request_id})
                raise service_unavailable(
                    "Rate limits cannot be checked right now; retry shortly."
                ) from None
            log.warning("limit store unavailable, admitting under the local limiter: %s", e,
                        extra={"request_id": ask.request_id})
            decision = await self._local.admit(limits, ask, now.timestamp())
            if decision.allowed:
                self._local_ids.add(ask.request_id)
        if decision.allowed:
            return decision
        raise refusal(decision, limits, now)

    async def _reconcile(self, now: datetime) -> None:
        """The store is back: count what the local limiter admitted meanwhile."""
        pending, self._unsynced = self._unsynced, []
        merged: dict[tuple[str, Limits], list[int]] = {}
        for limits, key_id, n, tokens in pending:
            acc = merged.setdefault((key_id, limits), [0, 0])
            acc[0] += n
            acc[1] += tokens
        for i, ((key_id, limits), (n, tokens)) in enumerate(merged.items()):
            try:
                await self._store.consume(limits, key_id, n, tokens, now.timestamp())
            except LimitStoreUnavailable:
                rest = list(merged.items())[i:]
                self._unsynced += [(lim, kid, nn, tt) for (kid, lim), (nn, tt) in rest]
                return
        log.info("reconciled usage admitted during the limit store outage",
                 extra={"keys": len(merged)})

    async def settle(self, limits: Limits, ask: Ask, used_tokens: int, cost_nano: int,
                     now: datetime) -> Settled:
        """Settle `ask` with its real usage. The result says whether a live hold was
        charged and by how much the usage passed the hold; a cost overrun (the hold was
        not the worst case) is logged as a bound violation."""
        result = await self._settle(limits, ask, used_tokens, cost_nano, now)
        if result.bound_violated:
            log.warning("hold bound violated", extra={
                "request_id": ask.request_id, "key_id": ask.key_id,
                "overrun_nano": result.overrun_nano, "overrun_tokens": result.overrun_tokens,
                "applied": result.applied})
        return result

    async def _settle(self, limits: Limits, ask: Ask, used_tokens: int, cost_nano: int,
                      now: datetime) -> Settled:
        if ask.request_id in self._local_ids:
            self._local_ids.discard(ask.request_id)
            done = await self._local.settle(limits, ask, used_tokens, cost_nano,
                                            now.timestamp())
            if len(self._unsynced) < MAX_UNSYNCED:
                self._unsynced.append((limits, ask.key_id, 1, used_tokens))
            return done
        if not tracked(limits):  # nothing held in the store: no round trip
            return settled(ask, used_tokens, cost_nano, applied=False)
        try:
            return await self._store.settle(limits, ask, used_tokens, cost_nano,
                                            now.timestamp())
        except LimitStoreUnavailable as e:
            # The reservation expires with its lease; the usage record is still written.
            log.error("settlement failed: %s", e, extra={"request_id": ask.request_id})
            return settled(ask, used_tokens, cost_nano, applied=False)


MAX_UNSYNCED = 100_000  # bounded: an outage must not grow memory without end
