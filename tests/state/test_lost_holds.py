"""Lost holds: a request admitted and never settled (its replica died) is charged at its
full hold and leaves exactly one `lost` usage record, written by whichever replica's
sweep claims it; a late settlement corrects the charge, and readers then prefer its
real record. Every test checks: spend within the budget, ledger = sum of the records'
costs, one record per admitted request. The clock is injected; nothing sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import redis

from authz.state.limits import redis_limits
from authz.state.limits.admission import Admission
from authz.state.limits.base import LimitStore, LimitStoreUnavailable
from authz.state.limits.memory import MemoryLimitStore
from authz.state.limits.redis_limits import CLAIM_S, DUE, EPOCH, RedisLimitStore
from authz.state.limits.redis_scripts import CLAIM
from authz.state.usage.records import one_per_request
from policy.config import OnStoreError
from policy.errors import ApiError
from policy.limits import Ask, Limits
from policy.usage import LOST
from tests.redis_server import RedisServer
from tests.state.money import T0, Clock, P, ask, ledger_is_the_records, real_record


async def test_each_lost_hold_is_claimed_once_with_one_record(
    two_limit_stores: list[LimitStore],
) -> None:
    clock, records = Clock(), []  # both replicas write to one usage log
    reps = [Admission(s, on_lost=lambda r: records.append(r.to_dict()), clock=clock)
            for s in two_limit_stores]
    lim = Limits(budget_nano=10_000, max_concurrent=40)
    asks = [ask(i) for i in range(30)]
    for i, a in enumerate(asks):
        assert (await reps[i % 2].admit(lim, a, clock.at())).allowed
    for a in asks[:10]:  # these ended: record, then settlement
        records.append(real_record(a, 120))
        await reps[0].settle(lim, a, 25, 120, clock.at(1))
    clock.t += 4.999
    assert await asyncio.gather(*(r.sweep() for r in reps)) == [0, 0]  # still live
    clock.t += 0.001  # the rest were on a replica that died: their leases end
    assert sum(await asyncio.gather(*(r.sweep() for r in reps))) == 20
    assert await asyncio.gather(*(r.sweep() for r in reps)) == [0, 0]
    lost = [r for r in records if r["status"] == LOST]
    assert sorted(r["request_id"] for r in lost) == sorted(a.request_id for a in asks[10:])
    assert lost[0] | {"request_id": "x"} == {
        "request_id": "x", "key_id": "k1", "org": "acme", "model": "demo",
        "upstream_model": "tiny", "backend": "", "prompt_tokens": 20,
        "completion_tokens": 10, "total_tokens": 30, "cost_usd": "0.0000003",
        "status": LOST, "stream": True, "estimated": True,
        "started_at": "2023-11-14T22:13:20Z", "duration_ms": 5000.0, "endpoint": "chat",
        # The ledgers it was charged to, kept with the hold (in Redis: its JSON).
        "key_budget_period": P, "org_budget_period": None,
        # A lost record is estimated: the audit against vLLM does not weigh it.
        "sequences": 1,
        # Its hold, which it was charged: what the backend could have counted at most.
        "prompt_bound": 20, "completion_bound": 10}
    assert reps[0].lost_records + reps[1].lost_records == 20
    spent, reserved = await two_limit_stores[0].budget("k1", "acme", P, clock())
    assert (spent, reserved) == (10 * 120 + 20 * 300, 0) and spent <= 10_000
    ledger_is_the_records(spent, records, 30)
    # One of them settles after all (a settlement spooled through an outage): the charge
    # becomes its real cost, and its real record supersedes the lost one.
    late = asks[29]
    records.append(real_record(late, 80))
    done = await reps[1].settle(lim, late, 25, 80, clock.at())
    assert done.applied and done.corrected
    spent, _ = await two_limit_stores[1].budget("k1", "acme", P, clock())
    assert spent == 10 * 120 + 19 * 300 + 80
    ledger_is_the_records(spent, records, 30)
    assert not (await reps[0].settle(lim, late, 25, 80, clock.at())).applied  # once


async def test_replicas_whose_clocks_disagree_agree_on_leases(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Time tester: a replica whose clock ran 5 minutes ahead of another's (both sharing
    one Redis) took the other's running request for ended: it freed its concurrency
    slot (max_concurrent 1 admitted three) and charged it in full as lost while it ran.
    Leases run on Redis' clock, read through each replica's measured offset."""
    url = own_redis.url
    on_time, ahead = RedisLimitStore(url, timeout_s=2.0), RedisLimitStore(url, timeout_s=2.0)
    real_time, skew, shift = time.time, 300.0, [0.0]
    monkeypatch.setattr(time, "time", lambda: real_time() + shift[0])

    async def as_ahead(call: Any) -> Any:  # a call made on the replica whose clock is ahead
        shift[0] = skew
        try:
            return await call
        finally:
            shift[0] = 0.0

    try:
        assert await on_time.sweep(real_time()) == []  # each measures its offset
        assert await as_ahead(ahead.sweep(real_time() + skew)) == []
        lim, t = Limits(max_concurrent=1, budget_nano=10_000), real_time()
        running = ask(1, lease=60.0)
        assert (await on_time.admit(lim, running, t)).allowed
        # 10 s later by either clock: the first request still runs.
        later = t + 10 + skew
        decision = await as_ahead(ahead.admit(lim, ask(2), later))
        assert (decision.allowed, decision.reason) == (False, "concurrency")
        assert await as_ahead(ahead.sweep(later)) == []  # not lost
        assert await as_ahead(ahead.budget("k1", "acme", P, later)) == (0, 300)
        # Its lease ends 60 s after it began, by Redis' clock, whichever replica looks.
        assert await as_ahead(ahead.sweep(t + 59 + skew)) == []
        assert await as_ahead(ahead.sweep(t + 60.5 + skew)) == [running]
        assert await on_time.budget("k1", "acme", P, t + 61) == (300, 0)
        assert (await on_time.admit(lim, ask(3), t + 61)).allowed
    finally:
        for s in (on_time, ahead):
            await s.close()


async def test_a_replica_whose_clock_steps_while_running_measures_it_at_once(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Retest tester: a replica whose wall clock stepped 5 minutes ahead while it ran
    (NTP, a VM resumed) freed the other's slots and charged its streams as lost within a
    second: the offset was measured again only at the next sweep's 10 s. A step is seen
    at the next call, and the offset measured then."""
    url = own_redis.url
    steady, stepped = RedisLimitStore(url, timeout_s=2.0), RedisLimitStore(url, timeout_s=2.0)
    real_time, shift = time.time, [0.0]
    monkeypatch.setattr(time, "time", lambda: real_time() + shift[0])
    try:
        assert await steady.sweep(real_time()) == []
        assert await stepped.sweep(real_time()) == []  # both measured in step
        lim, t = Limits(max_concurrent=1), real_time()
        assert (await steady.admit(lim, ask(1, lease=60.0), t)).allowed
        shift[0] = 300.0  # the stepped replica's clock jumps; its next call sees it
        decision = await stepped.admit(lim, ask(2), t + 5 + 300)
        assert (decision.allowed, decision.reason) == (False, "concurrency")
        assert await stepped.sweep(t + 5 + 300) == []
    finally:
        for s in (steady, stepped):
            await s.close()


async def test_a_claim_left_by_a_dead_sweeper_returns(own_redis: RedisServer) -> None:
    """A replica that claimed index entries and died before settling them: the entries
    come back to the sweep after CLAIM_S, and are still claimed once."""
    url = own_redis.url
    dead, alive = RedisLimitStore(url, timeout_s=2.0), RedisLimitStore(url, timeout_s=2.0)
    clock, records = Clock(), []
    adm = Admission(alive, on_lost=lambda r: records.append(r.to_dict()), clock=clock)
    lim = Limits(tpm=1000)
    for i in range(3):
        assert (await adm.admit(lim, ask(i), clock.at())).allowed
    clock.t += 5.0
    claimed = await dead._call(dead._redis.evalsha(
        CLAIM, [DUE], [repr(clock()), repr(clock() + CLAIM_S), "2"]))
    assert len(claimed) == 2
    assert await adm.sweep() == 1  # the one not claimed
    clock.t += CLAIM_S
    assert await adm.sweep() == 2 and await adm.sweep() == 0
    assert sorted(r["request_id"] for r in records) == ["r0", "r1", "r2"]
    with redis.Redis.from_url(url) as r:
        assert r.zcard(DUE) == 0  # and the index is empty again
    for s in (dead, alive):
        await s.close()


async def test_the_index_holds_only_requests_in_flight(own_redis: RedisServer) -> None:
    url = own_redis.url
    store = RedisLimitStore(url, timeout_s=2.0)
    lim = Limits(budget_nano=500)
    assert (await store.admit(lim, ask(1), T0)).allowed
    for i in range(2, 6):
        assert (await store.admit(lim, ask(i), T0)).reason == "budget_held"
    await asyncio.sleep(0.05)  # the removals run in the background
    with redis.Redis.from_url(url) as r:
        assert r.zcard(DUE) == 1  # the index holds what is in flight, no more
        assert (await store.settle(lim, ask(1), 0, 100, T0 + 1)).applied
        assert r.zcard(DUE) == 0
    assert await store.sweep(T0 + 100) == []
    await store.close()


async def test_an_early_index_entry_moves_to_its_holds_expiry(own_redis: RedisServer) -> None:
    """An entry left by an earlier hold of the same request_id (a lost removal) must not
    cost a live hold its entry: the sweep moves it to the hold's expiry."""
    url = own_redis.url
    store, a = RedisLimitStore(url, timeout_s=2.0), ask(1)
    with redis.Redis.from_url(url) as r:
        r.zadd(DUE, {orjson.dumps([a.key_id, a.period, a.request_id]).decode(): T0 - 1})
        assert (await store.admit(Limits(tpm=100), a, T0)).allowed
        assert await store.sweep(T0 + 1) == []
        assert r.zrange(DUE, 0, -1, withscores=True) == [
            (orjson.dumps([a.key_id, a.period, a.request_id]), T0 + 5)]
    assert await store.sweep(T0 + 5) == [a]
    await store.close()


async def test_one_record_per_request_with_an_org_limit() -> None:
    """The key's hold carries the record; its org's hold is charged too but writes none,
    unless the key holds nothing, and then the record names the key."""
    clock, records = Clock(), []
    store = MemoryLimitStore()
    adm = Admission(store, on_lost=lambda r: records.append(r.to_dict()), clock=clock)
    org_lim = Limits(budget_nano=5_000)
    for i, key_lim in enumerate([Limits(budget_nano=1_000), Limits(rpm=10)]):
        a = ask(i, key=f"k{i}")
        org = (org_lim, Ask(a.request_id, "org:acme", "acme", a.tokens, a.cost_nano, P,
                            a.lease_s, a.record))
        assert (await adm.admit_all(org, key_lim, a, clock.at())).allowed
    clock.t += 5.0
    assert await adm.sweep() == 2
    assert sorted((r["request_id"], r["key_id"]) for r in records) == [
        ("r0", "k0"), ("r1", "k1")]
    assert await store.budget("org:acme", "acme", P, clock()) == (600, 0)
    assert await store.budget("k0", "acme", P, clock()) == (300, 0)
    ledger_is_the_records(300, [r for r in records if r["key_id"] == "k0"], 1)


async def test_the_background_task_sweeps() -> None:
    clock, records = Clock(), []
    adm = Admission(MemoryLimitStore(), on_lost=lambda r: records.append(r.to_dict()),
                    clock=clock, sweep_s=0.01)
    assert (await adm.admit(Limits(max_concurrent=1), ask(1), clock.at())).allowed
    await adm.start()
    clock.t += 5.0
    for _ in range(200):
        if records:
            break
        await asyncio.sleep(0.01)
    await adm.close()
    assert [r["request_id"] for r in records] == ["r1"] and adm.lost_records == 1


def test_readers_prefer_a_real_record_over_a_lost_one() -> None:
    lost = {"request_id": "a", "status": LOST, "cost_usd": "0.3"}
    real = {"request_id": "a", "status": 200, "cost_usd": "0.1"}
    other = {"request_id": "b", "status": 499, "cost_usd": "0"}
    assert list(one_per_request([lost, other, real, lost])) == [real, other]
    assert list(one_per_request([real, lost, other])) == [real, other]
    assert list(one_per_request([lost, lost | {"cost_usd": "9"}])) == [lost]
    assert list(one_per_request([real, real | {"cost_usd": "9"}])) == [real]


async def test_an_org_rate_limit_shows_in_the_admitted_headers() -> None:
    """A key with no rate limits of its own, in an org with an RPM: the admitted
    response's headers are the org's (they showed nothing, though a 429 named it)."""
    clock = Clock()
    adm = Admission(MemoryLimitStore(), clock=clock)
    a = ask(1, key="k1")
    org = (Limits(rpm=60), Ask(a.request_id, "org:acme", "acme", a.tokens, a.cost_nano, P,
                               a.lease_s, a.record))
    d = await adm.admit_all(org, Limits(budget_nano=10**6), a, clock.at())
    assert (d.allowed, d.limit_requests, d.remaining_requests) == (True, 60, 59)


async def test_redis_that_lost_its_data_is_noticed(own_redis: RedisServer) -> None:
    """Redis restarted without persistence (or flushed) has forgotten every ledger and
    hold: the replicas say so (an error, `on_reset`) once, at their next sweep, for
    each loss, and carry on with the new data."""
    resets: list[int] = []
    stores = [RedisLimitStore(own_redis.url, timeout_s=2.0,
                              on_reset=lambda i=i: resets.append(i)) for i in range(2)]
    try:
        for s in stores:
            assert await s.check_epoch() and await s.check_epoch()
        redis.Redis.from_url(own_redis.url).flushall()
        assert [await s.check_epoch() for s in stores] == [False, False]
        assert sorted(resets) == [0, 1]
        assert [await s.check_epoch() for s in stores] == [True, True]
        own_redis.stop()
        own_redis.start()  # no persistence: empty again
        for _ in range(2):  # the first call may find the old connection closed
            with contextlib.suppress(LimitStoreUnavailable):
                await stores[0].sweep(T0)
                break
        assert sorted(resets) == [0, 0, 1]
        try:
            kept = await stores[1].check_epoch()
        except LimitStoreUnavailable:  # the old connection, closed: once
            kept = await stores[1].check_epoch()
        assert not kept
        assert sorted(resets) == [0, 0, 1, 1]
    finally:
        for s in stores:
            await s.close()


async def test_a_hold_redis_lost_is_still_charged_once_at_its_settlement(
        own_redis: RedisServer) -> None:
    """Requests in flight when Redis lost its data settle against nothing: their cost
    goes to the (new) ledger all the same, once, however often the settlement repeats;
    with no loss, a repeated settlement charges nothing more."""
    lim = Limits(budget_nano=10_000, max_concurrent=5)
    store = RedisLimitStore(own_redis.url, timeout_s=2.0)
    try:
        await store.check_epoch()
        a, b = ask(1), ask(2)
        assert (await store.admit(lim, a, T0)).allowed
        assert (await store.admit(lim, b, T0)).allowed
        assert (await store.settle(lim, a, 25, 200, T0 + 1)).applied
        assert not (await store.settle(lim, a, 25, 200, T0 + 1)).applied  # a repeat
        assert await store.budget("k1", "acme", P, T0 + 1) == (200, 300)
        redis.Redis.from_url(own_redis.url).flushall()
        done = await store.settle(lim, b, 25, 250, T0 + 2)
        assert done.applied
        assert await store.budget("k1", "acme", P, T0 + 2) == (250, 0)
        assert not (await store.settle(lim, b, 25, 250, T0 + 2)).applied
        assert await store.budget("k1", "acme", P, T0 + 2) == (250, 0)
    finally:
        await store.close()


async def test_a_hold_admitted_just_after_redis_lost_its_data_is_charged_once(
        own_redis: RedisServer) -> None:
    """Review: admitted in the second after a flush, before the sweep read the new data
    mark, a hold was tagged with the old one; its settlement, replayed from the spool
    after the first had landed (a late reply), read as a hold Redis lost and charged its
    cost again. The mark is read with the admission now."""
    lim = Limits(budget_nano=10_000, max_concurrent=5)
    store = RedisLimitStore(own_redis.url, timeout_s=2.0)
    try:
        await store.check_epoch()
        client = redis.Redis.from_url(own_redis.url)
        old = client.get(EPOCH)
        client.flushall()
        b = ask(2)
        assert (await store.admit(lim, b, T0)).allowed  # no sweep since the flush
        mark = store.admitted_under(b)
        assert mark is not None and mark.encode() == client.get(EPOCH) != old
        assert (await store.settle(lim, b, 25, 250, T0 + 1)).applied
        store.admitted_under_was(b, mark)  # the spooled copy, replayed
        assert not (await store.settle(lim, b, 25, 250, T0 + 2)).applied
        assert await store.budget("k1", "acme", P, T0 + 2) == (250, 0)
    finally:
        await store.close()


async def test_a_redis_that_may_evict_keys_is_named_an_error(
        own_redis: RedisServer, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With a maxmemory and an evicting policy, a full Redis drops ledgers (an idle key's
    first, under LRU) and its spend is forgotten: the sweep says so, once per policy.
    noeviction, or no maxmemory, says nothing (a full Redis then refuses writes)."""
    client = redis.Redis.from_url(own_redis.url)
    # Every sweep reads the policy (once a minute in production), so that "once per
    # policy" is the memo's doing, not the interval's.
    monkeypatch.setattr(redis_limits, "EVICTION_CHECK_S", 0.0)
    with caplog.at_level("ERROR", logger="tokenbooth.limits"):
        for policy, maxmemory, logged in (("allkeys-lru", "0", False),
                                          ("noeviction", "100mb", False),
                                          ("volatile-lru", "100mb", True),
                                          ("allkeys-lru", "100mb", True)):
            client.config_set("maxmemory-policy", policy)
            client.config_set("maxmemory", maxmemory)
            caplog.clear()
            store = RedisLimitStore(own_redis.url, timeout_s=2.0)
            try:
                await store.sweep(T0)
                await store.sweep(T0)  # read again: said once
            finally:
                await store.close()
            said = [r for r in caplog.records if "may evict" in r.getMessage()]
            assert len(said) == logged, (policy, maxmemory, said)
            if logged:
                assert policy in said[0].getMessage()
    client.close()


async def test_a_key_without_limits_still_leaves_its_lost_record(
    two_limit_stores: list[LimitStore],
) -> None:
    """A request of a key whose limits hold nothing (none at all, or a request rate only)
    was never held, so a replica dying with it in flight left no record at all: served,
    never recorded, never billed. It is held for its record now (an unreachable
    concurrency limit): the sweep writes its `lost` record, once; its org's hold, if
    any, writes none."""
    clock, records = Clock(), []
    reps = [Admission(s, on_lost=lambda r: records.append(r.to_dict()), clock=clock)
            for s in two_limit_stores]
    org_lim = Limits(budget_nano=5_000)
    cases = [(Limits(), None), (Limits(rpm=10), None), (Limits(), org_lim)]
    asks = [ask(i, key=f"k{i}") for i in range(len(cases))]
    for i, ((lim, olim), a) in enumerate(zip(cases, asks, strict=True)):
        org = None if olim is None else (olim, Ask(a.request_id, "org:acme", "acme",
                                                   a.tokens, a.cost_nano, P, a.lease_s,
                                                   a.record))
        assert (await reps[i % 2].admit_all(org, lim, a, clock.at())).allowed
    ended = ask(9, key="k9")  # one that ends leaves its real record only
    assert (await reps[0].admit_all(None, Limits(), ended, clock.at())).allowed
    records.append(real_record(ended, 120))
    assert (await reps[0].settle(Limits(), ended, 25, 120, clock.at(1))).applied
    clock.t += 5.0  # the replica that had the others died: their leases end
    assert sum(await asyncio.gather(*(r.sweep() for r in reps))) == 3
    assert await asyncio.gather(*(r.sweep() for r in reps)) == [0, 0]
    assert sorted((r["request_id"], r["key_id"], r["status"]) for r in records) == [
        ("r0", "k0", LOST), ("r1", "k1", LOST), ("r2", "k2", LOST), ("r9", "k9", 200)]
    assert await two_limit_stores[0].budget("org:acme", "acme", P, clock()) == (300, 0)


async def test_a_key_without_limits_is_admitted_while_the_store_is_away(
    own_redis: RedisServer, tmp_path: Path,
) -> None:
    """Its hold is only for its record: with the store away it is admitted unheld, as
    before (never a 503 for a key that has no limit to enforce), and nothing of it takes
    room in the settle spool, which keeps the settlements that hold money."""
    store = RedisLimitStore(own_redis.url, timeout_s=0.2)
    adm = Admission(store, spool_dir=tmp_path / "spool")
    own_redis.stop()
    try:
        assert (await adm.admit_all(None, Limits(), ask(1), Clock().at())).allowed
        assert not (await adm.settle(Limits(), ask(1), 25, 120, Clock().at(1))).applied
        # A request rate alone fails closed as before, and its 503s spool nothing either
        # (a client retrying through an outage must not fill the spool).
        for i in range(2, 5):
            with pytest.raises(ApiError) as e:
                await adm.admit_all(None, Limits(rpm=10), ask(i), Clock().at())
            assert e.value.status == 503
        assert adm.spooled_bytes == 0
    finally:
        await adm.close()
        await store.close()


class _RedisStopsAfterTheOrg:
    """The real Redis store, whose server is stopped right after an org's admission (the
    fault between an org's admission and its key's: a Redis that goes away)."""

    def __init__(self, store: RedisLimitStore, server: RedisServer) -> None:
        self._store, self._server = store, server

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def admit(self, limits: Limits, a: Ask, now: float, take: bool = True) -> Any:
        d = await self._store.admit(limits, a, now, take)
        if take and a.key_id.startswith("org:"):
            self._server.stop()
        return d


@pytest.mark.parametrize("key_lim", [Limits(), Limits(tpm=1_000)], ids=["unlimited", "tpm"])
async def test_a_store_failure_between_org_and_key_leaves_one_record(
        tmp_path: Path, key_lim: Limits) -> None:
    """Redis goes away between the org's admission and its key's, so the key is admitted
    without a hold in Redis (a key without limits unheld; one whose limits fail open
    under the local limiter), and then the replica dies. The org's hold carried no
    record material (its key's did, but that hold never landed): the sweep charged the
    org in full and wrote no record. The first hold that lands carries the record: one
    `lost` record, naming the key, and the org's ledger is the records."""
    server = RedisServer(tmp_path, persist=True)  # it comes back with its data
    server.start()
    clock, records = Clock(), []
    real = RedisLimitStore(server.url, timeout_s=0.5)
    dying = Admission(cast(LimitStore, _RedisStopsAfterTheOrg(real, server)),
                      OnStoreError(tokens="fail_open"), clock=clock)
    a = ask(1)
    org = (Limits(budget_nano=5_000), Ask(a.request_id, "org:acme", "acme", a.tokens,
                                          a.cost_nano, P, a.lease_s, a.record))
    try:
        assert (await dying.admit_all(org, key_lim, a, clock.at())).allowed
        # The replica dies (nothing settles); Redis comes back; its lease ends.
        server.start()
        other = RedisLimitStore(server.url, timeout_s=2.0)
        alive = Admission(other, on_lost=lambda r: records.append(r.to_dict()), clock=clock)
        clock.t += a.lease_s
        assert await alive.sweep() == 1
        assert [(r["request_id"], r["key_id"], r["status"]) for r in records] == [
            ("r1", "k1", LOST)]
        spent, reserved = await other.budget("org:acme", "acme", P, clock())
        assert (spent, reserved) == (a.cost_nano, 0)
        ledger_is_the_records(spent, records, 1)
        await other.close()
    finally:
        await real.close()
        server.stop()



async def test_a_sweep_that_fails_mid_way_still_records_what_it_claimed(
        own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: the lost holds of a sweep's first batches were charged in Redis and their
    Asks dropped when a later batch's CLAIM failed: 256 charges with no record. Now
    they come back; and a SWEEP whose reply never came (a timeout, after Redis charged
    the hold) returns the Ask again when its entry comes back, so its record is written."""
    monkeypatch.setattr(redis_limits, "SWEEP_BATCH", 2)
    lim = Limits(budget_nano=10**6, max_concurrent=10)
    store = RedisLimitStore(own_redis.url, timeout_s=2.0)
    try:
        await store.check_epoch()
        for i in range(5):
            assert (await store.admit(lim, ask(i, lease=1.0), T0)).allowed
        real = store._redis.evalsha  # a CLAIM that fails: the second
        claims = [0]

        async def flaky(script: str, keys: list[str], args: list[str]) -> Any:
            if script == CLAIM:
                claims[0] += 1
                if claims[0] == 2:
                    raise ConnectionError("redis went away")
            return await real(script, keys, args)

        monkeypatch.setattr(store._redis, "evalsha", flaky)
        first = await store.sweep(T0 + 100)
        assert sorted(a.request_id for a in first) == ["r0", "r1"]
        monkeypatch.setattr(store._redis, "evalsha", real)
        rest = await store.sweep(T0 + 100)
        assert sorted(a.request_id for a in rest) == ["r2", "r3", "r4"]
        assert await store.budget("k1", "acme", P, T0 + 100) == (5 * 300, 0)
        # A SWEEP Redis ran whose reply was lost: its entry back in the index, claimed
        # again, gives the Ask again (the record's writer drops a second one).
        client = redis.Redis.from_url(own_redis.url)
        client.zadd(DUE, {orjson.dumps(["k1", P, "r1"]).decode(): 0})
        again = await store.sweep(T0 + 200)
        assert [a.request_id for a in again] == ["r1"]
        assert await store.budget("k1", "acme", P, T0 + 200) == (5 * 300, 0)  # once
    finally:
        await store.close()
