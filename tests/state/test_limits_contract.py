"""One contract, every limit store: the in-memory store and Redis/Lua against a real Redis.

The clock is injected: every call gets its `now`, so nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

import pytest
import redis

from authz.state.limits.base import LimitStore
from authz.state.limits.memory import MemoryLimitStore
from authz.state.limits.redis_limits import RedisLimitStore
from policy.admission import LOST_TTL_S, Settled, held_limits
from policy.bounds import MAX_EXACT
from policy.limits import (
    Ask,
    Decision,
    HoldRecord,
    Limits,
    bucket_level,
    bucket_refund,
    bucket_reset_s,
    bucket_take,
    gcra,
)
from tests.redis_server import RedisServer

T0 = 1_700_000_000.25  # an epoch-sized clock, so float rounding is exercised


_n = 0


def ask(key: str = "k1", *, tokens: int = 0, cost: int = 0, period: str = "month:2025-01",
        lease_s: float = 30.0, rid: str | None = None, record: HoldRecord | None = None
        ) -> Ask:
    global _n
    _n += 1
    return Ask(rid or f"req-{_n}", key, "acme", tokens, cost, period, lease_s, record)


async def test_implements_the_protocol(store: Any) -> None:
    assert isinstance(store, LimitStore)


async def test_rpm_burst_then_denied_with_retry_after(store: Any) -> None:
    lim = Limits(rpm=5)
    for i in range(5):
        d = await store.admit(lim, ask(), T0)
        assert d.allowed and d.limit_requests == 5
        assert d.remaining_requests == 4 - i
        assert d.reset_requests_s == pytest.approx(12.0 * (i + 1))
        assert d.limit_tokens is None and d.remaining_tokens is None
    d = await store.admit(lim, ask(), T0)
    assert not d.allowed and d.reason == "requests"
    assert d.retry_after_s == pytest.approx(12.0)
    assert d.remaining_requests == 0 and d.reset_requests_s == pytest.approx(60.0)
    # The denial took nothing: 1 ms short of the refill is still refused, at the refill one fits.
    assert (await store.admit(lim, ask(), T0 + 11.999)).reason == "requests"
    d = await store.admit(lim, ask(), T0 + 12.0)
    assert d.allowed and d.remaining_requests == 0
    assert not (await store.admit(lim, ask(), T0 + 12.0)).allowed
    # Continuous refill: one more every 60/N s, not a whole window's worth at an edge.
    assert (await store.admit(lim, ask(), T0 + 24.0)).allowed
    assert not (await store.admit(lim, ask(), T0 + 24.0)).allowed
    # After a full idle window the whole burst is back.
    later = T0 + 24.0 + 60.0
    assert [(await store.admit(lim, ask(), later)).allowed for _ in range(6)] == [True] * 5 + [
        False]


async def test_rpm_never_2n_in_any_window(store: Any) -> None:
    n = 7
    lim, rng = Limits(rpm=n), random.Random(42)
    now, admitted = T0, []
    for _ in range(1500):
        now += rng.choice([0.0, 0.0, 0.3, 1.1, 2.9, 8.57, 0.01])
        if (await store.admit(lim, ask(), now)).allowed:
            admitted.append(now)
    interval = 60.0 / n
    assert len(admitted) > 100
    for i, t in enumerate(admitted):
        in_window = [u for u in admitted[i:] if u < t + 60.0]
        assert len(in_window) <= 2 * n - 1  # a burst, then the refill: never 2N
        for k, u in enumerate(in_window, start=1):  # GCRA's bound: N + elapsed / interval
            assert k <= n + (u - t) / interval + 1e-6


async def test_tpm_reservation_and_too_large(store: Any) -> None:
    lim = Limits(tpm=1000)
    d = await store.admit(lim, ask(tokens=600), T0)
    assert d.allowed and d.limit_tokens == 1000 and d.remaining_tokens == 400
    assert d.reset_tokens_s == pytest.approx(36.0)
    assert d.limit_requests is None and d.remaining_requests is None
    d = await store.admit(lim, ask(tokens=500), T0)
    assert not d.allowed and d.reason == "tokens"
    assert d.retry_after_s == pytest.approx(6.0)  # 100 tokens at 1000/min
    assert d.remaining_tokens == 400
    d = await store.admit(lim, ask(tokens=1001), T0)
    assert not d.allowed and d.reason == "tokens_too_large" and d.retry_after_s is None
    assert (await store.admit(lim, ask(tokens=400), T0)).remaining_tokens == 0
    assert not (await store.admit(lim, ask(tokens=1), T0)).allowed
    # Refill is continuous: 6 s later, exactly 100 tokens are back.
    d = await store.admit(lim, ask(tokens=100), T0 + 6.0)
    assert d.allowed and d.remaining_tokens == 0


async def test_settle_refunds_unused_tokens_exactly_and_once(store: Any) -> None:
    lim = Limits(tpm=1000)
    a = ask(tokens=600)
    assert (await store.admit(lim, a, T0)).allowed
    await store.settle(lim, a, 250, 0, T0 + 3.0)
    expected = bucket_refund(bucket_level(400.0, T0, T0 + 3.0, 1000), 600, 250, 1000)
    probe = await store.admit(lim, ask(tokens=0), T0 + 3.0)
    assert probe.remaining_tokens == math.floor(expected)
    assert probe.reset_tokens_s == bucket_reset_s(expected, 1000)
    await store.settle(lim, a, 0, 0, T0 + 3.0)  # a second settle changes nothing
    again = await store.admit(lim, ask(tokens=0), T0 + 3.0)
    assert again.remaining_tokens == probe.remaining_tokens
    assert again.reset_tokens_s == probe.reset_tokens_s
    # An overrun is taken from the bucket; a refund never fills past capacity.
    b = ask(tokens=100)
    assert (await store.admit(lim, b, T0 + 3.0)).allowed
    await store.settle(lim, b, 300, 0, T0 + 3.0)
    assert (await store.admit(lim, ask(), T0 + 3.0)).remaining_tokens == math.floor(
        expected - 300)
    c = ask(tokens=10)
    assert (await store.admit(lim, c, T0 + 100.0)).remaining_tokens == 990
    await store.settle(lim, c, 0, 0, T0 + 100.0)
    assert (await store.admit(lim, ask(), T0 + 100.0)).remaining_tokens == 1000


async def test_concurrency_leases(store: Any) -> None:
    lim = Limits(max_concurrent=2)
    a, b = ask(lease_s=10.0), ask(lease_s=10.0)
    assert (await store.admit(lim, a, T0)).allowed
    assert (await store.admit(lim, b, T0)).allowed
    d = await store.admit(lim, ask(), T0 + 1)
    assert not d.allowed and d.reason == "concurrency"
    await store.settle(lim, a, 0, 0, T0 + 1)
    c = ask(lease_s=100.0)
    assert (await store.admit(lim, c, T0 + 1)).allowed
    assert (await store.admit(lim, ask(), T0 + 9.999)).reason == "concurrency"
    # b was never settled (a lost replica): its lease expires after lease_s.
    assert (await store.admit(lim, ask(lease_s=100.0), T0 + 10.0)).allowed
    assert (await store.admit(lim, ask(), T0 + 10.0)).reason == "concurrency"
    await store.settle(lim, b, 0, 0, T0 + 10.0)  # late: nothing left to release
    assert (await store.admit(lim, ask(), T0 + 10.0)).reason == "concurrency"


async def test_budget_reserve_charge_and_expire(store: Any) -> None:
    lim, p = Limits(budget_nano=1000), "month:2025-01"
    a = ask(cost=600, period=p)
    assert (await store.admit(lim, a, T0)).allowed
    assert await store.budget("k1", "acme", p, T0) == (0, 600)
    d = await store.admit(lim, ask(cost=401, period=p), T0)
    assert not d.allowed and d.reason == "budget_held"  # unspent: it fits once `a` ends
    assert (await store.admit(lim, ask(cost=400, period=p, lease_s=10.0), T0)).allowed
    assert await store.budget("k1", "acme", p, T0) == (0, 1000)
    assert (await store.admit(lim, ask(cost=0, period=p), T0)).allowed  # exactly full
    assert (await store.admit(lim, ask(cost=1, period=p), T0)).reason == "budget_held"
    # Settlement charges the real cost and drops the hold.
    assert await store.settle(lim, a, 0, 500, T0 + 1) == Settled(applied=True)
    assert await store.budget("k1", "acme", p, T0 + 1) == (500, 400)
    assert await store.settle(lim, a, 0, 500, T0 + 1) == Settled(applied=False)  # idempotent
    assert await store.budget("k1", "acme", p, T0 + 1) == (500, 400)
    # The 400 hold was never settled: when its lease ends it is charged in full (lost).
    assert await store.budget("k1", "acme", p, T0 + 9.9) == (500, 400)
    assert await store.budget("k1", "acme", p, T0 + 10.0) == (900, 0)
    assert (await store.admit(lim, ask(cost=101, period=p), T0 + 10.0)).reason == "budget"
    b = ask(cost=100, period=p)
    assert (await store.admit(lim, b, T0 + 10.0)).allowed
    await store.settle(lim, b, 0, 50, T0 + 11)
    assert await store.budget("k1", "acme", p, T0 + 11) == (950, 0)
    # Periods are independent: a new one starts at zero.
    q = "month:2025-02"
    assert await store.budget("k1", "acme", q, T0 + 11) == (0, 0)
    assert (await store.admit(lim, ask(cost=1000, period=q), T0 + 11)).allowed
    assert await store.budget("k1", "acme", q, T0 + 11) == (0, 1000)
    assert await store.budget("k1", "acme", p, T0 + 11) == (950, 0)
    # Keys are independent too.
    assert await store.budget("k2", "acme", p, T0 + 11) == (0, 0)


async def test_an_overrun_is_charged_in_full_and_reported(store: Any) -> None:
    """A hold that was not the worst case: the ledger gets the real cost (it agrees with
    the usage records), the result reports the overrun, and the spent budget then
    refuses everything."""
    lim, p = Limits(budget_nano=1000, tpm=1000), "day:2025-01-01"
    a = ask(cost=600, tokens=100, period=p)
    assert (await store.admit(lim, a, T0)).allowed
    assert await store.settle(lim, a, 130, 1_250, T0 + 1) == Settled(True, 650, 30)
    assert await store.budget("k1", "acme", p, T0 + 1) == (1_250, 0)
    assert await store.settle(lim, a, 130, 1_250, T0 + 1) == Settled(False, 650, 30)
    assert await store.budget("k1", "acme", p, T0 + 1) == (1_250, 0)
    # The 30 tokens past the reservation were taken from the bucket too.
    level = bucket_refund(bucket_level(900.0, T0, T0 + 1, 1000), 100, 130, 1000)
    probe = await store.admit(lim, ask(period="day:2025-01-02"), T0 + 1)
    assert probe.allowed and probe.remaining_tokens == math.floor(level) == 886
    for cost in (0, 1, 600):
        d = await store.admit(lim, ask(cost=cost, period=p), T0 + 2)
        assert not d.allowed and d.reason == "budget"


async def test_exactly_spent_refuses_any_cost(store: Any) -> None:
    lim, p = Limits(budget_nano=1000), "total"
    a = ask(cost=1000, period=p)
    assert (await store.admit(lim, a, T0)).allowed
    assert await store.settle(lim, a, 0, 1000, T0) == Settled(applied=True)
    assert (await store.admit(lim, ask(cost=1, period=p), T0)).reason == "budget"
    assert await store.budget("k1", "acme", p, T0) == (1000, 0)


REC = HoldRecord(model="demo", upstream_model="tiny-llama", endpoint="chat", stream=True,
                 prompt_tokens=40, completion_tokens=10, started_at="2025-01-01T00:00:00Z")


async def test_a_lost_hold_is_charged_in_full_swept_once_then_corrected(store: Any) -> None:
    """A hold whose lease ends unsettled costs its whole hold, its tokens stay taken, the
    sweep claims it once (with its record material), and a late settlement corrects the
    charge to the real cost exactly once."""
    lim, p = Limits(budget_nano=1000, tpm=100, max_concurrent=1), "total"
    a = ask(cost=700, tokens=50, period=p, lease_s=5.0, record=REC)
    assert (await store.admit(lim, a, T0)).allowed
    assert await store.sweep(T0 + 4.999) == []  # still live
    assert await store.budget("k1", "acme", p, T0 + 5.0) == (700, 0)
    # Its slot is free, its tokens are not; the id is held until claimed.
    probe = ask(period=p)
    d = await store.admit(lim, probe, T0 + 5.0)
    assert d.allowed and d.remaining_tokens == math.floor(bucket_level(50.0, T0, T0 + 5, 100))
    await store.settle(lim, probe, 0, 0, T0 + 5.0)
    assert (await store.admit(lim, a, T0 + 5.0)).reason == "duplicate"
    assert await store.sweep(T0 + 5.0) == [a]
    assert await store.sweep(T0 + 6.0) == []  # claimed once
    assert await store.budget("k1", "acme", p, T0 + 6.0) == (700, 0)
    # The settlement arrives late (a spool drained after an outage, say): corrected.
    assert await store.settle(lim, a, 10, 250, T0 + 7.0) == Settled(True, corrected=True)
    assert await store.budget("k1", "acme", p, T0 + 7.0) == (250, 0)
    assert await store.settle(lim, a, 10, 250, T0 + 8.0) == Settled(False)  # once
    # Past the hold too: an overrun is charged, never dropped.
    b = ask(cost=300, tokens=10, period=p, lease_s=5.0)
    assert (await store.admit(lim, b, T0 + 10.0)).allowed
    assert await store.sweep(T0 + 15.0) == [b]
    assert await store.budget("k1", "acme", p, T0 + 15.0) == (550, 0)
    assert await store.settle(lim, b, 20, 400, T0 + 16.0) == Settled(True, 100, 10, True)
    assert await store.budget("k1", "acme", p, T0 + 16.0) == (650, 0)


@pytest.mark.parametrize("lim", [Limits(tpm=100), Limits(max_concurrent=2), Limits()],
                         ids=["tpm", "concurrency", "record-only"])
async def test_a_late_settle_says_it_corrected_a_lost_hold_without_a_budget(
        store: Any, lim: Limits) -> None:
    """The sweep claimed the hold and its `lost` record was written (and counted in the
    metrics): the late settlement must say so for a key without a budget too (only a
    ledger could say it; the metrics then counted the request twice). Once, and not
    past LOST_TTL_S, as a ledger's lost charge."""
    lim = held_limits(lim, ask(record=REC))
    a, b = (ask(rid=r, tokens=50, lease_s=5.0, record=REC) for r in ("a", "b"))
    for x in (a, b):
        assert (await store.admit(lim, x, T0)).allowed
    assert sorted(await store.sweep(T0 + 5.0), key=lambda x: x.request_id) == [a, b]
    assert (await store.settle(lim, a, 10, 0, T0 + 7.0)).corrected
    assert not (await store.settle(lim, a, 10, 0, T0 + 8.0)).corrected  # once
    assert not (await store.settle(lim, b, 10, 0, T0 + 5.0 + LOST_TTL_S)).corrected
    assert (await store.admit(lim, ask(rid="a", record=REC), T0 + 9.0)).allowed  # reusable


async def test_a_late_settle_before_the_sweep_charges_without_refund(store: Any) -> None:
    lim, p = Limits(budget_nano=1000, tpm=100), "total"
    a = ask(cost=700, tokens=50, period=p, lease_s=5.0, record=REC)
    assert (await store.admit(lim, a, T0)).allowed
    assert await store.settle(lim, a, 10, 300, T0 + 5.0) == Settled(True)
    assert await store.budget("k1", "acme", p, T0 + 5.0) == (300, 0)
    assert await store.sweep(T0 + 5.0) == []  # settled: not lost, no record
    level = bucket_level(50.0, T0, T0 + 5.0, 100)  # no refund after the lease
    assert (await store.admit(lim, ask(period=p), T0 + 5.0)).remaining_tokens == math.floor(
        level)
    # Charged as lost by a budget read first, then settled before the sweep: corrected.
    b = ask(cost=600, period=p, lease_s=5.0)
    assert (await store.admit(lim, b, T0 + 10.0)).allowed
    assert await store.budget("k1", "acme", p, T0 + 15.0) == (900, 0)
    assert await store.settle(lim, b, 0, 100, T0 + 15.0) == Settled(True, corrected=True)
    assert await store.budget("k1", "acme", p, T0 + 15.0) == (400, 0)
    assert await store.sweep(T0 + 15.0) == []


async def test_a_sweep_with_a_clock_stepped_back_claims_only_ended_leases(
        store: Any) -> None:
    """Liveness is decided against the caller's `now`. The memory store claimed every
    hold that an admission with a later clock had seen end, so a sweep whose clock was
    behind (stepped back) claimed, and recorded as `lost`, a hold still live by its
    `now`, which Redis claims only once its clock reaches the lease's end."""
    lim = Limits(max_concurrent=5, budget_nano=1_000)
    short, longer = ask(cost=100, lease_s=2.0), ask(cost=10, lease_s=10.0)
    for a in (short, longer):
        assert (await store.admit(lim, a, T0)).allowed
    assert (await store.admit(lim, ask(cost=1, lease_s=100.0), T0 + 20.0)).allowed
    # The clock is back at T0 + 5: `short` ended, `longer` is live.
    assert [a.request_id for a in await store.sweep(T0 + 5.0)] == [short.request_id]
    assert [a.request_id for a in await store.sweep(T0 + 10.0)] == [longer.request_id]
    assert await store.sweep(T0 + 10.0) == []
    assert await store.budget("k1", "acme", "month:2025-01", T0 + 10.0) == (110, 1)


async def test_a_lost_charge_is_forgotten_after_lost_ttl(store: Any) -> None:
    lim, p = Limits(budget_nano=10_000), "total"
    a, b = ask(cost=600, period=p, lease_s=5.0), ask(cost=400, period=p, lease_s=5.0)
    for x in (a, b):
        assert (await store.admit(lim, x, T0)).allowed
    assert sorted(x.request_id for x in await store.sweep(T0 + 5.0)) == sorted(
        [a.request_id, b.request_id])
    assert (await store.settle(lim, a, 0, 100, T0 + 5.0 + LOST_TTL_S - 0.5)).corrected
    assert await store.budget("k1", "acme", p, T0 + 5.0 + LOST_TTL_S) == (500, 0)
    assert await store.settle(lim, b, 0, 100, T0 + 5.0 + LOST_TTL_S) == Settled(False)
    assert await store.budget("k1", "acme", p, T0 + 5.0 + LOST_TTL_S) == (500, 0)


async def test_the_sweep_claims_every_kind_of_hold_and_nothing_denied(store: Any) -> None:
    keys = {"t": Limits(tpm=100), "c": Limits(max_concurrent=1), "b": Limits(budget_nano=50)}
    held = []
    for k, lim in keys.items():
        a = ask(k, tokens=60, cost=50, lease_s=1.0, record=REC)
        assert (await store.admit(lim, a, T0)).allowed
        held.append(a)
        assert not (await store.admit(lim, ask(k, tokens=60, cost=50, lease_s=1.0), T0)).allowed
    assert (await store.admit(Limits(rpm=5), ask("r", lease_s=1.0), T0)).allowed  # holds nothing
    lost = await store.sweep(T0 + 1.0)
    assert sorted(lost, key=lambda x: x.key_id) == sorted(held, key=lambda x: x.key_id)
    assert await store.sweep(T0 + 100.0) == []
    assert await store.budget("b", "acme", "month:2025-01", T0 + 1) == (50, 0)


async def test_a_denial_changes_nothing(store: Any) -> None:
    lim = Limits(rpm=2, tpm=100, max_concurrent=2, budget_nano=50)
    for _ in range(3):
        d = await store.admit(lim, ask(tokens=10, cost=51), T0)
        assert not d.allowed and d.reason == "budget" and d.retry_after_s is None
        assert d.remaining_requests == 2 and d.reset_requests_s == 0.0
        assert d.remaining_tokens == 100 and d.reset_tokens_s == 0.0
    d = await store.admit(lim, ask(tokens=101), T0)
    assert d.reason == "tokens_too_large" and d.remaining_requests == 2
    # Nothing was consumed: the full RPM, TPM, concurrency and budget are still there.
    first = await store.admit(lim, ask(tokens=50, cost=25), T0)
    assert first.allowed and first.remaining_requests == 1 and first.remaining_tokens == 50
    d = await store.admit(lim, ask(tokens=51, cost=25), T0)
    assert d.reason == "tokens" and d.remaining_requests == 1
    assert d.reset_requests_s == pytest.approx(30.0)
    assert (await store.admit(lim, ask(tokens=50, cost=25), T0)).allowed
    assert await store.budget("k1", "acme", "month:2025-01", T0) == (0, 50)
    d = await store.admit(lim, ask(), T0)
    assert d.reason == "requests" and d.remaining_tokens == 0


async def test_a_look_decides_as_admission_would_and_takes_nothing(store: Any) -> None:
    """`take=False` (asked of a key before its org takes a slot): the same Decision as
    an admission at that moment, and no state changed, whatever it decides."""
    lim = Limits(rpm=2, tpm=100, max_concurrent=2, budget_nano=50)
    for i in range(3):  # the same look, three times: nothing taken by any of them
        d = await store.admit(lim, ask(tokens=30, cost=20), T0, take=False)
        assert d.allowed and d.remaining_requests == 1 and d.remaining_tokens == 70, i
    assert await store.sweep(T0 + 1_000) == []  # nothing held, nothing indexed
    assert await store.budget("k1", "acme", "month:2025-01", T0) == (0, 0)
    held = ask(tokens=30, cost=20, lease_s=100)
    assert (await store.admit(lim, held, T0)).allowed
    assert (await store.admit(lim, ask(tokens=30, cost=20), T0)).allowed  # rpm used up
    for a in (ask(tokens=5), held):  # refused: requests, then a duplicate
        looked = await store.admit(lim, a, T0, take=False)
        assert looked == await store.admit(lim, a, T0) and not looked.allowed
    assert (await store.settle(lim, held, 30, 20, T0 + 10.0)).applied  # still held
    assert await store.budget("k1", "acme", "month:2025-01", T0 + 10.0) == (20, 20)
    assert (await store.admit(lim, ask(tokens=5), T0 + 30.0, take=False)).allowed


async def test_a_concurrency_limit_set_mid_flight_counts_the_requests_in_flight(
        store: Any) -> None:
    """`keys update --max-concurrent 1` on a key with 2 requests in flight (held for its
    tpm and budget): the new limit applies at once. Only requests admitted under a
    concurrency limit took a lease, so both were invisible to it and a third was
    admitted: 3 in flight under a limit of 1."""
    before = Limits(tpm=1_000, budget_nano=100)
    first, second = ask(tokens=10, cost=1), ask(tokens=10, cost=1)
    for a in (first, second):
        assert (await store.admit(before, a, T0)).allowed
    after = Limits(tpm=1_000, max_concurrent=1, budget_nano=100)
    assert (await store.admit(after, ask(tokens=10, cost=1), T0 + 1)).reason == "concurrency"
    await store.settle(before, first, 10, 1, T0 + 2)
    assert (await store.admit(after, ask(tokens=10, cost=1), T0 + 2)).reason == "concurrency"
    await store.settle(before, second, 10, 1, T0 + 3)
    assert (await store.admit(after, ask(tokens=10, cost=1), T0 + 3)).allowed
    # A lease ends with its hold: one admitted before, never settled, frees it then.
    lost = ask("k2", tokens=10, lease_s=5.0)
    assert (await store.admit(Limits(tpm=1_000), lost, T0)).allowed
    assert (await store.admit(Limits(max_concurrent=1), ask("k2"), T0 + 4.9)).reason \
        == "concurrency"
    assert (await store.admit(Limits(max_concurrent=1), ask("k2"), T0 + 5.0)).allowed


async def test_a_tpm_raised_mid_flight_is_not_undone_by_the_old_settlements(
        store: Any) -> None:
    """`keys update --tpm 6000` on a key at 60 with a request in flight: that request
    settles under the limits it was admitted with, and its refund read the bucket
    through the old capacity, clamping it to 60: the key was refused 300 tokens the new
    limit had."""
    old, new = Limits(tpm=60), Limits(tpm=6_000)
    a = ask(tokens=60)
    assert (await store.admit(old, a, T0)).allowed  # the bucket is empty
    assert (await store.admit(new, ask(tokens=50), T0 + 1.0)).allowed  # 100 refilled
    await store.settle(old, a, 10, 0, T0 + 2.0)  # 50 unused come back
    level = bucket_level(50.0 + 50, T0 + 1.0, T0 + 2.0, 6_000)  # 50 left, 50 back, 100 refilled
    assert level == 200.0
    d = await store.admit(new, ask(tokens=200), T0 + 2.0)
    assert d.allowed and d.remaining_tokens == 0
    assert (await store.admit(new, ask(tokens=101), T0 + 3.0)).reason == "tokens"
    assert (await store.admit(new, ask(tokens=100), T0 + 3.0)).allowed


async def test_check_order_requests_before_everything(store: Any) -> None:
    lim = Limits(rpm=1, max_concurrent=1, tpm=10, budget_nano=5)
    assert (await store.admit(lim, ask(tokens=10, cost=5, lease_s=100), T0)).allowed
    assert (await store.admit(lim, ask(tokens=10, cost=5), T0)).reason == "requests"
    assert (await store.admit(lim, ask(tokens=10, cost=5), T0 + 60)).reason == "concurrency"


async def test_duplicate_request_id_is_refused_while_in_flight(store: Any) -> None:
    lim, p = Limits(budget_nano=100), "total"
    a = ask(cost=60, period=p, rid="same", lease_s=10.0)
    assert (await store.admit(lim, a, T0)).allowed
    assert (await store.admit(lim, a, T0 + 1)).reason == "duplicate"
    assert await store.budget("k1", "acme", p, T0 + 1) == (0, 60)
    await store.settle(lim, a, 0, 10, T0 + 2)
    assert (await store.admit(lim, a, T0 + 2)).allowed  # settled: the id may be reused
    assert (await store.admit(lim, a, T0 + 12)).reason == "duplicate"  # ended, unclaimed
    assert await store.sweep(T0 + 12) == [a]
    assert await store.budget("k1", "acme", p, T0 + 12) == (70, 0)
    assert (await store.admit(lim, ask(cost=30, period=p, rid="same"), T0 + 12)).allowed


async def test_settle_of_unknown_request_is_a_no_op(store: Any) -> None:
    lim = Limits(tpm=100, budget_nano=10, max_concurrent=1)
    assert await store.settle(lim, ask(cost=5), 3, 50, T0) == Settled(False, 45, 3)
    assert await store.budget("k1", "acme", "month:2025-01", T0) == (0, 0)
    assert (await store.admit(lim, ask(), T0)).remaining_tokens == 100


async def test_decisions_are_plain_values(store: Any) -> None:
    d = await store.admit(Limits(rpm=3, tpm=30), ask(tokens=3), T0)
    assert d == Decision(True, "", None, 3, 2, 20.0, 30, 27, 6.0)


@pytest.mark.parametrize("bad", [dict(tokens=-1), dict(cost=-1), dict(cost=2**53),
                                 dict(lease_s=0.0)])
async def test_bad_asks_are_refused(store: Any, bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        await store.admit(Limits(rpm=1), ask(**bad), T0)


async def test_header_arithmetic_is_policy_limits_exactly(store: Any) -> None:
    """Bit-for-bit the pure functions (GCRA's bucket and the token bucket)."""
    for n in range(1, 40):
        lim, now = Limits(rpm=n, tpm=7 * n), 12.5
        requests, rts, level, ts = float(n), now, float(7 * n), now
        for k in range(n + 1):
            now += (k % 3) / 7.0
            d = await store.admit(lim, ask(f"rpm{n}", tokens=k), now)
            g = gcra(bucket_level(requests, rts, now, n), n)
            lvl = bucket_level(level, ts, now, 7 * n)
            ok, after, wait = bucket_take(lvl, k, 7 * n)
            assert d.allowed == (g.allowed and ok)
            if d.allowed:
                requests, rts, level, ts = g.level, now, after, now
                assert (d.remaining_requests, d.reset_requests_s) == (g.remaining, g.reset_s)
                assert d.remaining_tokens == math.floor(after)
                assert d.reset_tokens_s == bucket_reset_s(after, 7 * n)
            elif not g.allowed:  # the longer wait when the tokens are short too
                retry = g.retry_after_s if ok else max(g.retry_after_s, wait)
                assert (d.remaining_requests, d.retry_after_s) == (0, retry)


async def test_consume_counts_usage_admitted_elsewhere(store: Any) -> None:
    """Reconciliation after an outage: requests and tokens admitted by a local limiter."""
    lim = Limits(rpm=3, tpm=1000)
    await store.consume(lim, "k1", 2, 600, 1000.0)
    d = await store.admit(lim, ask(tokens=100), 1000.0)
    assert d.allowed and d.remaining_requests == 0 and d.remaining_tokens == 300
    d = await store.admit(lim, ask(tokens=1), 1000.0)
    assert not d.allowed and d.reason == "requests"
    # Tokens may go below zero: the bucket owes them and refills from there.
    await store.consume(Limits(tpm=1000), "k2", 0, 1500, 1000.0)
    d = await store.admit(Limits(tpm=1000), ask("k2", tokens=1), 1000.0 + 30.0)
    assert not d.allowed and d.reason == "tokens"
    assert (await store.admit(Limits(tpm=1000), ask("k2", tokens=1), 1000.0 + 31.0)).allowed


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_a_bucket_in_debt_is_kept_however_far_its_limit_is_lowered(
        kind: str, request: pytest.FixtureRequest) -> None:
    """A request that used more tokens than it reserved leaves its key's bucket owing
    them; lowered to a tenth, the limit refills far slower. Redis once expired the bucket
    when the old limit would have refilled it, and then forgot the debt: a full bucket
    under the new limit, admitting what the limit did not have. A 0.1 s window makes
    that expiry (real time) short; the decisions still run on the injected clock."""
    w = 0.1
    s: Any
    if kind == "memory":
        s = MemoryLimitStore(window_s=w)
    else:
        server: RedisServer = request.getfixturevalue("limits_redis")
        with redis.Redis.from_url(server.url) as r:
            r.flushdb()
        s = RedisLimitStore(server.url, timeout_s=1.0, window_s=w)
    try:
        a = ask(tokens=100)
        assert (await s.admit(Limits(tpm=900), a, T0)).allowed
        assert (await s.settle(Limits(tpm=900), a, 2_900, 0, T0)).overrun_tokens == 2_800
        # The bucket holds 900 - 2,900: at 900 a window the debt would be repaid, and the
        # bucket full, in 0.32 s; Redis expired it a window after that.
        await asyncio.sleep(0.8)
        lim, now = Limits(tpm=10), T0 + 1.0
        level = bucket_level(-2_000.0, T0, now, 10, w)  # -1,900: still owing
        d = await s.admit(lim, ask(tokens=1), now)
        assert (d.allowed, d.reason, d.remaining_tokens) == (False, "tokens", -1_900)
        assert d.retry_after_s == pytest.approx((1 - level) * w / 10)
        # The largest debt there can be still fits an expiry Redis takes.
        await s.consume(lim, "k-owes", 0, MAX_EXACT, now)
        assert (await s.admit(lim, ask("k-owes", tokens=1), now)).reason == "tokens"
    finally:
        await s.close()


async def test_a_wait_starts_where_a_buckets_time_is(store: Any) -> None:
    """Time tester: serve restarted with its clock an hour back held the key refused
    (the buckets' time never goes back, so they refill nothing for that hour), and every
    429 said `retry-after: 20`. A wait, and a reset, start at the bucket's time."""
    lim = Limits(rpm=3, tpm=100)
    for _ in range(3):
        assert (await store.admit(lim, ask(tokens=30), T0)).allowed
    back = T0 - 3600.0  # the clock stepped back an hour
    d = await store.admit(lim, ask(tokens=30), back)
    assert (d.allowed, d.reason) == (False, "requests")
    assert d.retry_after_s == 20.0 + 3600.0 and d.reset_requests_s == 60.0 + 3600.0
    assert d.reset_tokens_s == 54.0 + 3600.0  # 90 of 100 tokens taken: 54 s to refill
    tokens = Limits(tpm=100)
    assert (await store.admit(tokens, ask("k2", tokens=100), T0)).allowed
    d = await store.admit(tokens, ask("k2", tokens=50), back)
    assert (d.reason, d.retry_after_s) == ("tokens", 30.0 + 3600.0)
    # With the clocks in step again, nothing changes: the same waits as ever.
    d = await store.admit(lim, ask(tokens=30), T0)
    assert (d.reason, d.retry_after_s, d.reset_requests_s) == ("requests", 20.0, 60.0)


async def test_a_request_that_can_never_fit_is_told_so_first(store: Any) -> None:
    """Streams tester: with the request rate spent, a request holding more tokens than
    the key's tpm got a retryable 429 (`requests`, retry in 5 s); the SDK waited, retried,
    and only then heard it could never fit. That is said first (no retry-after)."""
    lim = Limits(rpm=1, tpm=100)
    assert (await store.admit(lim, ask(tokens=10), T0)).allowed
    d = await store.admit(lim, ask(tokens=101), T0)
    assert (d.allowed, d.reason, d.retry_after_s) == (False, "tokens_too_large", None)
    d = await store.admit(lim, ask(tokens=10), T0)
    assert (d.reason, d.retry_after_s) == ("requests", 60.0)


async def test_both_rates_spent_say_the_longer_wait(store: Any) -> None:
    """Limits tester: with the request rate and the token rate both spent, the 429 said
    the request rate's wait alone (26 s); a client that waited that long was refused
    again by the tokens. The reason is the request rate, the wait the longer of the two."""
    lim = Limits(rpm=2, tpm=300)
    for _ in range(2):
        assert (await store.admit(lim, ask(tokens=100), T0)).allowed
    d = await store.admit(lim, ask(tokens=280), T0)  # 180 tokens short at 5 a second
    assert (d.reason, d.retry_after_s) == ("requests", pytest.approx(36.0))
    d = await store.admit(lim, ask(tokens=50), T0)  # the tokens fit: the request rate's
    assert (d.reason, d.retry_after_s) == ("requests", pytest.approx(30.0))
    assert not (await store.admit(lim, ask(tokens=280), T0 + 35.9)).allowed
    assert (await store.admit(lim, ask(tokens=280), T0 + 36.0)).allowed
