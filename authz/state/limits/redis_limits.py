"""Limits shared by every replica, in Redis: one Lua script per operation
(redis_scripts.py, which describes the keys), one round trip each.

The index of holds, for the sweep: `tb:{holds}:due`, a ZSET of [key_id, period,
request_id] by lease expiry (its own slot, so every script still touches one slot).
Admission writes the entry just before its script, settlement removes it just after
its own, each pipelined in the same round trip; so every hold has one and the index
holds about the requests in flight (a denied request's entry is removed in the
background; one left behind is dropped by the sweep). `sweep` claims due entries (one
script on the index: they move a claim lease ahead, so a replica that dies mid-sweep
leaves them to the next), settles each on its key's slot (SWEEP, atomic: exactly one
caller gets the hold's Ask and writes its `lost` record), then removes them.

Exactness: `now` and every float cross as 17-significant-digit text (exact for doubles
both ways); the scripts do the pure functions' IEEE operations in the same order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import orjson
from redis.exceptions import RedisError, ResponseError

from authz.state.limits.base import (
    LimitStoreRefused,
    LimitStoreUnavailable,
    LimitStoreUnwritable,
)
from authz.state.limits.codec import ask_from, dumps
from authz.state.limits.redis_scripts import (
    ADMIT,
    BUDGET,
    CHARGE_LOST_HOLD,
    CLAIM,
    CONSUME,
    SETTLE,
    SWEEP,
)
from authz.state.resp import NotRun, NotSent, RespClient
from policy.admission import Settled, check_ask, check_usage, settled, tracked
from policy.limits import WINDOW_S, Ask, Decision, Limits
from policy.quota import ORG_KEY_PREFIX
from policy.recorded import Owes, from_seen_mark

log = logging.getLogger("tokenbooth.limits")

DUE = "tb:{holds}:due"
# A mark every replica reads back: gone or changed, Redis lost its data (restarted
# without persistence, or flushed), and with it every ledger and hold.
EPOCH = "tb:{holds}:epoch"
# Budget holds in flight whose mark is kept (beyond: their settlement after a loss of
# Redis' data charges nothing, as before).
MAX_HELD_IN = 100_000
CLAIM_S = 30.0  # a claimed index entry returns to the sweep after this, if not removed
EVICTION_CHECK_S = 60.0  # how often the sweep reads Redis' eviction policy
SWEEP_BATCH = 256  # index entries per claim
SWEEP_BATCHES = 16  # claims per sweep call, at most
OFFSET_CHECK_S = 10.0  # how often the sweep reads Redis' clock against this replica's
# An admission Redis runs later than its caller's time limit plus this is not carried
# out (ADMIT's deadline): room for the error of the clock offset's measurement.
STALE_SLACK_S = 1.0
# A TIME reply slower than this replaces an offset already measured only when that one
# came from a slower reply (under load, or at start, every reply may be slower).
OFFSET_MAX_RTT_S = 0.05
OFFSET_KEEP_S = 60.0  # a quick reply's offset is kept over slower ones this long (drift)
# An offset from Redis' clock this large or larger moves this replica's leases onto Redis'
# clock (in whole seconds): replicas minutes apart would otherwise end each other's leases
# early (a concurrency slot freed, a live stream charged as lost; time tester). Smaller
# ones are NTP's business and change no lease by anything that matters.
LEASE_SKEW_S = 1.0


def _opt(v: int | None) -> str:
    return "" if v is None else str(v)


def _member(ask: Ask) -> str:
    """A hold's entry in the index: what names its keys (settle can rebuild it)."""
    return dumps([ask.key_id, ask.period, ask.request_id]).decode()


def _lost_ask(raw: bytes) -> Ask:
    """The Ask a claimed hold was admitted with (a bare one if its JSON is damaged: the
    hold was charged all the same, only its record lacks the material)."""
    try:
        return ask_from(orjson.loads(raw))
    except ValueError:
        log.error("hold index: a lost hold's ask is damaged", extra={"ask": raw[:200]})
        return Ask("", "", "", 0, 0, "", 1.0)


class RedisLimitStore:
    """Limits in Redis shared by every replica; every call bounded by `timeout_s`."""

    def __init__(self, url: str, *, timeout_s: float = 0.25, window_s: float = WINDOW_S,
                 on_reset: Callable[[], None] | None = None,
                 seen_prefix: str | None = None) -> None:
        # No I/O here or in start(): the first call connects (and loads the scripts).
        # The lean pipelined client: admission and settlement run twice per request.
        self._redis = RespClient(url, timeout_s)
        self._window = window_s
        self._background: set[asyncio.Task[None]] = set()  # index removals in flight
        self._epoch: bytes | None = None  # the mark this replica last read
        self._on_reset = on_reset
        # The mark under which each budget hold in flight here was admitted ((owner,
        # request id) → mark): its settlement, finding nothing, tells a hold Redis lost
        # from a repeat.
        self._held_in: dict[tuple[str, str], bytes] = {}
        self._eviction_checked = -EVICTION_CHECK_S  # monotonic time of the last check
        self._timeout = timeout_s
        # Redis' clock minus this replica's (None until measured), and when measured.
        self._offset: float | None = None
        self._offset_error = 0.0  # at most this far off: half the TIME round trip
        self._offset_at = 0.0  # when it was measured (monotonic)
        self._offset_checked = -OFFSET_CHECK_S
        # What this replica adds to its `now` for the lease clock (whole seconds, 0 for an
        # offset below LEASE_SKEW_S): see redis_scripts.py.
        self._lease_shift = 0.0
        # This replica's wall clock less its monotonic one when the offset was measured:
        # a change means the wall clock stepped (NTP, a VM resumed) since.
        self._wall_less_mono = 0.0
        self._evicting = ""  # the evicting policy last logged ("" none)
        # The usage records' seen keys (redis_sink.py): the sweep reads what a request
        # whose record reached Redis owes (None: it does not look).
        self._seen = seen_prefix
        self.settled_from_records = 0  # lost holds the sweep settled from their records

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._redis.aclose()

    @staticmethod
    def _ns(key_id: str) -> str:
        return f"tb:{{k:{key_id}}}:"

    def _hold_keys(self, key_id: str, period: str, request_id: str) -> list[str]:
        """conc, res, budget, resv, lost: what one hold touches."""
        ns = self._ns(key_id)
        return [ns + "conc", ns + "res:" + request_id, ns + "budget:" + period,
                ns + "resv:" + period, ns + "lost:" + period]

    def _lease_now(self, now: float) -> float:
        """`now` on the lease clock: Redis' clock, read through this replica's."""
        return float(now) + self._lease_shift

    async def admit(self, limits: Limits, ask: Ask, now: float, take: bool = True
                    ) -> Decision:
        check_ask(limits, ask)
        try:
            await self._clock_checked()
        except LimitStoreUnavailable as e:  # (nothing of this admission was sent yet)
            raise LimitStoreUnwritable(str(e)) from None
        ns = self._ns(ask.key_id)
        lnow = self._lease_now(now)
        conc, res, budget, resv, lost = self._hold_keys(ask.key_id, ask.period,
                                                        ask.request_id)
        keys = [ns + "rpm", ns + "tpm", conc, res, budget, resv, lost, ns + "gcra"]
        held = tracked(limits)
        args = [repr(float(now)), ask.request_id, _opt(limits.rpm), _opt(limits.tpm),
                _opt(limits.max_concurrent), _opt(limits.budget_nano), str(ask.tokens),
                str(ask.cost_nano), repr(float(ask.lease_s)), repr(float(self._window)),
                ask.period, dumps(ask).decode() if held and take else "",
                "1" if take else "0", self._deadline() if take else "", repr(lnow)]
        if not held or not take:  # holds nothing (or only decides): nothing to index
            out = await self._call(self._redis.evalsha(ADMIT, keys, args))
        else:
            member = _member(ask)
            exp = repr(lnow + float(ask.lease_s))  # the script's exp, bit for bit
            # NX: a duplicate leaves the entry of the request it duplicates as it was.
            # Indexed first, in the same write: a hold is never unknown to the sweep.
            calls = [("ZADD", DUE, "NX", exp, member),
                     self._redis.script_call(ADMIT, keys, args)]
            budget_held = limits.budget_nano is not None
            if budget_held:
                # The data mark the hold lands under, read with it: the one the sweep
                # last read may be a second old, and a hold admitted just after Redis
                # lost its data, tagged with the old one, was charged twice when its
                # settlement was replayed (review).
                calls += [("SET", EPOCH, uuid.uuid4().hex.encode(), "NX"), ("GET", EPOCH)]
            replies = await self._batch(*calls, must=(0, 1))
            out = replies[1]
            if out[0] != 1 and out[1] != b"duplicate":
                self._forget(member)
            mark = replies[3] if budget_held and isinstance(replies[3], bytes) else None
            if mark is not None:
                self._saw_mark(mark)
            if out[0] == 1 and mark is not None and len(self._held_in) < MAX_HELD_IN:
                self._held_in[ask.key_id, ask.request_id] = mark
        ok, reason, retry, rem_r, reset_r, rem_t, reset_t = (
            v.decode() if isinstance(v, bytes) else v for v in out)
        if reason == "stale":  # answered after all, past its deadline: nothing was held
            # Answered in time yet past the deadline: the offset is off (a clock stepped).
            # No deadlines until the next sweep measures it again.
            self._offset, self._offset_checked = None, -OFFSET_CHECK_S
            raise LimitStoreUnavailable("redis limit store: the admission ran after its "
                                        "time limit, and did nothing")
        return Decision(
            allowed=ok == 1, reason=reason, retry_after_s=float(retry) if retry else None,
            limit_requests=limits.rpm,
            remaining_requests=int(float(rem_r)) if rem_r else None,
            reset_requests_s=float(reset_r) if reset_r else 0.0,
            limit_tokens=limits.tpm,
            remaining_tokens=int(float(rem_t)) if rem_t else None,
            reset_tokens_s=float(reset_t) if reset_t else 0.0,
        )

    def _deadline(self) -> str:
        """When, in Redis' clock, an admission sent now is past its caller's time limit
        (the caller has answered 503 by then): Redis, stalled, runs the scripts sent to it
        when it wakes, and a hold taken then for a request never served was charged in
        full as lost (with a `lost` record) when the sweep found its lease ended before
        the release the caller spooled. '' before the offset is known."""
        if self._offset is None:
            return ""
        return repr(time.time() + self._offset + self._offset_error + self._timeout
                    + STALE_SLACK_S)

    async def _clock_checked(self) -> None:
        """The offset before the lease clock is read: measured first when it never was
        (before the first sweep), and again at once when this replica's wall clock
        stepped since (the sweep's 10 s let a replica stepped 5 minutes ahead free other
        replicas' concurrency slots and charge their streams as lost; retest tester)."""
        if self._offset is not None and abs(time.time() - time.monotonic()
                                            - self._wall_less_mono) >= LEASE_SKEW_S / 2:
            # Stepped: a new offset now, however slow its reply.
            self._offset, self._offset_checked = None, -OFFSET_CHECK_S
        if self._offset is None:  # (at most one try per OFFSET_CHECK_S otherwise)
            await self._measure_offset()

    async def _measure_offset(self) -> None:
        """Redis' clock against this replica's, from one TIME round trip: its midpoint,
        off by at most half the round trip, which the deadline adds (so a deadline is
        never early). A slow reply does not replace a quicker one's offset, but is used
        while there is none: under load every reply may be slow, and an admission with
        no deadline is one a stalled Redis may run after its caller answered 503. Every
        OFFSET_CHECK_S, from the sweep."""
        now = time.monotonic()
        if now - self._offset_checked < OFFSET_CHECK_S:
            return
        self._offset_checked = now
        t0 = time.time()
        try:
            sec, usec = await self._call(self._redis.execute("TIME"))
        except LimitStoreUnavailable:
            return
        t1 = time.time()
        error = max(0.0, (t1 - t0) / 2)  # (a clock stepped back between the reads)
        if (self._offset is None or error <= max(self._offset_error, OFFSET_MAX_RTT_S / 2)
                or now - self._offset_at >= OFFSET_KEEP_S):
            self._offset = int(sec) + int(usec) / 1e6 - (t0 + t1) / 2
            self._offset_error, self._offset_at = error, now
            self._wall_less_mono = t1 - time.monotonic()
            shift = float(round(self._offset)) if abs(self._offset) >= LEASE_SKEW_S else 0.0
            if shift != self._lease_shift:
                log.warning("this replica's clock is %.1f s %s Redis' clock: leases run on "
                            "Redis' clock; rates and budget periods on this one (sync the "
                            "clocks: NTP)", abs(self._offset),
                            "behind" if self._offset > 0 else "ahead of")
            self._lease_shift = shift

    async def _batch(self, *calls: tuple[str | bytes | int, ...],
                     must: tuple[int, ...]) -> list[Any]:
        """The calls in one write (one round trip); a failure of a call in `must` fails
        the whole (the others' failures are left to the sweep)."""
        async def run() -> list[Any]:
            out = await self._redis.batch(*calls)
            failed = [out[i] for i in must if isinstance(out[i], BaseException)]
            if not failed:
                return out
            # "Not run" is one command's: the batch changed nothing only when none of
            # `must` ran (review: a refused ZADD beside an ADMIT that ran would have
            # left an unindexed hold with no release spooled).
            e = next((f for f in failed if not isinstance(f, NotRun | NotSent)), failed[0])
            if len(failed) < len(must) and isinstance(e, NotRun | NotSent):
                raise ResponseError(f"part of the batch ran: {e}")
            raise e

        replies: list[Any] = await self._call(run())
        return replies

    def _forget(self, member: str) -> None:
        """Remove an index entry off the request's path (one left behind is dropped by
        the sweep, which finds no hold for it)."""
        task = asyncio.ensure_future(self._quietly(self._redis.execute("ZREM", DUE, member)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _quietly(call: Coroutine[Any, Any, Any]) -> None:
        with contextlib.suppress(RedisError, OSError):
            await call

    async def settle(self, limits: Limits, ask: Ask, used_tokens: int, cost_nano: int,
                     now: float) -> Settled:
        check_usage(used_tokens, cost_nano)
        await self._clock_checked()
        conc, res, budget, resv, lost = self._hold_keys(ask.key_id, ask.period,
                                                        ask.request_id)
        keys = [self._ns(ask.key_id) + "tpm", conc, res, budget, resv, lost]
        args = [repr(float(now)), ask.request_id, _opt(limits.tpm), str(used_tokens),
                str(cost_nano), repr(float(self._window)), "", "",
                repr(self._lease_now(now))]
        if tracked(limits):  # and its index entry goes too (a failure: the sweep drops it)
            done, _ = await self._batch(self._redis.script_call(SETTLE, keys, args),
                                        ("ZREM", DUE, _member(ask)), must=(0,))
        else:
            done = await self._call(self._redis.evalsha(SETTLE, keys, args))
        held = (ask.key_id, ask.request_id)
        admitted_in = self._held_in.get(held)
        if done == 0 and admitted_in is not None and cost_nano > 0 \
                and await self._lost_since(admitted_in):
            # Its hold went with Redis' data: the cost is charged all the same, once (a
            # failure here leaves the mark for the spooled settlement's replay).
            done = await self._call(self._redis.evalsha(
                CHARGE_LOST_HOLD, [budget], [ask.request_id, str(cost_nano)]))
            if done == 1:
                log.warning("settled a request whose hold Redis lost: its cost is charged",
                            extra={"request_id": ask.request_id, "key_id": ask.key_id,
                                   "cost_nano": cost_nano})
        self._held_in.pop(held, None)
        return settled(ask, used_tokens, cost_nano, applied=done in (1, 2), corrected=done == 2)

    async def release(self, limits: Limits, ask: Ask, admitted: float, now: float
                      ) -> Settled:
        """SETTLE at zero of the hold admitted at `admitted` alone (its `at`), or of a
        sweep's mark of it; a hold under the id admitted since (a retry after the 503)
        is not touched, nor its index entry (review: the retry went unbilled)."""
        await self._clock_checked()
        conc, res, budget, resv, lost = self._hold_keys(ask.key_id, ask.period,
                                                        ask.request_id)
        latest = self._lease_now(admitted) + float(ask.lease_s)
        done = await self._call(self._redis.evalsha(
            SETTLE, [self._ns(ask.key_id) + "tpm", conc, res, budget, resv, lost],
            [repr(float(now)), ask.request_id, _opt(limits.tpm), "0", "0",
             repr(float(self._window)), repr(latest), repr(float(admitted)),
             repr(self._lease_now(now))]))
        if done and tracked(limits):  # its index entry too (left: the sweep drops it)
            self._forget(_member(ask))
        self._held_in.pop((ask.key_id, ask.request_id), None)
        return settled(ask, 0, 0, applied=done in (1, 2), corrected=done == 2)

    async def settle_again(self, items: Sequence[tuple[Ask, Owes]], now: float
                           ) -> list[int]:
        """Settle each (ask, what its request's record says it owes) as `settle` does,
        all in one round trip, giving back no tokens (the limits they were held under are
        not known): the holds of requests whose settlement may never have been made
        (resettle.py), only the record's own (policy/recorded.py: a request admitted at
        another moment under the same id is another's). Each one's SETTLE result: 0
        nothing held (settled already, or another's), 1 a live hold settled, 2 a lost
        charge corrected. LimitStoreUnavailable if any fails."""
        calls: list[tuple[str | bytes | int, ...]] = []
        for ask, o in items:
            calls += [self._settle_from(ask.key_id, ask.period, ask.request_id, o, now),
                      ("ZREM", DUE, _member(ask))]  # (a failure: the sweep drops it)
        if not calls:
            return []
        out = await self._batch(*calls, must=tuple(range(0, len(calls), 2)))
        return [int(done) for done in out[::2]]

    def _settle_from(self, key_id: str, period: str, rid: str, o: Owes, now: float
                     ) -> tuple[str | bytes | int, ...]:
        """The SETTLE of one hold from its request's record (`settle_again`)."""
        check_usage(o.tokens, o.cost_nano)
        conc, res, budget, resv, lost = self._hold_keys(key_id, period, rid)
        return self._redis.script_call(
            SETTLE, [self._ns(key_id) + "tpm", conc, res, budget, resv, lost],
            [repr(float(now)), rid, "", str(o.tokens), str(o.cost_nano),
             repr(float(self._window)), repr(self._lease_now(o.latest)),
             repr(float(o.admitted)), repr(self._lease_now(now))])

    def admitted_under(self, ask: Ask) -> str | None:
        mark = self._held_in.get((ask.key_id, ask.request_id))
        return None if mark is None else mark.decode()

    def admitted_under_was(self, ask: Ask, mark: str) -> None:
        if len(self._held_in) < MAX_HELD_IN:
            self._held_in.setdefault((ask.key_id, ask.request_id), mark.encode())

    async def _lost_since(self, mark: bytes) -> bool:
        """Whether Redis lost its data since `mark` was read (read it again now)."""
        with contextlib.suppress(LimitStoreUnavailable):
            await self.check_epoch()
        return self._epoch is not None and self._epoch != mark

    async def consume(self, limits: Limits, key_id: str, requests: int, tokens: int,
                      now: float, batch_id: str = "") -> None:
        ns = self._ns(key_id)
        await self._call(self._redis.evalsha(
            CONSUME, [ns + "rpm", ns + "tpm", ns + "gcra", ns + "consumed:" + batch_id],
            [repr(float(now)), _opt(limits.rpm), _opt(limits.tpm), str(requests),
             str(tokens), repr(float(self._window)), batch_id]))

    async def budget(self, key_id: str, org: str, period: str, now: float) -> tuple[int, int]:
        ns = self._ns(key_id)
        spent, reserved = await self._call(self._redis.evalsha(
            BUDGET, [ns + "budget:" + period, ns + "resv:" + period, ns + "lost:" + period],
            [repr(self._lease_now(now))]))
        return int(spent), int(reserved)

    async def check_epoch(self) -> bool:
        """Whether Redis still holds what this replica saw: True at first, and as long as
        the mark is there; False (logged, `on_reset` called) once it is gone or changed,
        after which the new mark is taken as seen."""
        mine = uuid.uuid4().hex.encode()
        _, seen = await self._batch(("SET", EPOCH, mine, "NX"), ("GET", EPOCH), must=(0, 1))
        return self._saw_mark(seen)

    def _saw_mark(self, seen: bytes) -> bool:
        """`check_epoch`'s reading of the data mark `seen`, wherever it was read."""
        before, self._epoch = self._epoch, seen
        if before is None or seen == before:
            return True
        log.error("redis lost its data (restarted without persistence, or flushed): the "
                  "budget ledgers (spend before it is forgotten), keys made with `keys "
                  "create` and usage records not yet exported are gone; requests in flight "
                  "are still charged their real cost to the new ledgers. Run Redis with "
                  "AOF (README: Scale out, Persistence)")
        if self._on_reset is not None:
            self._on_reset()
        return False

    async def _check_eviction(self) -> None:
        """Log an error (once per policy) when Redis may evict keys: with a `maxmemory`
        and a policy other than `noeviction`, a full Redis drops budget ledgers and holds
        without a word (an idle key's ledger first, under an LRU policy: its spend is
        forgotten and it may spend its budget again). Read every EVICTION_CHECK_S; a
        Redis that refuses INFO (an ACL) is not checked."""
        if time.monotonic() - self._eviction_checked < EVICTION_CHECK_S:
            return
        self._eviction_checked = time.monotonic()
        try:
            info = await self._call(self._redis.execute("INFO", "memory"))
        except LimitStoreUnavailable:
            return
        fields = dict(line.split(":", 1) for line in
                      (info.decode() if isinstance(info, bytes) else str(info)).splitlines()
                      if ":" in line)
        policy = fields.get("maxmemory_policy", "noeviction").strip()
        evicting = policy if fields.get("maxmemory", "0").strip() not in ("", "0") \
            and policy != "noeviction" else ""
        if evicting and evicting != self._evicting:
            log.error("redis may evict tokenbooth's keys (maxmemory-policy %s with a "
                      "maxmemory): a full Redis would drop budget ledgers and holds, and "
                      "spend would be forgotten; set maxmemory-policy noeviction (a full "
                      "Redis then refuses writes: requests get 503 and settlements wait "
                      "in the spool)", policy)
        self._evicting = evicting

    async def sweep(self, now: float) -> list[Ask]:
        """Claim the holds whose lease ended unsettled, from the index: each is charged
        in full and returned to exactly one caller across every replica. First, whether
        Redis kept its data (`check_epoch`)."""
        await self.check_epoch()
        await self._check_eviction()
        await self._measure_offset()
        await self._clock_checked()
        lost: list[Ask] = []
        lnow = self._lease_now(now)
        for _ in range(SWEEP_BATCHES):
            try:
                members = await self._call(self._redis.evalsha(
                    CLAIM, [DUE], [repr(lnow), repr(lnow + CLAIM_S), str(SWEEP_BATCH)]))
                lost += await self._sweep_batch(members, now)
            except LimitStoreUnavailable as e:
                if not lost:
                    raise
                # The batches claimed so far are charged: their records are written now
                # (review: a later batch's failure dropped 256 of them); the rest waits
                # for the next sweep.
                log.warning("sweep: stopped after %d lost holds (redis: %s)", len(lost), e)
                break
            if len(members) < SWEEP_BATCH:
                break
        return lost

    async def _sweep_batch(self, members: list[bytes], now: float) -> list[Ask]:
        """Settle claimed entries on their keys (pipelined), then drop those answered. An
        entry whose call failed stays claimed and returns after CLAIM_S."""
        entries: list[tuple[bytes, list[str]]] = []
        done: list[bytes] = []
        for m in members:
            ref = orjson.loads(m)
            if isinstance(ref, list) and len(ref) == 3 and all(isinstance(x, str) for x in ref):
                entries.append((m, ref))
            else:
                log.error("hold index: dropping a damaged entry", extra={"entry": m[:200]})
                done.append(m)
        settled = await self._settle_recorded(entries, now)
        done += [m for i, (m, _) in enumerate(entries) if i in settled]
        entries = [e for i, e in enumerate(entries) if i not in settled]
        results = await asyncio.gather(*(self._redis.evalsha(
            SWEEP, self._hold_keys(key_id, period, rid), [repr(self._lease_now(now)), rid])
            for _, (key_id, period, rid) in entries), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.warning("sweep: %d held requests stay claimed (redis: %s)", len(failed),
                        failed[0])
        done += [m for (m, _), r in zip(entries, results, strict=True)
                 if not isinstance(r, BaseException | list)]
        early = [x for (m, _), r in zip(entries, results, strict=True) if isinstance(r, list)
                 for x in (r[0], m)]  # a live hold: its entry moves to its expiry
        with contextlib.suppress(LimitStoreUnavailable):  # they return, and then find nothing
            if done:
                await self._call(self._redis.execute("ZREM", DUE, *done))
            if early:
                await self._call(self._redis.execute("ZADD", DUE, *early))
        lost = [_lost_ask(r) for r in results if isinstance(r, bytes)]
        for a in lost:  # charged in full as lost: a late settlement corrects it as usual
            self._held_in.pop((a.key_id, a.request_id), None)
        return lost

    async def _settle_recorded(self, entries: list[tuple[bytes, list[str]]], now: float
                               ) -> set[int]:
        """Of claimed entries, those whose request's real usage record reached Redis (its
        seen key says what the request owes: policy/recorded.py): each hold settled at
        that cost, as its own settlement would have (its replica died between the record
        and it), not charged in full with a `lost` record beside the real one. Only a
        hold whose lease ends by the record's `latest` (a later request reusing the id
        is another's; another key's concurrent one under the same id too). Their indexes
        in `entries`; the rest (no record, another's hold, a failure) go on to SWEEP."""
        if self._seen is None or not entries:
            return set()
        try:
            marks = await self._call(self._redis.batch(
                *(("GET", self._seen + ref[2]) for _, ref in entries)))
        except LimitStoreUnavailable:
            return set()
        # Only a hold of the record's key or org (another key's request may hold the id
        # at the same time: the duplicate check is per key); SETTLE then checks its time.
        owing = [(i, o) for i, raw in enumerate(marks) if not isinstance(raw, BaseException)
                 and (o := from_seen_mark(raw)) is not None
                 and o.owns(entries[i][1][0], ORG_KEY_PREFIX)]
        if not owing:
            return set()
        calls = []
        for i, o in owing:
            key_id, period, rid = entries[i][1]
            calls.append(self._settle_from(key_id, period, rid, o, now))
        try:
            results = await self._call(self._redis.batch(*calls))
        except LimitStoreUnavailable:
            return set()
        settled = {i for (i, _), r in zip(owing, results, strict=True) if r in (1, 2)}
        for i in settled:
            key_id, _, rid = entries[i][1]
            self._held_in.pop((key_id, rid), None)
        if settled:
            self.settled_from_records += len(settled)
            log.info("sweep: holds whose request's record was delivered settled at its "
                     "cost (their replica stopped before settling them)",
                     extra={"holds": len(settled)})
        return settled

    async def _call(self, awaitable: Any) -> Any:
        # Bounded by the client's socket timeouts, no retries. The caller (Admission) logs
        # the failure once per request; the message keeps the cause (a Lua error too).
        try:
            return await awaitable
        except (RedisError, OSError) as e:  # TimeoutError is an OSError
            # NotSent, NotRun: never run in Redis, so nothing to undo (an outage's
            # refusals spooled a zero release each: observability tester; so did a
            # Redis restarted with a password, answering NOAUTH: last round's note).
            kind = (LimitStoreUnwritable if isinstance(e, NotSent | NotRun) else
                    LimitStoreRefused if isinstance(e, ResponseError) else
                    LimitStoreUnavailable)
            raise kind(f"redis limit store: {type(e).__name__}: {e}") from None

