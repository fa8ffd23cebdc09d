"""The limit-store protocol. Every store performs policy/admission.py's transitions
atomically, on state it keeps (memory: dictionaries; Redis: keys and Lua)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from policy.admission import Settled
from policy.limits import Ask, Decision, Limits


class LimitStoreUnavailable(Exception):
    """The store could not answer within its time limit."""


class LimitStoreRefused(LimitStoreUnavailable):
    """The store answered with an error (a Redis error reply: a script's error, OOM,
    WRONGTYPE): asking again the same way is no better than waiting for it to answer."""


class LimitStoreUnwritable(LimitStoreUnavailable):
    """The store refused before changing anything: what it would hold could not be made
    durable (the embedded state's journal on a full disk). Nothing to release."""


class LimitStoreNotDurable(LimitStoreUnwritable):
    """The embedded state cannot make anything durable (its disk is full: the journal, or
    usage records waiting in memory): no request is admitted, with limits or without (one
    admitted unheld could end, or its process die, with no record on disk)."""


@runtime_checkable
class LimitStore(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def admit(self, limits: Limits, ask: Ask, now: float, take: bool = True
                    ) -> Decision:
        """`policy.admission.admit` as one atomic step: check every limit of the key and,
        only if all pass, reserve for all of them. Checks in this order, reporting the
        first that fails: a duplicate request_id still held, requests (GCRA,
        `limits.rpm`), concurrency (live leases < `max_concurrent`), tokens (bucket of
        `tpm` must hold `ask.tokens`; `tokens_too_large` if ask.tokens > tpm), budget
        (spent + reserved + ask.cost_nano <= budget_nano in `ask.period`). A denial
        changes nothing. The Decision always carries the header material
        (limit/remaining/reset for requests and tokens) for the limits that are set.
        `take=False`: the Decision only, nothing reserved (what `take=True` would decide
        now). Raises LimitStoreUnavailable."""

    async def settle(self, limits: Limits, ask: Ask, used_tokens: int, cost_nano: int,
                     now: float) -> Settled:
        """`policy.admission.settle`: end of the request. Releases its lease and hold and
        charges the real `cost_nano` (past the hold too: the overrun is reported in the
        result); while the hold is live, gives back unused tokens. A hold already
        charged as lost (its lease ended) is corrected to the real cost. Idempotent by
        ask.request_id (a second call, or one for a request never held, is a no-op).
        Raises LimitStoreUnavailable."""

    async def release(self, limits: Limits, ask: Ask, admitted: float, now: float
                      ) -> Settled:
        """Undo an admission sent at `admitted` whose answer never came (it may or may
        not have held): settle at zero the hold that admission made, if it made one, and
        never another under the same request id (the client's retry after its 503,
        admitted since: it would go unbilled). Raises LimitStoreUnavailable."""

    async def sweep(self, now: float) -> list[Ask]:
        """`policy.admission.sweep` for every key: claim the holds whose lease ended by
        `now` unsettled (lost), charging each in full (`Ledger.expire`). Each is returned
        once, to one caller across every replica sharing the store, which writes its
        `lost` usage record. Raises LimitStoreUnavailable."""

    async def consume(self, limits: Limits, key_id: str, requests: int, tokens: int,
                      now: float, batch_id: str = "") -> None:
        """`policy.admission.consume`: count usage admitted elsewhere (by a local limiter
        while this store was away): `requests` arrivals against the GCRA and `tokens` out
        of the bucket, which may go below zero. Never refuses. A `batch_id` counted once
        already (a repeat of a try that got no answer) changes nothing. Raises
        LimitStoreUnavailable."""

    async def budget(self, key_id: str, org: str, period: str, now: float) -> tuple[int, int]:
        """(spent, reserved) nano-USD of a key in a period (expired reservations dropped)."""

    def admitted_under(self, ask: Ask) -> str | None:
        """What the store must know to settle `ask` in another process (a replica
        restarted with its settlement spooled): Redis' data mark at its admission, which
        tells a hold Redis lost from a repeat. None where nothing is needed."""

    def admitted_under_was(self, ask: Ask, mark: str) -> None:
        """Take back what `admitted_under` gave, before a spooled settlement is applied."""
