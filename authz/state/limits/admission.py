"""The outage policy around the limit store: admit and settle against it and, when it
cannot answer, fail closed (503) or admit under a local per-replica limiter whose usage
is counted into the store once it is back. A settlement the store cannot take waits in
an on-disk spool (settle_spool.py) and is applied once it answers. In the background
(`start`), spooled settlements are replayed and the store is swept for lost holds, each
of which gets its `lost` usage record. The decisions (what is admitted, the 429 a denial
becomes, what a lost hold costs) are policy/admission.py's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from authz.state.limits.base import (
    LimitStore,
    LimitStoreNotDurable,
    LimitStoreRefused,
    LimitStoreUnavailable,
    LimitStoreUnwritable,
)
from authz.state.limits.memory import MemoryLimitStore
from authz.state.limits.settle_spool import SettleSpool, Spooled
from authz.state.repeats import REPEATS
from authz.state.tasks import cancel_and_wait
from policy.admission import Settled, held_limits, lost_record, settled, tracked
from policy.config import OnStoreError
from policy.errors import ApiError, service_unavailable
from policy.limits import WINDOW_S, Ask, Decision, Limits, tightest
from policy.quota import ORG_KEY_PREFIX, exhausted, refusal, untaken
from policy.usage import UsageRecord

log = logging.getLogger("tokenbooth.limits")

SWEEP_S = 1.0  # how often the background task sweeps and retries the spool
WAKE_MIN_S = 0.25  # the soonest an admission wakes it again (a spool that cannot drain)
MAX_REFUSED = 10  # error answers to one key's outage count before it is dropped


@dataclass(slots=True)
class _Unsynced:
    """A key's usage admitted by the local limiter, not yet counted in the store: the
    batch sent and not confirmed (id, requests, tokens), and what came after it. All its
    batches together count at most a window of the key's rates."""

    limits: Limits
    requests: int = 0
    tokens: int = 0
    batch: tuple[str, int, int] | None = None
    refused: int = 0
    counted: tuple[int, int] = (0, 0)  # what earlier batches counted (at most a window)


class Admission:
    """Admits against the shared store; in an outage, per the config's policy, either
    refuses fast (503) or admits under a local per-replica limiter.

    `spool_dir`: where settlements wait while the store is away (None: they are only
    logged, and their holds are charged in full when the lease ends). `on_lost`:
    receives the usage record of each lost hold this replica claims. `on_hold(ask,
    admitted)`: a request was admitted (True) or is settling (False; once per settle
    call). `on_store(ok)`: a call to the store failed as unavailable (False: each
    admission, settlement and sweep that did), or answered after one had (True; the
    sweep's every second). `on_exhausted(owner, org, period)`: a budget refused a
    request because too little is left (`quota.exhausted`; the owner a key id or
    `org:<name>`, the period's id), for the budget alerts. `clock`: epoch
    seconds, for the background work. `on_error`: the outage policy, or where to read the
    one in force (the config's, which a reload may change mid-outage)."""

    def __init__(self, store: LimitStore,
                 on_error: OnStoreError | Callable[[], OnStoreError] | None = None, *,
                 spool_dir: Path | None = None,
                 on_lost: Callable[[UsageRecord], None] | None = None,
                 on_spooled: Callable[[], None] | None = None,
                 on_hold: Callable[[Ask, bool], None] | None = None,
                 on_store: Callable[[bool], None] | None = None,
                 on_exhausted: Callable[[str, str, str], None] | None = None,
                 clock: Callable[[], float] = time.time, sweep_s: float = SWEEP_S) -> None:
        self._store = store
        policy = on_error or OnStoreError()
        self._on_error = policy if callable(policy) else lambda: policy
        self._local = MemoryLimitStore()
        # Admitted locally: settle locally too. By (key_id, request_id): a request's org
        # hold shares its request id, and each of the two settles once.
        self._local_ids: set[tuple[str, str]] = set()
        # Keys without limits admitted unheld while the store was away: nothing to settle.
        self._unheld: set[tuple[str, str]] = set()
        # Usage admitted locally, per key, to count into the shared store once it answers
        # again: a request as it is admitted, its tokens as it settles (`_Unsynced`).
        self._unsynced: dict[str, _Unsynced] = {}
        self._counting: dict[str, asyncio.Lock] = {}  # one count of a key at a time
        self._store_ok = True  # whether the store answered the last admission
        self._probing = False  # an admission is counting a key's usage while it did not
        # What the store last said a key had used of its rates (when, requests, tokens),
        # for the local limiter to start from, not from full; and the keys it has
        # started from that since the store last answered for them.
        self._store_used: dict[str, tuple[float, int, int]] = {}
        self._seeded: set[str] = set()
        self._spool = SettleSpool(spool_dir) if spool_dir is not None else None
        self._on_lost = on_lost
        self._on_spooled = on_spooled
        self._on_hold = on_hold
        self._on_store = on_store
        self._on_exhausted = on_exhausted
        self._clock = clock
        self._sweep_s = sweep_s
        self._stop = asyncio.Event()
        # Set when the store answers while settlements wait in the spool: the background
        # task replays them at once, not at its next sweep (a stalled Redis that woke ran
        # the admissions it was sent; their slots stayed taken until the releases landed).
        self._wake = asyncio.Event()
        self._round_at = 0.0  # monotonic start of the background task's last round
        self._task: asyncio.Task[None] | None = None
        self._replaying = asyncio.Lock()  # one replay at a time: offsets only go forward
        self.lost_records = 0  # lost holds this replica claimed and recorded (a metric)

    @property
    def spooled_bytes(self) -> int:
        """Settlements waiting for the store, in bytes (a metric; 0 without a spool)."""
        return 0 if self._spool is None else self._spool.pending_bytes

    async def start(self) -> None:
        """Replay what the spool holds, then sweep and retry every `sweep_s`."""
        self._stop.clear()
        self._task = asyncio.create_task(self._maintain(), name="limits-maintenance")

    async def close(self) -> None:
        """Stop the background work; the spool keeps what is not applied yet."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), 5.0)
            await cancel_and_wait(self._task)
            self._task = None
        if self._spool is not None:
            self._spool.close()

    async def _maintain(self) -> None:
        while not self._stop.is_set():
            self._round_at = time.monotonic()
            try:
                await self.replay()
                await self.reconcile()
                await self.sweep()
            except Exception:  # the loop must outlive any one failure
                log.exception("limits maintenance failed")
            self._wake.clear()
            waits = [asyncio.ensure_future(e.wait()) for e in (self._stop, self._wake)]
            try:
                await asyncio.wait(waits, timeout=self._sweep_s,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    def _may_fail_open(self, limits: Limits) -> bool:
        pol = self._on_error()
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
        given back. A hold given back keeps its request-rate slot, so where the org has
        a request rate, the key is asked first whether it would refuse (`_refused`).
        The first hold that lands in the store carries the request's record material
        (`one_record`): a store failing between the two steps left the org's hold in
        the store without it and the key's out of it, and a replica dying then left the
        org charged in full with no record."""
        org_decision = None
        key_ask = ask
        if org is not None:
            org = one_record(org, ask)
            await self._never_fits(limits, ask, now)
            if org[0].rpm is not None:
                await self._refused(org, limits, ask, now)
            org_decision = await self._admit(*org, now)
            if not org_decision.allowed:  # with the key's rates in its headers too
                raise self._refusal(org_decision, org[0], org[1], now, org=True,
                                    other=await self._look(limits, ask, now))
            if self._in_store(*org):
                # The org's hold carries the record; the key's keeps its lease (a
                # `--max-concurrent` set meanwhile counts it), without the material.
                key_ask = replace(ask, record=None)
        try:
            decision = await self._admit(limits, key_ask, now)
            if not decision.allowed:  # with the org's rates in its headers too
                raise self._refusal(decision, limits, ask, now, other=org_decision)
        except ApiError:
            if org is not None:  # only the org hold just made (a retry's stays its own)
                await self.settle(*org, 0, 0, now, admitted=now.timestamp())
            raise
        if self._on_hold is not None:
            self._on_hold(ask, True)
        # The rate-limit headers show the limit the client meets first, key's or org's.
        return decision if org_decision is None else tightest(decision, org_decision)

    def org_carries_record(self, org: tuple[Limits, Ask] | None) -> bool:
        """Whether the org's hold of an admitted request carries its record material
        (`admit_all`), so that only its correction says the sweep recorded (and counted)
        the request; the key's hold then has none. Asked before the org's hold settles."""
        return org is not None and self._in_store(*org)

    def sweep_records(self, org: tuple[Limits, Ask] | None, limits: Limits, ask: Ask) -> bool:
        """Whether the lost-hold sweep would write this admitted request's record: the
        hold carrying its material is in the store (not admitted unheld, or under the
        local limiter, while the store was away: those only this process can record)."""
        return self.org_carries_record(org) or (ask.record is not None
                                                and self._in_store(limits, ask))

    def _in_store(self, limits: Limits, ask: Ask) -> bool:
        """Whether an admitted request's hold is in the store (not unheld or admitted
        under the local limiter while it was away)."""
        rid = (ask.key_id, ask.request_id)
        return (tracked(held_limits(limits, ask)) and rid not in self._unheld
                and rid not in self._local_ids)

    async def _never_fits(self, limits: Limits, ask: Ask, now: datetime) -> None:
        """Refuse a request larger than its key's tokens per minute before its org is
        asked: it can never be admitted, and an org's retryable 429 (its request rate
        spent, its budget held) would have the client retry what it must change. Nothing
        is refused here when the store does not answer: the admission decides."""
        if limits.tpm is None or ask.tokens <= limits.tpm:
            return
        try:
            d = await self._store.admit(limits, ask, now.timestamp(), take=False)
        except LimitStoreUnavailable:
            return
        if d.reason == "tokens_too_large":
            raise self._refusal(d, limits, ask, now)

    async def _refused(self, org: tuple[Limits, Ask], limits: Limits, ask: Ask,
                       now: datetime) -> None:
        """Refuse, before the org takes anything, a request its key would refuse now (the
        org's refusal if the org would refuse too: it is checked first): its slot would
        stay spent, and a key refusing a flood of requests would use up its org's request
        rate for every other key. Only a request admitted by the key between this look
        and its admission (another replica's) still spends the org's slot. Nothing is
        refused here when the store does not answer: the admission decides."""
        if not limits.any:
            return
        try:
            d = await self._store.admit(limits, ask, now.timestamp(), take=False)
            if d.allowed:
                return
            org_limits, org_ask = org
            od = await self._store.admit(org_limits, org_ask, now.timestamp(), take=False)
        except LimitStoreUnavailable:
            return
        if not od.allowed:
            raise self._refusal(od, org_limits, org_ask, now, org=True,
                                other=untaken(d, ask.tokens))
        raise self._refusal(d, limits, ask, now, other=untaken(od, ask.tokens))

    def _refusal(self, d: Decision, limits: Limits, ask: Ask, now: datetime, *,
                 org: bool = False, other: Decision | None = None) -> ApiError:
        """The 429 for `d`; a budget it says is spent is told to the alerts."""
        if self._on_exhausted is not None and exhausted(d, limits, ask.cost_nano):
            self._on_exhausted(ask.key_id, ask.org, ask.period)
        return refusal(d, limits, now, ask.cost_nano, org=org, other=other)

    async def _look(self, limits: Limits, ask: Ask, now: datetime) -> Decision | None:
        """The key's rates now, taking nothing, for the headers of its org's 429 (None
        when it has none or the store does not answer)."""
        if limits.rpm is None and limits.tpm is None:
            return None
        try:
            d = await self._store.admit(Limits(rpm=limits.rpm, tpm=limits.tpm), ask,
                                        now.timestamp(), take=False)
        except LimitStoreUnavailable:
            return None
        return untaken(d, ask.tokens)

    async def admit(self, limits: Limits, ask: Ask, now: datetime) -> Decision:
        """A Decision that allowed the request, or an ApiError (429, or 503 failing closed)."""
        decision = await self._admit(limits, ask, now)
        if decision.allowed:
            return decision
        raise self._refusal(decision, limits, ask, now,
                            org=ask.key_id.startswith(ORG_KEY_PREFIX))

    async def _admit(self, limits: Limits, ask: Ask, now: datetime) -> Decision:
        """`admit`'s Decision, allowed or not; an ApiError only for a 503."""
        held = held_limits(limits, ask)
        if not held.any:
            return Decision(True)
        # This key's outage usage counts before the store decides: while the store is
        # known to answer, or as the one probe at a time while it did not (the others
        # go on without waiting: a stalled store made each wait its turn to time out).
        probe = (ask.key_id in self._unsynced and not self._probing
                 and not self._store_ok)
        try:
            if probe or (self._store_ok and ask.key_id in self._unsynced):
                self._probing |= probe
                try:
                    await self._count_key(ask.key_id, now)
                except LimitStoreRefused:
                    pass  # answered, with an error: left to the background task
                except LimitStoreUnavailable as e:  # nothing of this request was sent
                    raise LimitStoreUnwritable(str(e)) from e
                finally:
                    if probe:
                        self._probing = False
            decision = await self._store.admit(held, ask, now.timestamp())
            if (not decision.allowed and decision.reason in _GIVEN_BACK
                    and self._spool is not None and self._spool.pending_bytes):
                # Settlements spooled through an outage give slots, tokens and budget
                # back: apply them before refusing (faults tester: a burst of false
                # "too many in flight" 429s as Redis came back, before the replay).
                try:
                    applied = await self.replay()
                except Exception:  # the background round retries; this request is refused
                    log.exception("limits maintenance failed")
                    applied = 0
                if applied:
                    decision = await self._store.admit(held, ask, now.timestamp())
            if not self._store_ok and self._on_store is not None:
                self._on_store(True)
            self._store_ok = True
            self._remember(held, ask.key_id, decision)
            if self._spool is not None and self._spool.pending_bytes \
                    and time.monotonic() - self._round_at >= WAKE_MIN_S:
                self._wake.set()
        except LimitStoreUnavailable as e:
            self._store_ok = False
            if self._on_store is not None:  # (observability tester: only the sweep said)
                self._on_store(False)
            if not limits.any and not isinstance(e, LimitStoreNotDurable):
                # Held only for its record: admitted unheld, as a key without limits
                # always was, and nothing spooled (a stalled store that runs the
                # admission later leaves a `lost` record readers put behind the real one;
                # no money is held). The spool stays for the settlements that hold money.
                if len(self._unheld) < MAX_UNSYNCED:
                    self._unheld.add((ask.key_id, ask.request_id))
                return Decision(True)
            # Unanswered is not undone: a script sent to a stalled store runs when it
            # wakes, and its hold would be charged as lost for a request never served.
            # Only what the key's own limits hold is released (a record-only hold left
            # behind writes a `lost` record readers put behind the real one, no more).
            if not isinstance(e, LimitStoreUnwritable):  # that one changed nothing
                self._release_later(limits, ask, now.timestamp())
            if not self._may_fail_open(limits) or isinstance(e, LimitStoreNotDurable):
                # (A full disk under the embedded state: no record would be durable.)
                log.error("admission failed closed: %s", e,
                          extra={"request_id": ask.request_id, **REPEATS})
                raise service_unavailable(
                    "The limit store is unavailable, so this request cannot be admitted "
                    "now; retry shortly.", retry=True
                ) from None
            log.warning("limit store unavailable, admitting under the local limiter: %s", e,
                        extra={"request_id": ask.request_id, **REPEATS})
            if ask.key_id not in self._seeded:
                await self._seed(held, ask.key_id, now)
            decision = await self._local.admit(held, ask, now.timestamp())
            if decision.allowed:
                self._local_ids.add((ask.key_id, ask.request_id))
                self._count_later(held, ask.key_id, 1, 0)
        return decision

    def _release_later(self, limits: Limits, ask: Ask, admitted: float) -> None:
        """An admission the store did not answer may still take effect: queue its release
        behind it (in the spool, applied in order once the store answers): a settlement
        at zero of the hold admitted at `admitted` alone, if any. A plain settlement
        took the hold of the client's retry under the same id, admitted since, which
        then went unbilled (review)."""
        if not tracked(limits):
            return
        if self._spool is not None and self._spool.append(
                Spooled(limits, ask, 0, 0, admitted=admitted)):
            if self._on_spooled is not None:
                self._on_spooled()
            return
        log.error("an unanswered admission cannot be released: if the store carries it "
                  "out, its hold is charged as lost",
                  extra={"request_id": ask.request_id, **REPEATS})

    def _remember(self, limits: Limits, key_id: str, d: Decision) -> None:
        """Keep what the store says `key_id` has used of its rates (the local limiter
        starts there in an outage), and take the store's word for it again."""
        self._seeded.discard(key_id)
        if (limits.rpm is None or d.remaining_requests is None) and (
                limits.tpm is None or d.remaining_tokens is None):
            return
        used = (time.monotonic(),
                0 if limits.rpm is None or d.remaining_requests is None
                else max(0, limits.rpm - d.remaining_requests),
                0 if limits.tpm is None or d.remaining_tokens is None
                else max(0, limits.tpm - d.remaining_tokens))
        self._store_used.pop(key_id, None)  # to the end: the oldest go first
        if len(self._store_used) >= MAX_UNSYNCED:
            del self._store_used[next(iter(self._store_used))]
        self._store_used[key_id] = used

    async def _seed(self, limits: Limits, key_id: str, now: datetime) -> None:
        """The first local admission of `key_id` since the store last answered for it:
        the local limiter starts from what the store last said the key had used, less
        what has refilled since, plus what was admitted here and is not counted there
        yet; not from a full rate (two requests before the outage and a full burst in it
        made 7 of an rpm of 5), nor on top of an earlier outage's local count."""
        self._seeded.add(key_id)
        at, requests, tokens = self._store_used.pop(key_id, (0.0, 0, 0))
        refill = (time.monotonic() - at) / WINDOW_S
        requests = max(0, math.ceil(requests - refill * (limits.rpm or 0)))
        tokens = max(0, math.ceil(tokens - refill * (limits.tpm or 0)))
        u = self._unsynced.get(key_id)
        if u is not None:
            requests += u.requests + (u.batch[1] if u.batch else 0)
            tokens += u.tokens + (u.batch[2] if u.batch else 0)
        self._local.reset_rates(key_id)
        if requests or tokens:
            await self._local.consume(limits, key_id, requests, tokens, now.timestamp())

    def _count_later(self, limits: Limits, key_id: str, requests: int, tokens: int) -> None:
        u = self._unsynced.get(key_id)
        if u is None:
            if len(self._unsynced) >= MAX_UNSYNCED:
                return
            u = self._unsynced[key_id] = _Unsynced(limits)
        u.limits = limits
        u.requests += requests
        u.tokens += tokens

    async def reconcile(self, now: datetime | None = None) -> bool:
        """Count into the store what the local limiter admitted while it was away; the
        background task calls it every sweep, so a replica that took an outage's traffic
        and then none counts it all the same. Whether nothing is left to count."""
        if not self._unsynced:
            return True
        at = now or datetime.fromtimestamp(self._clock(), UTC)
        for key_id in list(self._unsynced):
            try:
                await self._count_key(key_id, at)
            except LimitStoreRefused:
                continue  # this key's count was refused: the others may still go
            except LimitStoreUnavailable:
                return False
        if not self._unsynced:
            log.info("reconciled usage admitted during the limit store outage")
            self._counting = {k: v for k, v in self._counting.items() if v.locked()}
        return not self._unsynced

    async def _count_key(self, key_id: str, now: datetime) -> None:
        """Count `key_id`'s outage usage into the store, one batch at a time. A batch is
        sent with an id, and sent again as it was until the store confirms it: a stalled
        store runs what it was sent when it wakes, and the id makes a repeat a no-op (each
        try added the whole count again). A batch holds at most a window of the key's
        rates: an outage's whole usage counted at once blocked the key as long as the
        outage had lasted. Raises LimitStoreUnavailable (LimitStoreRefused: the store
        answered with an error; after MAX_REFUSED of those the count is dropped)."""
        lock = self._counting.setdefault(key_id, asyncio.Lock())
        async with lock:
            u = self._unsynced.get(key_id)
            while u is not None:
                if u.batch is None:
                    if not (u.requests or u.tokens):
                        break
                    lim = u.limits
                    u.batch = (uuid.uuid4().hex,
                               u.requests if lim.rpm is None
                               else min(u.requests, max(0, lim.rpm - u.counted[0])),
                               u.tokens if lim.tpm is None
                               else min(u.tokens, max(0, lim.tpm - u.counted[1])))
                    u.requests = u.tokens = 0
                batch_id, n, t = u.batch
                try:
                    await self._store.consume(u.limits, key_id, n, t, now.timestamp(),
                                              batch_id)
                except LimitStoreRefused as e:
                    u.refused += 1
                    if u.refused >= MAX_REFUSED:
                        log.error("usage admitted during the outage could not be "
                                  "counted: %s", e, extra={"key_id": key_id,
                                                           "requests": n, "tokens": t})
                        u.batch, u.requests, u.tokens = None, 0, 0
                    raise
                u.counted = (u.counted[0] + n, u.counted[1] + t)
                u.batch = None
            if u is not None and u.batch is None and not (u.requests or u.tokens):
                del self._unsynced[key_id]

    async def settle(self, limits: Limits, ask: Ask, used_tokens: int, cost_nano: int,
                     now: datetime, admitted: float | None = None) -> Settled:
        """Settle `ask` with its real usage. The result says whether a live hold was
        charged and by how much the usage passed the hold; a cost overrun (the hold was
        not the worst case) is logged as a bound violation. `admitted`: a release at
        zero of the hold admitted then alone (`LimitStore.release`)."""
        if self._on_hold is not None:
            self._on_hold(ask, False)
        result = await self._settle(limits, ask, used_tokens, cost_nano, now, admitted)
        if result.corrected:
            log.info("late settlement corrected a lost hold", extra={
                "request_id": ask.request_id, "key_id": ask.key_id, "cost_nano": cost_nano})
        if result.bound_violated:
            log.warning("hold bound violated", extra={
                "request_id": ask.request_id, "key_id": ask.key_id,
                "overrun_nano": result.overrun_nano, "overrun_tokens": result.overrun_tokens,
                "applied": result.applied})
        return result

    async def _settle(self, limits: Limits, ask: Ask, used_tokens: int, cost_nano: int,
                      now: datetime, admitted: float | None = None) -> Settled:
        if (ask.key_id, ask.request_id) in self._unheld:
            self._unheld.discard((ask.key_id, ask.request_id))
            return settled(ask, used_tokens, cost_nano, applied=False)
        limits = held_limits(limits, ask)
        if (ask.key_id, ask.request_id) in self._local_ids:
            self._local_ids.discard((ask.key_id, ask.request_id))
            done = await self._local.settle(limits, ask, used_tokens, cost_nano,
                                            now.timestamp())
            self._count_later(limits, ask.key_id, 0, used_tokens)
            return done
        if not tracked(limits):  # nothing held in the store: no round trip
            return settled(ask, used_tokens, cost_nano, applied=False)
        try:
            if admitted is not None:
                return await self._store.release(limits, ask, admitted, now.timestamp())
            return await self._store.settle(limits, ask, used_tokens, cost_nano,
                                            now.timestamp())
        except LimitStoreUnavailable as e:
            if self._on_store is not None:
                self._on_store(False)
            extra = {"request_id": ask.request_id, "key_id": ask.key_id}
            if self._spool is None:
                # The hold is charged in full when its lease ends (lost).
                log.error("settlement failed: %s", e, extra=extra)
            elif self._spool.append(Spooled(limits, ask, used_tokens, cost_nano,
                                            self._store.admitted_under(ask), admitted)):
                log.warning("settlement spooled until the limit store answers: %s", e,
                            extra={**extra, **REPEATS})
                if self._on_spooled is not None:
                    self._on_spooled()
            return settled(ask, used_tokens, cost_nano, applied=False)

    # -- background -------------------------------------------------------------------

    async def replay(self) -> int:
        """Apply the spooled settlements in order until the store fails; how many were
        applied (a repeat is a no-op in the store, so one applied twice is harmless)."""
        spool, n = self._spool, 0
        if spool is None or not spool.pending_bytes:
            return 0
        async with self._replaying:
            while spool.pending_bytes and (batch := spool.read()):
                for end, s in batch:
                    if s is not None:
                        if s.mark is not None:  # spooled by this replica before a restart
                            self._store.admitted_under_was(s.ask, s.mark)
                        try:
                            done = await (
                                self._store.release(s.limits, s.ask, s.admitted,
                                                    self._clock())
                                if s.admitted is not None else
                                self._store.settle(s.limits, s.ask, s.used_tokens,
                                                   s.cost_nano, self._clock()))
                        except LimitStoreUnavailable:
                            return n
                        n += done.applied
                    spool.commit(end)
        log.info("applied spooled settlements", extra={"settlements": n})
        return n

    async def sweep(self) -> int:
        """Claim the store's lost holds (lease ended, never settled): each was charged in
        full; write each one's `lost` record. How many records were written."""
        try:
            lost = await self._store.sweep(self._clock())
        except LimitStoreUnavailable:
            if self._on_store is not None:
                self._on_store(False)
            return 0
        if self._on_store is not None:
            self._on_store(True)
        n = 0
        for ask in lost:
            rec = lost_record(ask)
            log.warning("hold lost: charged in full", extra={
                "request_id": ask.request_id, "key_id": ask.key_id,
                "cost_nano": ask.cost_nano, "recorded": rec is not None})
            if rec is None:
                continue
            n += 1
            if self._on_lost is not None:
                try:
                    self._on_lost(rec)
                except Exception:  # never silently: the log line carries every field
                    log.exception("lost record not stored", extra={"record": rec.to_dict()})
        self.lost_records += n
        return n


def one_record(org: tuple[Limits, Ask], ask: Ask) -> tuple[Limits, Ask]:
    """A request leaves one lost record, from the first of its holds that lands in the
    store: its org's, admitted first, carries the material (saying which key it was);
    its key's only when the org's did not land (`admit_all` takes it off the key's)."""
    org_limits, org_ask = org
    rec = org_ask.record
    return org_limits, replace(org_ask, record=None if rec is None
                               else replace(rec, key_id=ask.key_id))


# Refusals a settlement could lift (not a request rate, which settling never gives back).
_GIVEN_BACK = frozenset({"concurrency", "tokens", "budget_held"})
MAX_UNSYNCED = 100_000  # bounded: an outage must not grow memory without end
