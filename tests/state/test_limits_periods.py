"""Time, in every limit store: budget periods and their boundaries, holds admitted in one
period and settled (or lost) in the next, and the rate limits under timestamps that do
not arrive in order (a request admitted with its start time after a later one, replicas
whose clocks differ, a clock stepped back).

The clock is injected: every call gets its `now`, so nothing here sleeps.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from authz.state.limits.durable import DurableMemoryLimitStore, lost_record_writer
from authz.state.limits.memory import MemoryLimitStore
from authz.state.limits.redis_limits import RedisLimitStore
from authz.state.usage.records import USAGE_FILE, read_records
from policy.limits import Ask, HoldRecord, Limits, period_id
from policy.usage import LOST
from tests.redis_server import RedisServer
from tests.state.test_limits_durable import kill


def ts(s: str) -> float:
    return datetime.fromisoformat(s).replace(tzinfo=UTC).timestamp()


_n = 0


def ask(key: str = "k1", *, tokens: int = 0, cost: int = 0, at: float, kind: str = "day",
        lease_s: float = 30.0) -> Ask:
    global _n
    _n += 1
    return Ask(f"p-{_n}", key, "acme", tokens, cost,
               period_id(kind, datetime.fromtimestamp(at, UTC)), lease_s)


# -- the token bucket: timestamps out of order ------------------------------------------


async def test_tpm_out_of_order_admissions_never_refill_twice(store: Any) -> None:
    """Admission's `now` is the request's start; a request whose body came slowly is
    admitted after later ones, with an earlier `now`. The interval between the two is
    refilled once, not again from the earlier stamp."""
    lim, t = Limits(tpm=600), ts("2026-03-01T12:00:00")
    assert (await store.admit(lim, ask(tokens=600, at=t + 30), t + 30)).allowed  # empty at t+30
    # A request that started at t (its body arrived late) cannot take anything...
    assert not (await store.admit(lim, ask(tokens=10, at=t), t)).allowed
    # ... and a 0-token request admitted with that earlier stamp takes nothing either.
    assert (await store.admit(lim, ask(tokens=0, at=t), t)).allowed
    # At t+31, one second of refill since the bucket was emptied: 10 tokens.
    d = await store.admit(lim, ask(tokens=11, at=t + 31), t + 31)
    assert not d.allowed and d.reason == "tokens"


async def test_tpm_settlement_with_an_older_clock_does_not_rewind_the_bucket(store: Any) -> None:
    """A replica whose clock is behind settles: the refund lands, the bucket's time stays."""
    lim, t = Limits(tpm=600), ts("2026-03-01T12:00:00")
    a = ask(tokens=600, at=t + 30, lease_s=60)
    assert (await store.admit(lim, a, t + 30)).allowed
    assert (await store.admit(lim, ask(tokens=0, at=t + 40), t + 40)).allowed
    await store.settle(lim, a, 300, 0, t + 35)  # 5 s behind: 300 unused tokens come back
    d = await store.admit(lim, ask(tokens=0, at=t + 40), t + 40)
    assert d.remaining_tokens == 400  # 10 s of refill (100) + 300, not 5 s more
    d = await store.admit(lim, ask(tokens=401, at=t + 40), t + 40)
    assert not d.allowed and d.reason == "tokens"


async def test_tpm_a_clock_stepped_back_admits_no_more(store: Any) -> None:
    """A clock stepped back a minute: the bucket refills from where it was, not again."""
    lim, t = Limits(tpm=600), ts("2026-03-01T12:00:00")
    assert (await store.admit(lim, ask(tokens=600, at=t), t)).allowed
    back = t - 60  # the step: the clock now reads a minute earlier
    assert not (await store.admit(lim, ask(tokens=1, at=back), back)).allowed
    assert not (await store.admit(lim, ask(tokens=1, at=back + 59), back + 59)).allowed
    d = await store.admit(lim, ask(tokens=10, at=t + 1), t + 1)
    assert d.allowed and d.remaining_tokens == 0


# -- budgets across a period's end -----------------------------------------------------

BOUNDARIES = [  # (kind, the last moment of a period, the first of the next)
    ("day", "2026-03-10T23:59:59.999000", "2026-03-11T00:00:00"),
    ("month", "2026-12-31T23:59:59.999000", "2027-01-01T00:00:00"),
    ("month", "2028-02-29T23:59:59.500000", "2028-03-01T00:00:00"),
    ("day", "2028-02-28T23:59:59.500000", "2028-02-29T00:00:00"),
]


@pytest.mark.parametrize(("kind", "last", "first"), BOUNDARIES)
async def test_a_hold_admitted_before_the_end_settles_in_its_own_period(
        store: Any, kind: str, last: str, first: str) -> None:
    lim = Limits(budget_nano=1000, budget_period=kind)
    t0, t1 = ts(last), ts(first)
    a = ask(cost=800, at=t0, kind=kind)
    assert (await store.admit(lim, a, t0)).allowed
    old, new = a.period, period_id(kind, datetime.fromtimestamp(t1, UTC))
    assert old != new
    # The new period starts empty: its budget is whole beside the old period's hold.
    b = ask(cost=1000, at=t1, kind=kind)
    assert b.period == new and (await store.admit(lim, b, t1)).allowed
    # Settled after the end: charged to the period it was admitted in, once.
    done = await store.settle(lim, a, 10, 300, t1 + 1)
    assert done.applied
    assert await store.budget("k1", "acme", old, t1 + 1) == (300, 0)
    assert await store.budget("k1", "acme", new, t1 + 1) == (0, 1000)
    assert not (await store.settle(lim, a, 10, 300, t1 + 2)).applied
    assert await store.budget("k1", "acme", old, t1 + 2) == (300, 0)
    await store.settle(lim, b, 10, 999, t1 + 2)
    assert await store.budget("k1", "acme", new, t1 + 2) == (999, 0)


@pytest.mark.parametrize(("kind", "last", "first"), BOUNDARIES)
async def test_a_lost_hold_is_charged_to_the_period_it_was_admitted_in(
        store: Any, kind: str, last: str, first: str) -> None:
    lim = Limits(budget_nano=1000, budget_period=kind)
    t0, t1 = ts(last), ts(first)
    a = ask(cost=700, at=t0, kind=kind, lease_s=30)
    assert (await store.admit(lim, a, t0)).allowed
    lost = await store.sweep(t1 + 30)
    assert [x.request_id for x in lost] == [a.request_id]
    assert await store.sweep(t1 + 31) == []
    new = period_id(kind, datetime.fromtimestamp(t1, UTC))
    assert await store.budget("k1", "acme", a.period, t1 + 31) == (700, 0)
    assert await store.budget("k1", "acme", new, t1 + 31) == (0, 0)
    # A late settlement corrects the old period's charge, not the new one's.
    done = await store.settle(lim, a, 5, 200, t1 + 40)
    assert done.applied and done.corrected
    assert await store.budget("k1", "acme", a.period, t1 + 41) == (200, 0)
    assert await store.budget("k1", "acme", new, t1 + 41) == (0, 0)


async def test_an_expired_hold_of_the_last_period_does_not_block_the_next(store: Any) -> None:
    """Not swept yet, the old period's expired hold neither counts in the new period nor
    is lost from the old one's ledger."""
    lim = Limits(budget_nano=1000, budget_period="day")
    t0, t1 = ts("2026-03-10T23:59:50"), ts("2026-03-11T00:00:30")
    a = ask(cost=1000, at=t0, lease_s=10)
    assert (await store.admit(lim, a, t0)).allowed
    b = ask(cost=1000, at=t1)
    assert (await store.admit(lim, b, t1)).allowed
    assert await store.budget("k1", "acme", a.period, t1) == (1000, 0)
    assert [x.request_id for x in await store.sweep(t1)] == [a.request_id]
    assert await store.budget("k1", "acme", a.period, t1) == (1000, 0)


async def test_a_restart_after_the_end_charges_the_old_periods(tmp_path: Path) -> None:
    """The embedded store killed with a hold in flight just before a year ends, started
    in the next: the hold is charged in full to the key's day and the org's month it was
    admitted in, and its one lost record names them."""
    t0, t1 = ts("2026-12-31T23:59:59.5"), ts("2027-01-01T00:05:00")
    key_lim = Limits(budget_nano=10_000, budget_period="day")
    org_lim = Limits(budget_nano=10_000, budget_period="month")
    day, month = "day:2026-12-31", "month:2026-12"
    rec = HoldRecord(model="demo", upstream_model="m", endpoint="chat", stream=True,
                     prompt_tokens=4, completion_tokens=6,
                     started_at="2026-12-31T23:59:59.5Z", key_budget_period=day,
                     org_budget_period=month)
    a = Ask("r-eoy", "k1", "acme", 10, 900, day, 60.0, rec)
    org_a = Ask("r-eoy", "org:acme", "acme", 10, 900, month, 60.0, None)
    store = DurableMemoryLimitStore(tmp_path, on_lost=lost_record_writer(tmp_path))
    await store.start()
    assert (await store.admit(org_lim, org_a, t0)).allowed
    assert (await store.admit(key_lim, a, t0)).allowed
    kill(store)
    again = DurableMemoryLimitStore(tmp_path, on_lost=lost_record_writer(tmp_path))
    await again.start()
    try:
        assert await again.budget("k1", "acme", day, t1) == (900, 0)
        assert await again.budget("org:acme", "acme", month, t1) == (900, 0)
        assert await again.budget("k1", "acme", "day:2027-01-01", t1) == (0, 0)
        assert await again.budget("org:acme", "acme", "month:2027-01", t1) == (0, 0)
        recs = list(read_records(tmp_path / USAGE_FILE))
        assert [(r["request_id"], r["status"], r["key_budget_period"],
                 r["org_budget_period"]) for r in recs] == [("r-eoy", LOST, day, month)]
        assert await again.sweep(t1) == []
    finally:
        await again.close()


async def test_memory_and_redis_agree_under_stamps_out_of_order(
        limits_redis: RedisServer) -> None:
    """Random admissions and settlements whose times wander back (slow bodies, skewed
    replicas, a step back) across a day's end: both stores decide alike, bit for bit."""
    import random

    with redis.Redis.from_url(limits_redis.url) as r:
        r.flushdb()
    mem, red = MemoryLimitStore(), RedisLimitStore(limits_redis.url, timeout_s=1.0)
    lim = Limits(rpm=12, tpm=3000, max_concurrent=4, budget_nano=50_000, budget_period="day")
    rng, clock = random.Random(7), ts("2026-03-10T23:58:00")
    held: list[Ask] = []
    reasons: set[str] = set()
    try:
        for _ in range(400):
            clock += rng.choice([0.0, 0.2, 1.5, 4.0])
            stamp = clock - rng.choice([0.0, 0.0, 0.5, 3.0, 30.0, 90.0])
            if held and rng.random() < 0.4:
                a = held.pop(rng.randrange(len(held)))
                used, cost = rng.randint(0, a.tokens), rng.randint(0, a.cost_nano)
                s1 = await mem.settle(lim, a, used, cost, stamp)
                s2 = await red.settle(lim, a, used, cost, stamp)
                assert s1 == s2
                continue
            a = ask(tokens=rng.randint(0, 900), cost=rng.randint(0, 9000), at=stamp,
                    lease_s=rng.choice([5.0, 60.0]))
            d1, d2 = await mem.admit(lim, a, stamp), await red.admit(lim, a, stamp)
            assert d1 == d2
            reasons.add(d1.reason)
            if d1.allowed:
                held.append(a)
            if rng.random() < 0.1:
                assert {x.request_id for x in await mem.sweep(clock)} == {
                    x.request_id for x in await red.sweep(clock)}
        assert {"", "requests", "tokens"} <= reasons
        for p in ("day:2026-03-10", "day:2026-03-11"):
            assert await mem.budget("k1", "acme", p, clock) == await red.budget(
                "k1", "acme", p, clock)
    finally:
        await red.close()
