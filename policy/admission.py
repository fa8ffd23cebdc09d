"""Admission: what a key's limits admit, what they hold, and what settlement charges.

The state is plain data, kept by a store: `KeyState` per key (the GCRA bucket, the TPM
bucket, the unsettled holds and concurrency leases) and `Ledger` per key and budget
period (spent, reserved, the budget holds, the lost charges). The transitions take that
state, the key's `Limits` and `now` (the clock is always an argument) and do no I/O:

- `admit`: checks duplicate request_id, then requests (GCRA), concurrency, tokens and
  budget; the first that fails is the Decision's reason and changes nothing. If all
  pass, one step takes the GCRA slot, the tokens, a lease and a budget hold.
- `settle`: releases the hold and charges the real cost to the ledger (past the hold
  too); while the hold is live it gives back unused tokens. After a lost charge it
  corrects it to the real cost. Returns `Settled`, with any overrun past the hold.
- `consume`: counts usage admitted elsewhere (a local limiter during an outage).
- Lost holds: a hold whose lease ends unsettled (its replica died, most likely; Envoy
  served the tokens all the same) is charged in full. `expire` frees its concurrency
  slot; `Ledger.expire` moves its cost from reserved to spent and remembers the charge
  for LOST_TTL_S, so a late settlement can correct it exactly once; `sweep` claims it,
  once, for its `lost` usage record (`lost_record`).

The memory store calls these on its dictionaries; the Redis store's Lua performs the
same steps (each block names its function here) and one contract suite holds the two
to identical results. Org limits (`org_hold`) and the 429 a denial becomes (`refusal`)
are decisions too, so they live here.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from policy.bounds import MAX_EXACT
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
    gcra,
    nano_to_usd,
)
from policy.quota import ORG_KEY_PREFIX
from policy.usage import LOST, UsageRecord

# How long a lost charge stays correctable by a late settlement (after its lease ended).
LOST_TTL_S = 7 * 86400.0


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


def tracked(limits: Limits) -> bool:
    """Whether an admitted request holds something until it settles (only RPM does not)."""
    return (limits.tpm is not None or limits.max_concurrent is not None
            or limits.budget_nano is not None)


# The concurrency limit of a hold whose limits hold nothing (held_limits): never reached.
RECORD_HOLD_CONCURRENCY = MAX_EXACT


def held_limits(limits: Limits, ask: Ask) -> Limits:
    """The limits a request is held under. Every admitted request keeps a lease on its
    key, and on its org where the org has limits, whatever those limits hold: a
    concurrency limit set while it is in flight counts it at once, and a replica dying
    with it in flight leaves the lease for the sweep (its `lost` record, and a restart
    of the embedded store, its charge). Limits that hold nothing (none, or a request
    rate only) get an unreachable concurrency limit for that lease."""
    if tracked(limits) or (ask.key_id.startswith(ORG_KEY_PREFIX) and not limits.any):
        return limits
    return replace(limits, max_concurrent=RECORD_HOLD_CONCURRENCY)


# -- liveness ---------------------------------------------------------------------------


def hold_live(exp: float, now: float) -> bool:
    """A hold (lease, tokens, budget hold) counts while `now < exp`, exp = admitted + lease."""
    return now < exp


def settle_charges(exp: float, now: float) -> bool:
    """Whether a settlement gives back the tokens its request did not use: only while
    its hold is live. Money is charged either way: a hold whose lease ended was charged
    in full (lost), and its late settlement corrects that to the real cost."""
    return hold_live(exp, now)


# -- state ------------------------------------------------------------------------------

V = TypeVar("V")


def _pop_expired(heap: list[tuple[float, str]], live: dict[str, V], now: float,
                 exp_of: Callable[[V], float]) -> list[str]:
    """Pop the ids whose expiry has passed, O(log n) each. Lazy deletion: a heap entry
    whose id was settled, or re-admitted with another expiry, is skipped."""
    out = []
    while heap and not hold_live(heap[0][0], now):
        exp, rid = heapq.heappop(heap)
        if rid in live and exp_of(live[rid]) == exp:
            out.append(rid)
    if len(heap) > 4 * len(live) + 64:  # settled entries pile up: compact, amortised O(1)
        heap[:] = [(e, r) for e, r in heap if r in live and exp_of(live[r]) == e]
        heapq.heapify(heap)
    return out


@dataclass(slots=True)
class Hold:
    """What an admitted, unsettled request holds of its key."""

    tokens: int | None  # taken from the TPM bucket; None when the key had no tpm
    exp: float  # lease expiry
    ask: Ask  # the request as admitted (its period, cost, and lost-record material)


@dataclass(slots=True)
class KeyState:
    """One key's limit state (a store keeps one per key_id)."""

    # The request-rate bucket (GCRA's bucket form): requests left at `rts` (None: full).
    requests: float | None = None
    rts: float = 0.0
    level: float | None = None  # TPM bucket content at `ts` (None: full)
    ts: float = 0.0
    holds: dict[str, Hold] = field(default_factory=dict)  # request_id -> live hold
    leased: set[str] = field(default_factory=set)  # live holds: each takes a concurrency slot
    heap: list[tuple[float, str]] = field(default_factory=list)  # (exp, request_id)
    # Holds whose lease ended unsettled: no slot, tokens stay taken; until `sweep`
    # claims them (lost) or a late settlement, the request_id is still held.
    ended: dict[str, Hold] = field(default_factory=dict)
    # Holds the sweep claimed (charged in full, a `lost` record written): request_id ->
    # lease end, kept LOST_TTL_S so that a late settlement says it corrected one, budget
    # or not (the metrics then leave its real record uncounted: the lost one was).
    claimed: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class Ledger:
    """One key's budget in one period (a store keeps one per (key_id, period))."""

    spent: int = 0  # nano-USD charged: settlements (past the budget by an overrun) and lost holds
    reserved: int = 0  # always the sum of the live holds' costs
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)  # rid -> (cost, exp)
    heap: list[tuple[float, str]] = field(default_factory=list)
    # Holds charged in full when their lease ended, until a late settlement corrects
    # them or LOST_TTL_S passes: rid -> (cost, exp).
    lost: dict[str, tuple[int, float]] = field(default_factory=dict)
    lost_heap: list[tuple[float, str]] = field(default_factory=list)

    def expire(self, now: float) -> None:
        """Charge the holds whose lease ended in full (lost), and forget lost charges
        older than LOST_TTL_S."""
        for rid in _pop_expired(self.heap, self.holds, now, lambda h: h[1]):
            cost, exp = self.holds.pop(rid)
            self.reserved -= cost
            self.spent += cost
            self.lost[rid] = (cost, exp)
            heapq.heappush(self.lost_heap, (exp, rid))
        for rid in _pop_expired(self.lost_heap, self.lost, now - LOST_TTL_S, lambda h: h[1]):
            del self.lost[rid]

    def balance(self, now: float) -> tuple[int, int]:
        """(spent, reserved) at `now`."""
        self.expire(now)
        return self.spent, self.reserved

    def charge(self, request_id: str, cost_nano: int) -> int:
        """Settle the request's budget hold at `cost_nano`: 1 if it was held, 2 if it had
        been charged as lost (corrected to the real cost), 0 if neither (unknown,
        already settled)."""
        held = self.holds.pop(request_id, None)
        if held is not None:
            self.reserved -= held[0]
            self.spent += cost_nano
            return 1
        lost = self.lost.pop(request_id, None)
        if lost is not None:
            self.spent += cost_nano - lost[0]
            return 2
        return 0


def expire(key: KeyState, now: float) -> None:
    """Holds whose lease ended free their concurrency slot and wait in `ended`."""
    for rid in _pop_expired(key.heap, key.holds, now, lambda h: h.exp):
        key.ended[rid] = key.holds.pop(rid)
        key.leased.discard(rid)


def sweep(key: KeyState, now: float) -> list[Hold]:
    """Claim the key's holds whose lease ended unsettled by `now`: lost. Each is returned
    once; the store then expires its ledger (which charges it) and writes its record. A
    hold an admission with a later clock saw end waits for a sweep whose `now` is past
    its lease too (a clock stepped back; Redis decides by the caller's `now` alike)."""
    expire(key, now)
    lost = [h for h in key.ended.values() if not hold_live(h.exp, now)]
    for h in lost:
        del key.ended[h.ask.request_id]
        key.claimed[h.ask.request_id] = h.exp
    # Claims past correction are forgotten here (lost holds are rare: a scan is cheap).
    for rid in [r for r, exp in key.claimed.items() if exp <= now - LOST_TTL_S]:
        del key.claimed[rid]
    return lost


def held(key: KeyState, request_id: str) -> bool:
    """Whether the request still holds something (live, or ended and not yet claimed)."""
    return request_id in key.holds or request_id in key.ended


def bucket_now(key: KeyState, capacity: int, now: float, window_s: float) -> float:
    """The key's TPM bucket content at `now` (a bucket never used is full)."""
    if key.level is None:
        return float(capacity)
    return bucket_level(key.level, key.ts, now, capacity, window_s)


def requests_now(key: KeyState, rpm: int, now: float, window_s: float) -> float:
    """The requests the key's rate bucket holds at `now` (a bucket never used is full)."""
    if key.requests is None:
        return float(rpm)
    return bucket_level(key.requests, key.rts, now, rpm, window_s)


def requests_save(key: KeyState, level: float, now: float) -> None:
    """Store the rate bucket's new content; its time never goes back (as bucket_save)."""
    key.requests, key.rts = level, max(key.rts, now)


def bucket_save(key: KeyState, level: float, now: float) -> None:
    """Store the bucket's new content. Its time never goes back: a `now` older than the
    bucket's (a request admitted at its start after later ones, a replica whose clock is
    behind, a clock stepped back) was refilled to nothing, and moving the time back would
    refill the interval since then a second time."""
    key.level, key.ts = level, max(key.ts, now)


# -- admission --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """The checks' outcome, before anything is taken."""

    reason: str  # "" when every check passed
    retry_after_s: float | None
    gcra: GcraResult | None  # None without an rpm limit
    requests: float  # the rate bucket before this request (0 without an rpm limit)
    level: float  # the bucket before this request (0 without a tpm limit)
    after: float  # the bucket if it is admitted
    # How far each bucket's time is ahead of `now` (`ahead`): waits and resets start there.
    ahead_r: float = 0.0
    ahead_t: float = 0.0


def ahead(ts: float, now: float) -> float:
    """How far a bucket's time is ahead of `now` (a clock stepped back, a replica whose
    clock is behind, a request admitted at its start after later ones): the bucket
    refills nothing until `now` reaches it, so a wait, and a reset, starts there (time
    tester: a clock set back an hour kept a key refused, its 429s saying retry in 20 s)."""
    return max(0.0, ts - now)


def _check_tokens(limits: Limits, ask: Ask, key: KeyState, now: float,
                  w: float) -> tuple[float, float, str, float | None]:
    """(level, level after taking, failure reason or "", retry_after_s) for the bucket."""
    if limits.tpm is None:
        return 0.0, 0.0, "", None
    cap = limits.tpm
    level = bucket_now(key, cap, now, w)
    if ask.tokens > cap:
        return level, level, "tokens_too_large", None
    ok, after, wait = bucket_take(level, ask.tokens, cap, w)
    return level, after, "" if ok else "tokens", None if ok else wait + ahead(key.ts, now)


def check(limits: Limits, ask: Ask, key: KeyState, ledger: Ledger | None, now: float,
          w: float = WINDOW_S) -> Verdict:
    """Every check, in order; the first failure is the reason. Reads only (the ledger's
    expired holds are dropped, which nothing can observe)."""
    duplicate = tracked(limits) and held(key, ask.request_id)
    reason, retry = ("duplicate" if duplicate else ""), None
    g, requests = None, 0.0
    if limits.rpm is not None:
        requests = requests_now(key, limits.rpm, now, w)
        g = gcra(requests, limits.rpm, w)
        if not g.allowed and not reason:
            reason, retry = "requests", g.retry_after_s + ahead(key.rts, now)
    if (not reason and limits.max_concurrent is not None
            and len(key.leased) >= limits.max_concurrent):
        reason = "concurrency"
    level, after, why, wait = _check_tokens(limits, ask, key, now, w)
    if why == "tokens_too_large" and reason != "duplicate":
        # Never admissible: said first, so a client is not told to retry (after the
        # request rate's wait, say) a request it must change (streams tester).
        reason, retry = why, None
    elif why and not reason:
        reason, retry = why, wait
    elif why and reason == "requests" and retry is not None and wait is not None:
        # Both rates spent: the request rate is the reason, and the wait the longer one
        # (a client retrying after the request rate's alone was refused again: tester).
        retry = max(retry, wait)
    if not reason and limits.budget_nano is not None and ledger is not None:
        ledger.expire(now)
        if not budget_admits(ledger.spent, ledger.reserved, ask.cost_nano, limits.budget_nano):
            # "budget_held": it would fit in what is unspent, once requests in flight end.
            reason = ("budget_held" if budget_admits(ledger.spent, 0, ask.cost_nano,
                                                     limits.budget_nano) else "budget")
    return Verdict(reason, retry, g, requests, level, after, ahead(key.rts, now),
                   ahead(key.ts, now))


def decision(limits: Limits, v: Verdict, w: float = WINDOW_S) -> Decision:
    """The Decision and its header material: the state after it (a denial took nothing)."""
    allowed = not v.reason
    rem_r: int | None = None
    reset_r = 0.0
    g = v.gcra
    if limits.rpm is not None and g is not None:
        if not g.allowed:
            rem_r, reset_r = 0, g.reset_s + v.ahead_r
        elif allowed:
            rem_r, reset_r = g.remaining, g.reset_s + v.ahead_r
        else:  # admissible by GCRA but denied by a later check: nothing was taken
            rem_r = min(math.floor(v.requests), limits.rpm)
            reset_r = max(0.0, (limits.rpm - v.requests) * w / limits.rpm) + v.ahead_r
    rem_t: int | None = None
    reset_t = 0.0
    if limits.tpm is not None:
        level = v.after if allowed else v.level
        rem_t, reset_t = math.floor(level), bucket_reset_s(level, limits.tpm, w) + v.ahead_t
    return Decision(allowed, v.reason, v.retry_after_s, limits.rpm, rem_r, reset_r,
                    limits.tpm, rem_t, reset_t)


def reserve(limits: Limits, ask: Ask, key: KeyState, ledger: Ledger | None, v: Verdict,
            now: float) -> None:
    """Take what an admitted request holds, for every limit the key has."""
    exp, rid = now + ask.lease_s, ask.request_id
    if v.gcra is not None:
        requests_save(key, v.gcra.level, now)
    if limits.tpm is not None:
        bucket_save(key, v.after, now)
    if tracked(limits):  # a lease whatever its limits: a concurrency limit set while it
        key.leased.add(rid)  # is in flight (keys update) counts it at once
    if limits.budget_nano is not None and ledger is not None:
        ledger.reserved += ask.cost_nano
        ledger.holds[rid] = (ask.cost_nano, exp)
        heapq.heappush(ledger.heap, (exp, rid))
    if tracked(limits):
        key.holds[rid] = Hold(ask.tokens if limits.tpm is not None else None, exp, ask)
        heapq.heappush(key.heap, (exp, rid))


def retake(limits: Limits, ask: Ask, key: KeyState, ledger: Ledger | None, now: float,
           w: float = WINDOW_S) -> None:
    """Take what an admission known to have been allowed took (a journal line, replayed),
    whatever the checks decide now: a release whose checks differ (a lease for every
    hold, the request rate's form) or a state they see otherwise must not drop it, and
    its hold with it. The same state as `admit` where that admits; where it would not,
    the request-rate and token buckets may go below zero (they owe it, as `consume`)."""
    check_ask(limits, ask)
    expire(key, now)
    if tracked(limits) and held(key, ask.request_id):
        return  # taken already (the line applied twice)
    v = check(limits, ask, key, ledger, now, w)
    if v.reason:
        g = None
        if limits.rpm is not None:
            left = requests_now(key, limits.rpm, now, w) - 1
            g = GcraResult(True, left, 0, 0.0, 0.0)
        after = (bucket_now(key, limits.tpm, now, w) - ask.tokens
                 if limits.tpm is not None else 0.0)
        if ledger is not None:
            ledger.expire(now)
        v = Verdict("", None, g, 0.0, 0.0, after)
    reserve(limits, ask, key, ledger, v, now)


def admit(limits: Limits, ask: Ask, key: KeyState, ledger: Ledger | None, now: float,
          w: float = WINDOW_S, take: bool = True) -> Decision:
    """Check every limit and, only if all pass, reserve for all of them. `ledger` is the
    key's ledger for `ask.period` (None when the key has no budget). `take=False`: the
    Decision alone, nothing reserved (would the key admit it?)."""
    check_ask(limits, ask)
    expire(key, now)
    v = check(limits, ask, key, ledger, now, w)
    d = decision(limits, v, w)
    if d.allowed and take:
        reserve(limits, ask, key, ledger, v, now)
    return d


# -- settlement -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settled:
    """What a settlement did, and how the real usage compares with the request's hold.

    `applied`: this call settled the request (False for a repeat or an unknown request).
    `corrected`: its hold had been charged in full as lost; this corrected the charge.
    The overruns describe the request whatever `applied` says, so count them where a
    request is settled once.
    """

    applied: bool
    overrun_nano: int = 0  # real cost past the worst case held (charged when applied)
    overrun_tokens: int = 0  # real tokens past the TPM reservation (a typical estimate)
    corrected: bool = False

    @property
    def bound_violated(self) -> bool:
        """The cost held at admission was not the worst case after all."""
        return self.overrun_nano > 0


def settled(ask: Ask, used_tokens: int, cost_nano: int, *, applied: bool,
            corrected: bool = False) -> Settled:
    """A settlement's result for `ask` and its real usage."""
    return Settled(applied, max(0, cost_nano - ask.cost_nano),
                   max(0, used_tokens - ask.tokens), corrected)


def settle(limits: Limits, ask: Ask, used_tokens: int, cost_nano: int, key: KeyState | None,
           ledger: Ledger | None, now: float, w: float = WINDOW_S) -> Settled:
    """End of the request: release its hold and lease and charge the real cost (even
    past the hold); while the hold is live, give back the tokens it did not use (or take
    the overrun). A hold charged as lost is corrected to the real cost. Idempotent by
    request_id: a second call, or one for an unknown id, changes nothing."""
    check_usage(used_tokens, cost_nano)
    rid = ask.request_id
    hold, claimed = None, False
    if key is not None:
        hold = key.holds.pop(rid, None) or key.ended.pop(rid, None)
        key.leased.discard(rid)
        # A claim is correctable as long as a ledger's lost charge is (Ledger.expire).
        claimed = key.claimed.pop(rid, now - LOST_TTL_S) > now - LOST_TTL_S
    charged = ledger.charge(rid, cost_nano) if ledger is not None else 0
    if (key is not None and hold is not None and settle_charges(hold.exp, now)
            and hold.tokens is not None and limits.tpm is not None):
        give_back(key, hold.tokens, used_tokens, limits.tpm, now, w)
    return settled(ask, used_tokens, cost_nano,
                   applied=hold is not None or charged > 0 or claimed,
                   corrected=charged == 2 or claimed)


def give_back(key: KeyState, reserved: int, used: int, capacity: int, now: float,
              w: float = WINDOW_S) -> None:
    """A live reservation settles: the tokens it did not use come back, added to the
    bucket as it was stored, its time unchanged, so the next admission refills it at the
    tpm then in force. `capacity` is the tpm at admission: reading the bucket through it
    would clamp it there, undoing a tpm raised meanwhile (keys update). An overrun is
    taken from the bucket as it is now, refilled and at most full (never from tokens
    past full that the refill never gave)."""
    if reserved >= used:
        if key.level is not None:  # None: full, nothing to give back to
            key.level += reserved - used
        return
    level = bucket_now(key, capacity, now, w)
    bucket_save(key, bucket_refund(level, reserved, used, capacity), now)


def lost_record(ask: Ask) -> UsageRecord | None:
    """The usage record of a hold charged as lost: its full hold, `estimated`, status
    LOST. None when the hold carries no record material (`Ask.record`)."""
    rec = ask.record
    if rec is None:
        return None
    return UsageRecord(
        request_id=ask.request_id, key_id=rec.key_id or ask.key_id, org=ask.org,
        model=rec.model, upstream_model=rec.upstream_model, backend="",
        prompt_tokens=rec.prompt_tokens, completion_tokens=rec.completion_tokens,
        total_tokens=rec.prompt_tokens + rec.completion_tokens,
        cost_usd=format(nano_to_usd(ask.cost_nano).normalize(), "f"), status=LOST,
        stream=rec.stream, estimated=True, started_at=rec.started_at,
        duration_ms=ask.lease_s * 1000, endpoint=rec.endpoint,
        key_budget_period=rec.key_budget_period, org_budget_period=rec.org_budget_period,
        prompt_bound=rec.prompt_tokens, completion_bound=rec.completion_tokens,
    )


def consume(limits: Limits, key: KeyState, requests: int, tokens: int, now: float,
            w: float = WINDOW_S) -> None:
    """Count usage admitted elsewhere: `requests` arrivals against the GCRA and `tokens`
    out of the bucket, which may go below zero (it owes them). Never refuses."""
    if limits.rpm is not None and requests > 0:
        requests_save(key, requests_now(key, limits.rpm, now, w) - requests, now)
    if limits.tpm is not None and tokens > 0:
        bucket_save(key, bucket_now(key, limits.tpm, now, w) - tokens, now)
