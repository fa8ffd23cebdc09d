"""The limits hold under concurrency, under random histories, and through a Redis outage.

- Many concurrent admit -> settle tasks over two Redis replicas never pass the budget
  but by the overruns they report (the ledger charges the real cost).
- A hypothesis state machine checks MemoryLimitStore against a naive reference model.
- The same random history gives identical Decisions from memory and Redis.
- Redis stopped or frozen mid-run: calls fail fast with LimitStoreUnavailable, and the
  same store works again once Redis is back.
"""

from __future__ import annotations

import asyncio
import math
import random
import signal
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from authz.state.limits.base import LimitStoreUnavailable
from authz.state.limits.memory import MemoryLimitStore
from authz.state.limits.redis_limits import RedisLimitStore
from policy.admission import Settled
from policy.limits import (
    Ask,
    Limits,
    bucket_level,
    bucket_refund,
    bucket_take,
    gcra,
)
from tests.redis_server import RedisServer

T0 = 1_700_000_000.0
T = TypeVar("T")


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("limits-redis-conc"))
    server.start()
    yield server
    server.stop()


def fresh_url(server: RedisServer) -> str:
    with redis.Redis.from_url(server.url) as r:
        r.flushdb()
    return server.url


# -- the budget never passes, with two replicas racing -------------------------------------


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_budget_never_exceeded_under_concurrency(kind: str,
                                                       request: pytest.FixtureRequest) -> None:
    if kind == "memory":
        mem = MemoryLimitStore()
        replicas: list[Any] = [mem, mem]
    else:
        url = fresh_url(request.getfixturevalue("shared_redis"))
        replicas = [RedisLimitStore(url, timeout_s=2.0), RedisLimitStore(url, timeout_s=2.0)]
    budget, max_conc, p = 20_000, 12, "day:2025-01-01"
    lim = Limits(max_concurrent=max_conc, budget_nano=budget)
    rng = random.Random(7)
    charges: list[int] = []
    overruns: list[int] = []
    in_flight = peak = 0
    denied: dict[str, int] = {}

    async def one(i: int) -> None:
        nonlocal in_flight, peak
        worst = rng.randint(1, 2_000)
        actual = rng.choice([0, worst, rng.randint(0, worst), worst + 500])  # an overrun too
        a = Ask(f"r{i}", "k1", "acme", 0, worst, p, 60.0)
        store = replicas[i % 2]
        await asyncio.sleep(rng.random() * 0.3)  # arrivals spread over 300 ms
        d = await store.admit(lim, a, time.time())
        if not d.allowed:
            denied[d.reason] = denied.get(d.reason, 0) + 1
            return
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(rng.random() * 0.01)
        in_flight -= 1
        done = await store.settle(lim, a, 0, actual, time.time())
        assert done == Settled(True, max(0, actual - worst))
        charges.append(actual)
        overruns.append(done.overrun_nano)

    try:
        await asyncio.gather(*(one(i) for i in range(200)))
        spent, reserved = await replicas[0].budget("k1", "acme", p, time.time())
        assert (spent, reserved) == (sum(charges), 0)
        assert spent - sum(overruns) <= budget  # the holds alone never passed it
        assert sum(overruns) > 0  # overruns happened, and were charged
        assert peak <= max_conc
        assert charges and denied.get("budget", 0) + denied.get("budget_held", 0) > 0  # contended
    finally:
        for s in {id(s): s for s in replicas}.values():
            await s.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_concurrency_cap_holds_across_replicas(kind: str,
                                                     request: pytest.FixtureRequest) -> None:
    if kind == "memory":
        mem = MemoryLimitStore()
        replicas: list[Any] = [mem, mem]
    else:
        url = fresh_url(request.getfixturevalue("shared_redis"))
        replicas = [RedisLimitStore(url, timeout_s=2.0), RedisLimitStore(url, timeout_s=2.0)]
    lim, cap = Limits(max_concurrent=5), 5
    in_flight = peak = admitted = refused = 0

    async def one(i: int) -> None:
        nonlocal in_flight, peak, admitted, refused
        a, store = Ask(f"c{i}", "k1", "acme", 0, 0, "total", 60.0), replicas[i % 2]
        for _ in range(20):  # retry until admitted, like a patient client
            if (await store.admit(lim, a, time.time())).allowed:
                break
            refused += 1
            await asyncio.sleep(0.005)
        else:
            return
        admitted += 1
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        await store.settle(lim, a, 0, 0, time.time())

    try:
        await asyncio.gather(*(one(i) for i in range(60)))
        assert peak <= cap and admitted > 2 * cap and refused > 0  # contended, never over
        # Every lease was released: a full set fits again at once.
        rs = [await replicas[0].admit(lim, Ask(f"z{i}", "k1", "acme", 0, 0, "total", 60.0),
                                      time.time()) for i in range(cap + 1)]
        assert [d.allowed for d in rs] == [True] * cap + [False]
    finally:
        for s in {id(s): s for s in replicas}.values():
            await s.close()


# -- MemoryLimitStore against a naive reference model -------------------------------------


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a memory-store call to completion; it must never await (that is its atomicity)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("MemoryLimitStore awaited inside a call")


@dataclass
class Held:
    ask: Ask
    exp: float
    tokens: int


class MemoryVsModel(RuleBasedStateMachine):
    """The model keeps every reservation in a list and recomputes sums from scratch. A
    hold whose lease ended unsettled is spent in full (lost) until it settles; the ledger
    is read before each settlement, so one after the lease always finds the lost charge
    to correct."""

    LIM = Limits(rpm=6, tpm=500, max_concurrent=3, budget_nano=10_000)

    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryLimitStore()
        self.now = T0
        self.period = "p0"
        self.n = 0
        self.requests, self.rts = 6.0, T0
        self.level, self.ts = 500.0, T0
        self.held: list[Held] = []  # admitted, unsettled (lost ones linger until settled)
        self.swept: set[str] = set()  # request ids the sweep claimed
        self.spent: dict[str, int] = {}  # by settlements, per period
        self.overrun: dict[str, int] = {}  # charged past the holds, per period
        self.settled: list[Ask] = []

    def live(self) -> list[Held]:
        return [h for h in self.held if h.exp > self.now]

    def reserved(self, period: str) -> int:
        return sum(h.ask.cost_nano for h in self.live() if h.ask.period == period)

    def spent_in(self, period: str) -> int:
        lost = sum(h.ask.cost_nano for h in self.held
                   if h.exp <= self.now and h.ask.period == period)
        return self.spent.get(period, 0) + lost

    @rule(dt=st.sampled_from([0.0, 0.001, 0.5, 1.0, 3.3, 5.0, 10.0, 29.9, 61.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def new_period(self) -> None:
        self.period = f"p{int(self.period[1:]) + 1}"

    @rule(tokens=st.integers(0, 600), cost=st.integers(0, 6_000),
          lease=st.sampled_from([1.0, 5.0, 40.0]))
    def admit(self, tokens: int, cost: int, lease: float) -> None:
        self.n += 1
        a = Ask(f"r{self.n}", "k", "o", tokens, cost, self.period, lease)
        d = run_sync(self.store.admit(self.LIM, a, self.now))
        # The reference decision, checks in the protocol's order.
        g = gcra(bucket_level(self.requests, self.rts, self.now, 6), 6)
        level = bucket_level(self.level, self.ts, self.now, 500)
        ok_t, after, _ = bucket_take(level, tokens, 500)
        spent = self.spent_in(self.period)
        expect = ("tokens_too_large" if tokens > 500  # never admissible: said first
                  else "requests" if not g.allowed
                  else "concurrency" if len(self.live()) >= 3
                  else "tokens" if not ok_t
                  else "budget" if spent + cost > 10_000
                  else "budget_held" if spent + self.reserved(self.period) + cost > 10_000
                  else "")
        assert (d.allowed, d.reason) == (expect == "", expect)
        assert d.remaining_tokens == math.floor(after if d.allowed else level)
        if d.allowed:
            self.requests, self.rts = g.level, self.now
            self.level, self.ts = after, self.now
            self.held.append(Held(a, self.now + lease, tokens))

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data(), frac=st.floats(0, 1.5), cost_frac=st.floats(0, 1.5))
    def settle(self, data: st.DataObject, frac: float, cost_frac: float) -> None:
        h = data.draw(st.sampled_from(self.held))
        used, cost = int(h.tokens * frac), int(h.ask.cost_nano * cost_frac)
        run_sync(self.store.budget("k", "o", h.ask.period, self.now))  # any lost: charged
        done = run_sync(self.store.settle(self.LIM, h.ask, used, cost, self.now))
        self.held.remove(h)
        self.settled.append(h.ask)
        over = max(0, cost - h.ask.cost_nano)
        live = h.exp > self.now
        assert done == Settled(True, over, max(0, used - h.ask.tokens), corrected=not live)
        p = h.ask.period  # charged in full either way: the real cost replaces a lost charge
        self.spent[p] = self.spent.get(p, 0) + cost
        self.overrun[p] = self.overrun.get(p, 0) + over
        if live and used <= h.tokens:  # only a live hold gives back its unused tokens,
            self.level += h.tokens - used  # added as stored (admission.give_back)
        elif live:  # an overrun: taken from the bucket as it is now
            level = bucket_level(self.level, self.ts, self.now, 500)
            self.level, self.ts = bucket_refund(level, h.tokens, used, 500), self.now

    @rule()
    def sweep(self) -> None:
        lost = run_sync(self.store.sweep(self.now))
        expect = {h.ask.request_id for h in self.held
                  if h.exp <= self.now and h.ask.request_id not in self.swept}
        assert sorted(a.request_id for a in lost) == sorted(expect)
        self.swept |= expect

    @precondition(lambda self: bool(self.settled))
    @rule(data=st.data())
    def settle_again(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(self.settled))
        done = run_sync(self.store.settle(self.LIM, a, 0, a.cost_nano, self.now))  # a no-op
        assert not done.applied

    @invariant()
    def ledger_matches_and_never_passes_the_budget(self) -> None:
        """Only an overrun (a hold that was not the worst case) takes spent past it."""
        spent, reserved = run_sync(self.store.budget("k", "o", self.period, self.now))
        assert (spent, reserved) == (self.spent_in(self.period), self.reserved(self.period))
        assert reserved >= 0
        assert spent - self.overrun.get(self.period, 0) + reserved <= 10_000

    @invariant()
    def tokens_and_leases_within_limits(self) -> None:
        assert bucket_level(self.level, self.ts, self.now, 500) <= 500
        assert len(self.live()) <= 3


MemoryVsModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                           deadline=None)
TestMemoryVsModel = MemoryVsModel.TestCase


# -- memory and Redis agree, decision for decision ------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_memory_and_redis_agree(seed: int, shared_redis: RedisServer) -> None:
    mem, red = MemoryLimitStore(), RedisLimitStore(fresh_url(shared_redis), timeout_s=2.0)
    rng = random.Random(seed)
    limit_sets = [Limits(rpm=7, tpm=900, max_concurrent=4, budget_nano=25_000),
                  Limits(rpm=3), Limits(tpm=333), Limits(max_concurrent=2, budget_nano=5_000)]
    now, admitted, lost = T0 + rng.random(), 0, 0
    open_asks: list[tuple[Limits, Ask]] = []
    try:
        for i in range(600):
            now += rng.choice([0.0, 0.0, 0.013, 0.77, 1.0 / 3.0, 4.9, 17.0])
            op = rng.random()
            if op < 0.05:  # the lost holds: the same ones, claimed once
                swept = [sorted(x.request_id for x in await s.sweep(now)) for s in (mem, red)]
                assert swept[0] == swept[1], i
                lost += len(swept[0])
            elif op < 0.6 or not open_asks:
                key = rng.randrange(len(limit_sets))
                lim = limit_sets[key]
                a = Ask(f"r{i}", f"k{key}", "o", rng.randint(0, 400), rng.randint(0, 7_000),
                        rng.choice(["day:a", "day:b"]), rng.choice([2.5, 20.0]))
                dm, dr = await mem.admit(lim, a, now), await red.admit(lim, a, now)
                assert dm == dr, (i, a)
                admitted += dm.allowed
                if dm.allowed:
                    open_asks.append((lim, a))
            else:
                lim, a = open_asks.pop(rng.randrange(len(open_asks)))
                used, cost = rng.randint(0, a.tokens + 50), rng.randint(0, a.cost_nano + 99)
                settled = [await s.settle(lim, a, used, cost, now) for s in (mem, red)]
                assert settled[0] == settled[1], (i, a)
            if i % 50 == 0:
                for k, p in [("k0", "day:a"), ("k3", "day:b")]:
                    assert await mem.budget(k, "o", p, now) == await red.budget(k, "o", p, now)
        assert admitted > 100 and lost > 10
    finally:
        await red.close()


def _limits(rng: random.Random) -> Limits:
    return Limits(rpm=rng.choice([None, 1, 3, 7]), tpm=rng.choice([None, 50, 333, 900]),
                  max_concurrent=rng.choice([None, 1, 2, 4]),
                  budget_nano=rng.choice([None, 0, 5_000, 25_000]))


@pytest.mark.parametrize("seed", [11, 12, 13])
async def test_every_store_agrees_through_limit_changes_and_restarts(
        seed: int, shared_redis: RedisServer, tmp_path: Path) -> None:
    """Memory, Redis and the journaled store, driven by one random history in which
    keys' limits change between requests (keys update: a request settles under the
    limits it was admitted with, or, as a check, under the new ones), usage admitted
    elsewhere is counted, the clock sometimes steps back, and the journaled store
    restarts when nothing is in flight:
    the same Decisions, settlements, lost holds and ledgers, step for step."""
    from authz.state.limits.durable import DurableMemoryLimitStore

    def durable() -> DurableMemoryLimitStore:
        return DurableMemoryLimitStore(tmp_path / "state", compact_bytes=4_000)

    rng = random.Random(seed)
    red = RedisLimitStore(fresh_url(shared_redis), timeout_s=2.0)
    dur = durable()
    await dur.start()
    stores: list[Any] = [MemoryLimitStore(), red, dur]
    keys = {f"k{i}": _limits(rng) for i in range(3)}
    now, admitted, restarts = T0 + rng.random(), 0, 0
    open_asks: list[tuple[Limits, Ask]] = []
    try:
        for i in range(700):
            now += rng.choice([0.0, 0.0, 0.013, 0.77, 1.0 / 3.0, 4.9, 17.0, -0.5, -3.0])
            op = rng.random()
            if op < 0.04:
                keys[rng.choice(list(keys))] = _limits(rng)
            elif op < 0.08:
                swept = [sorted(a.request_id for a in await s.sweep(now)) for s in stores]
                assert swept[0] == swept[1] == swept[2], i
            elif op < 0.1:
                k = rng.choice(list(keys))
                n, t = rng.randint(0, 3), rng.randint(0, 300)
                for s in stores:
                    await s.consume(keys[k], k, n, t, now)
            elif op < 0.12 and not open_asks:
                await dur.close()
                stores[2] = dur = durable()
                await dur.start()
                restarts += 1
            elif op < 0.65 or not open_asks:
                k = rng.choice(list(keys))
                a = Ask(f"r{i}", k, "o", rng.randint(0, 400), rng.randint(0, 7_000),
                        rng.choice(["day:a", "day:b"]), rng.choice([2.5, 20.0]))
                look = await stores[0].admit(keys[k], a, now, take=False)
                ds = [await s.admit(keys[k], a, now) for s in stores]
                assert ds[0] == ds[1] == ds[2] == look, (i, a)
                admitted += ds[0].allowed
                if ds[0].allowed:
                    open_asks.append((keys[k], a))
            else:
                lim, a = open_asks.pop(rng.randrange(len(open_asks)))
                lim = keys[a.key_id] if rng.random() < 0.3 else lim
                used, cost = rng.randint(0, a.tokens + 50), rng.randint(0, a.cost_nano + 99)
                done = [await s.settle(lim, a, used, cost, now) for s in stores]
                assert done[0] == done[1] == done[2], (i, a)
            if i % 25 == 0:
                for k in keys:
                    for p in ("day:a", "day:b"):
                        b = [await s.budget(k, "o", p, now) for s in stores]
                        assert b[0] == b[1] == b[2], (i, k, p)
        assert admitted > 50 and restarts > 0
    finally:
        await red.close()
        await dur.close()


# -- Redis goes away mid-run ------------------------------------------------------------------


async def test_redis_outage_fails_fast_and_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    timeout = 0.2
    store = RedisLimitStore(server.url, timeout_s=timeout)
    lim, p = Limits(rpm=100, budget_nano=1_000), "total"
    try:
        a = Ask("a", "k", "o", 0, 100, p, 60.0)
        assert (await store.admit(lim, a, T0)).allowed

        async def fails_fast(coro: Coroutine[Any, Any, Any]) -> None:
            t0 = time.monotonic()
            with pytest.raises(LimitStoreUnavailable):
                await coro
            assert time.monotonic() - t0 < timeout + 0.3

        # Frozen (a hung server): every call is bounded by the socket timeout.
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            await fails_fast(store.admit(lim, Ask("b", "k", "o", 0, 1, p, 60.0), T0))
            await fails_fast(store.settle(lim, a, 0, 50, T0))
            await fails_fast(store.budget("k", "o", p, T0))
        finally:
            server.proc.send_signal(signal.SIGCONT)
        # Stopped: refused at once.
        server.stop()
        await fails_fast(store.admit(lim, Ask("c", "k", "o", 0, 1, p, 60.0), T0))
        await fails_fast(store.settle(lim, a, 0, 50, T0))

        server.start()  # the same port, an empty database
        deadline = time.monotonic() + 5
        while True:
            try:
                d = await store.admit(lim, Ask("d", "k", "o", 0, 1_000, p, 60.0), T0)
                break
            except LimitStoreUnavailable:
                assert time.monotonic() < deadline, "never recovered"
                await asyncio.sleep(0.05)
        assert d.allowed  # this Redis kept nothing: the old hold is gone
        assert await store.budget("k", "o", p, T0) == (0, 1_000)
    finally:
        await store.close()
        server.stop()


async def test_redis_down_at_start_does_not_block(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # never started
    store = RedisLimitStore(server.url, timeout_s=0.2)
    t0 = time.monotonic()
    await store.start()
    assert time.monotonic() - t0 < 0.1
    try:
        with pytest.raises(LimitStoreUnavailable):
            await store.admit(Limits(rpm=1), Ask("a", "k", "o", 0, 0, "total", 1.0), T0)
    finally:
        await store.close()
