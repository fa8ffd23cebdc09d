"""The outage policy: with Redis stopped, limits fail closed fast or open under a local
per-replica limiter; budgets always fail closed; Redis returning takes over again.
Settlement returns what it did and logs a hold whose cost was not the worst case."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from authz.state.limits.admission import Admission
from authz.state.limits.base import LimitStoreRefused, LimitStoreUnavailable
from authz.state.limits.memory import MemoryLimitStore
from authz.state.limits.redis_limits import RedisLimitStore
from policy.admission import Settled
from policy.config import OnStoreError
from policy.errors import ApiError
from policy.limits import Ask, Decision, HoldRecord, Limits
from tests.redis_server import RedisServer

NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)


def ask(i: int, key: str = "k") -> Ask:
    return Ask(request_id=f"r{i}", key_id=key, org="o", tokens=10, cost_nano=1000,
               period="day:2026-11-23", lease_s=150)


async def _first_request_then_frozen(adm: Admission, limits: Limits, redis: RedisServer,
                                     frozen_s: float = 0.0) -> None:
    """Request 0 admitted and settled (the connection live, the scripts loaded), then
    Redis frozen (SIGSTOP) while request 1 asks: a 503, fail closed; `frozen_s` more
    seconds frozen before SIGCONT."""
    assert redis.proc is not None
    assert (await adm.admit(limits, ask(0), NOW)).allowed
    await adm.settle(limits, ask(0), 0, 0, NOW)
    redis.proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(ApiError) as e:
            await adm.admit(limits, ask(1), NOW)
        assert e.value.status == 503
        await asyncio.sleep(frozen_s)
    finally:
        redis.proc.send_signal(signal.SIGCONT)


async def test_fail_closed_is_a_fast_503(own_redis: RedisServer) -> None:
    store = RedisLimitStore(own_redis.url, timeout_s=0.2)
    adm = Admission(store)
    await store.start()
    assert (await adm.admit(Limits(rpm=5), ask(0), NOW)).allowed
    own_redis.stop()
    t0 = time.monotonic()
    with pytest.raises(ApiError) as e:
        await adm.admit(Limits(rpm=5), ask(1), NOW)
    assert (e.value.status, e.value.code) == (503, "service_unavailable")
    assert time.monotonic() - t0 < 1.0
    # A settlement that cannot reach the store says so (nothing applied) and raises nothing.
    assert await adm.settle(Limits(tpm=100), ask(0), 10, 1500, NOW) == Settled(False, 500)
    await store.close()


async def test_fail_open_enforces_locally_then_redis_takes_over(
    own_redis: RedisServer,
) -> None:
    store = RedisLimitStore(own_redis.url, timeout_s=0.2)
    adm = Admission(store, OnStoreError(requests="fail_open", concurrency="fail_open"))
    await store.start()
    limits = Limits(rpm=3, max_concurrent=10)
    own_redis.stop()
    for i in range(3):
        d = await adm.admit(limits, ask(i), NOW)
        assert d.allowed and d.limit_requests == 3
        await adm.settle(limits, ask(i), 0, 0, NOW)
    with pytest.raises(ApiError) as e:  # the local limiter holds the same numbers
        await adm.admit(limits, ask(3), NOW)
    assert (e.value.status, e.value.code) == (429, "rate_limit_exceeded")
    # A key with a budget never fails open.
    with pytest.raises(ApiError) as e:
        await adm.admit(Limits(rpm=3, budget_nano=10**9), ask(4, "b"), NOW)
    assert e.value.status == 503
    # A limit whose own policy is fail_closed still refuses.
    with pytest.raises(ApiError) as e:
        await adm.admit(Limits(tpm=1000), ask(5, "t"), NOW)
    assert e.value.status == 503
    own_redis.start()  # same port, empty
    # The 3 requests admitted locally during the outage are counted into Redis before
    # the next decision (it was counted after it: the first request after an outage
    # always passed), so this minute is spent.
    with pytest.raises(ApiError) as e:
        await adm.admit(limits, ask(6), NOW)
    assert (e.value.status, e.value.code) == (429, "rate_limit_exceeded")
    await store.close()


async def test_the_local_limiter_starts_from_what_the_store_counted(
        own_redis: RedisServer) -> None:
    """Two requests through Redis, then an outage: the local limiter admits the three
    the minute has left, not a full burst of five (a tester got 7 of an rpm of 5)."""
    store = RedisLimitStore(own_redis.url, timeout_s=0.2)
    adm = Admission(store, OnStoreError(requests="fail_open", tokens="fail_open"))
    await store.start()
    limits = Limits(rpm=5, tpm=10_000)
    for i in range(2):
        assert (await adm.admit(limits, ask(i), NOW)).allowed
    own_redis.stop()
    got = []
    for i in range(2, 8):
        try:
            got.append((await adm.admit(limits, ask(i), NOW)).allowed)
        except ApiError as e:
            got.append(e.status != 429)
    assert got == [True] * 3 + [False] * 3
    await store.close()


async def test_an_idle_replica_counts_its_outage_usage_once_the_store_is_back(
        own_redis: RedisServer) -> None:
    """Replica 1 admits a full burst locally during the outage and then gets no more
    traffic: its background task counts the burst into Redis, and replica 2, asking
    Redis afterwards, is refused (it got a fresh burst of its own: 11 requests in 24 s
    of an rpm of 5). A request still in flight is counted as it was admitted, its
    tokens as it settles."""
    stores = [RedisLimitStore(own_redis.url, timeout_s=0.2) for _ in range(2)]
    policy = OnStoreError(requests="fail_open", tokens="fail_open")
    one, two = (Admission(s, policy) for s in stores)
    for s in stores:
        await s.start()
    limits = Limits(rpm=5, tpm=10**6)
    own_redis.stop()
    for i in range(5):
        assert (await one.admit(limits, ask(i), NOW)).allowed
    for i in range(4):  # the fifth stays in flight
        await one.settle(limits, ask(i), 1000, 0, NOW)
    assert not await one.reconcile(NOW)  # still away: kept for later
    own_redis.start()
    assert await one.reconcile(NOW)
    with pytest.raises(ApiError) as e:
        await two.admit(limits, ask(10, "k"), NOW)
    assert (e.value.status, e.value.code) == (429, "rate_limit_exceeded")
    await one.settle(limits, ask(4), 1000, 0, NOW)
    assert await one.reconcile(NOW)
    state = await stores[1].admit(Limits(tpm=10**6), ask(11), NOW.timestamp(), take=False)
    assert state.remaining_tokens is not None and state.remaining_tokens <= 10**6 - 5000
    for s in stores:
        await s.close()


def violations(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "hold bound violated"]


async def test_settle_reports_and_logs_a_bound_violation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    adm = Admission(MemoryLimitStore())
    lim = Limits(tpm=100, budget_nano=2000, budget_period="day")
    caplog.set_level(logging.WARNING, logger="tokenbooth.limits")
    assert (await adm.admit(lim, ask(1), NOW)).allowed
    assert await adm.settle(lim, ask(1), 12, 1000, NOW) == Settled(True, 0, 2)
    assert violations(caplog) == []  # tokens past the TPM estimate are no violation
    assert (await adm.admit(lim, ask(2), NOW)).allowed
    assert await adm.settle(lim, ask(2), 10, 1600, NOW) == Settled(True, 600, 0)
    [rec] = violations(caplog)
    assert (rec.request_id, rec.key_id, rec.overrun_nano, rec.applied) == ("r2", "k", 600, True)
    # Charged in full: 2600 spent of 2000, so the key is refused from now on.
    with pytest.raises(ApiError) as e:
        await adm.admit(lim, ask(3), NOW)
    assert e.value.code == "insufficient_quota"


async def test_a_key_that_holds_nothing_still_reports_its_overrun(
    caplog: pytest.LogCaptureFixture,
) -> None:
    adm = Admission(MemoryLimitStore())
    caplog.set_level(logging.WARNING, logger="tokenbooth.limits")
    for lim in (Limits(), Limits(rpm=5)):
        assert await adm.settle(lim, ask(1), 10, 1001, NOW) == Settled(False, 1, 0)
    assert len(violations(caplog)) == 2


@pytest.mark.parametrize("on_error", ["fail_closed", "fail_open"])
async def test_an_unanswered_admission_is_released_once_the_store_wakes(
    own_redis: RedisServer, tmp_path: Path, on_error: str,
) -> None:
    """Redis frozen (SIGSTOP) mid-admission: the client times out and the request is
    refused (or admitted locally), but the script runs when Redis wakes. Its hold must be
    given back, not left to be charged as lost for a request Redis never served."""
    store = RedisLimitStore(own_redis.url, timeout_s=0.2)
    policy = "fail_open" if on_error == "fail_open" else "fail_closed"
    adm = Admission(store, OnStoreError(requests=policy, concurrency=policy),
                    spool_dir=tmp_path / "spool")
    await store.start()
    limits = Limits(max_concurrent=1) if on_error == "fail_open" else Limits(
        max_concurrent=1, budget_nano=10_000)
    assert own_redis.proc is not None
    try:
        # A live connection (and the scripts loaded): the admission below is sent.
        assert (await adm.admit(limits, ask(0), NOW)).allowed
        await adm.settle(limits, ask(0), 0, 0, NOW)
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            if on_error == "fail_open":
                assert (await adm.admit(limits, ask(1), NOW)).allowed
                await adm.settle(limits, ask(1), 10, 0, NOW)  # settled locally
            else:
                with pytest.raises(ApiError) as e:
                    await adm.admit(limits, ask(1), NOW)
                assert e.value.status == 503
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        period, now = ask(1).period, NOW.timestamp()
        if limits.budget_nano is not None:
            # Redis ran the late admission: its hold stands until the release applies.
            assert await store.budget("k", "o", period, now) == (0, ask(1).cost_nano)
        assert await adm.replay() == 1
        assert await store.budget("k", "o", period, now) == (0, 0)
        # The concurrency slot is free again: the next request is admitted.
        assert (await adm.admit(limits, ask(2), NOW)).allowed
    finally:
        await adm.close()
        await store.close()


async def test_an_admission_redis_runs_after_its_caller_gave_up_holds_nothing(
    own_redis: RedisServer, tmp_path: Path,
) -> None:
    """Redis frozen past the admission's time limit and more: when it wakes and runs the
    script, the script sees its deadline (in Redis' clock) has passed and holds nothing.
    A tester froze Redis past the lease: the sweep claimed the holds of requests that got
    a 503 before their spooled releases landed, and billed each with a `lost` record."""
    store = RedisLimitStore(own_redis.url, timeout_s=0.2)
    adm = Admission(store, OnStoreError(), spool_dir=tmp_path / "spool")
    limits = Limits(max_concurrent=1, budget_nano=10_000)
    try:
        assert await store.sweep(time.time()) == []  # it measures Redis' clock
        # Frozen past the time limit (0.2 s) and its slack (1 s).
        await _first_request_then_frozen(adm, limits, own_redis, frozen_s=1.5)
        period, now = ask(1).period, NOW.timestamp()
        # Nothing held, before any release: no slot taken, nothing to be lost.
        assert await store.budget("k", "o", period, now) == (0, 0)
        assert await store.sweep(now + 10 * ask(1).lease_s) == []
        assert (await adm.admit(limits, ask(2), NOW)).allowed
        await adm.replay()  # the spooled release of request 1 is a no-op
        assert await store.budget("k", "o", period, now) == (0, ask(2).cost_nano)
    finally:
        await adm.close()
        await store.close()


async def test_the_store_answering_again_replays_the_spool_at_once(
    own_redis: RedisServer, tmp_path: Path,
) -> None:
    """A stalled Redis woke and ran an admission whose caller had answered 503: its slot
    stayed taken (429 "too many in flight") until the background task's next round
    applied the release. The first admission the store answers now wakes it."""
    store = RedisLimitStore(own_redis.url, timeout_s=0.2)
    adm = Admission(store, OnStoreError(), spool_dir=tmp_path / "spool", sweep_s=30.0)
    limits = Limits(max_concurrent=1)
    try:
        await adm.start()
        await asyncio.sleep(0.2)  # its first round done: the next is 30 s away
        # Thawed within its deadline: Redis runs the admission it was sent.
        await _first_request_then_frozen(adm, limits, own_redis)
        assert (await adm.admit(Limits(max_concurrent=5), ask(2, "other"), NOW)).allowed
        t0 = time.monotonic()
        while True:
            try:
                assert (await adm.admit(limits, ask(3), NOW)).allowed
                break
            except ApiError as e:
                assert e.status == 429 and time.monotonic() - t0 < 2, e
                await asyncio.sleep(0.05)
    finally:
        await adm.close()
        await store.close()


async def test_a_refusal_applies_the_spooled_settlements_first(
    own_redis: RedisServer, tmp_path: Path,
) -> None:
    """Faults tester: as a frozen Redis thawed, requests got "too many in flight" 429s
    for slots whose settlements still waited in the spool. A refusal that a settlement
    could lift now applies the spool first, then asks again."""
    store = RedisLimitStore(own_redis.url, timeout_s=0.2)
    adm = Admission(store, OnStoreError(), spool_dir=tmp_path / "spool", sweep_s=30.0)
    limits = Limits(max_concurrent=1)
    assert own_redis.proc is not None
    try:
        await store.start()
        assert (await adm.admit(limits, ask(0), NOW)).allowed
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            await adm.settle(limits, ask(0), 10, 0, NOW)  # spooled: Redis does not answer
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        assert adm.spooled_bytes > 0
        assert (await adm.admit(limits, ask(1), NOW)).allowed  # at once, not a 429
        assert adm.spooled_bytes == 0
        with pytest.raises(ApiError) as e:  # a real refusal stays one
            await adm.admit(limits, ask(2), NOW)
        assert e.value.status == 429
    finally:
        await adm.close()
        await store.close()


async def test_an_org_and_its_key_admitted_locally_both_settle_locally(
    own_redis: RedisServer,
) -> None:
    """With the store away and concurrency failing open, a request holds a slot of its
    key's and of its org's local limiter, under one request id. The key's settlement
    took the id off the list of local admissions, so the org's went to the store and
    its local slot was never given back: after max_concurrent requests, each ended, the
    org refused every request for the rest of the outage."""
    store = RedisLimitStore(own_redis.url, timeout_s=0.2)
    adm = Admission(store, OnStoreError(concurrency="fail_open"))
    await store.start()
    own_redis.stop()
    key, org = Limits(max_concurrent=5), Limits(max_concurrent=2)
    try:
        for i in range(4):
            a = ask(i)
            org_ask = Ask(a.request_id, "org:o", "o", a.tokens, a.cost_nano, a.period,
                          a.lease_s)
            assert (await adm.admit_all((org, org_ask), key, a, NOW)).allowed, i
            await adm.settle(key, a, 0, 0, NOW)  # the key settles first, then its org
            await adm.settle(org, org_ask, 0, 0, NOW)
    finally:
        await adm.close()
        await store.close()


def _rate(e: ApiError) -> dict[str, str]:
    return {k: v for k, v in e.headers if k.startswith("x-ratelimit-")}


@pytest.mark.parametrize("org_rpm", [None, 50])
async def test_a_429_carries_the_rates_of_the_key_and_of_its_org(org_rpm: int | None) -> None:
    """As an admitted response does: the org's tokens on the key's refusal, the key's
    requests on the org's (a refusal showed only the party that refused)."""
    adm = Admission(MemoryLimitStore())
    org = Limits(rpm=org_rpm, tpm=2000, max_concurrent=2)

    def asks(i: int, key: str) -> tuple[tuple[Limits, Ask], Ask]:
        a = ask(i, key)
        return (org, Ask(a.request_id, "org:o", "o", a.tokens, a.cost_nano, a.period,
                         a.lease_s)), a

    # The key refuses (its one slot is taken): the org's tokens are in the headers.
    one = Limits(max_concurrent=1)
    assert (await adm.admit_all(asks(0, "a")[0], one, ask(0, "a"), NOW)).allowed
    with pytest.raises(ApiError) as e:
        await adm.admit_all(asks(1, "a")[0], one, ask(1, "a"), NOW)
    assert e.value.status == 429
    assert _rate(e.value)["x-ratelimit-limit-tokens"] == "2000"
    # The org refuses (its two slots are taken): the key's rpm is in the headers.
    assert (await adm.admit_all(asks(2, "b")[0], Limits(), ask(2, "b"), NOW)).allowed
    rpm1 = Limits(rpm=1)
    with pytest.raises(ApiError) as e:
        await adm.admit_all(asks(3, "r")[0], rpm1, ask(3, "r"), NOW)
    assert e.value.status == 429 and "organization" in e.value.message
    rate = _rate(e.value)
    assert rate["x-ratelimit-limit-tokens"] == "2000"
    assert rate["x-ratelimit-limit-requests"] == "1" and rate[
        "x-ratelimit-remaining-requests"] == "1"


@pytest.mark.parametrize("org_limits", [Limits(rpm=1), Limits(budget_nano=1500)])
async def test_a_request_its_key_can_never_admit_is_told_so_before_its_orgs_429(
        org_limits: Limits) -> None:
    """An org's request rate spent, or its budget held by a request in flight, is a
    retryable 429; a request larger than its key's tokens per minute never fits: said
    first (x-should-retry: false), or the client retries what it must change (a
    leftover). Nothing is taken from the org for it."""
    adm = Admission(MemoryLimitStore())

    def org_of(a: Ask) -> tuple[Limits, Ask]:
        return org_limits, Ask(a.request_id, "org:o", "o", a.tokens, a.cost_nano, a.period,
                               a.lease_s)

    first = ask(0)
    assert (await adm.admit_all(org_of(first), Limits(), first, NOW)).allowed
    small = Limits(tpm=5)  # ask() takes 10 tokens
    with pytest.raises(ApiError) as e:
        await adm.admit_all(org_of(ask(1)), small, ask(1), NOW)
    assert e.value.status == 429 and "organization" not in e.value.message
    assert ("x-should-retry", "false") in e.value.headers
    # Fitting its key, the same request meets the org's retryable refusal.
    with pytest.raises(ApiError) as e:
        await adm.admit_all(org_of(ask(2)), Limits(tpm=50), ask(2), NOW)
    assert "organization" in e.value.message
    assert ("x-should-retry", "false") not in e.value.headers


@pytest.mark.parametrize("backend", ["memory", "redis"])
@pytest.mark.parametrize(("key_before", "org_before"), [
    (Limits(), Limits(budget_nano=10**9)),  # a key without limits, its org holding money
    (Limits(rpm=1000), Limits(rpm=1000)),  # rate limits only: nothing held for them
])
async def test_a_concurrency_limit_set_mid_flight_counts_requests_under_an_org(
        tmp_path: Path, backend: str, key_before: Limits, org_before: Limits) -> None:
    """`keys update --max-concurrent 2` (or the org's) with 3 requests in flight: the
    new limit counts them at once (limits tester: the key's hold was skipped when its
    org's carried the record, and an org with a request rate only took no lease, so 4
    more were admitted under a limit of 2)."""
    server = None
    if backend == "redis":
        server = RedisServer(tmp_path)
        server.start()
        store: Any = RedisLimitStore(server.url, timeout_s=2.0)
    else:
        store = MemoryLimitStore()
    await store.start()
    adm = Admission(store)

    def org_of(a: Ask) -> Ask:
        return Ask(a.request_id, "org:o", "o", a.tokens, a.cost_nano, a.period, a.lease_s,
                   record=a.record)

    material = HoldRecord(model="m", upstream_model="m", endpoint="chat", stream=True,
                          prompt_tokens=1, completion_tokens=9, started_at="2026-11-23T12:00:00Z")
    try:
        flying = [replace(ask(i), record=material) for i in range(3)]
        for a in flying:
            assert (await adm.admit_all((org_before, org_of(a)), key_before, a, NOW)).allowed
        for key_after, org_after, who in (
                (replace(key_before, max_concurrent=2), org_before, "API key"),
                (key_before, replace(org_before, max_concurrent=2), "organization")):
            a = replace(ask(9), record=material)
            with pytest.raises(ApiError) as e:
                await adm.admit_all((org_after, org_of(a)), key_after, a, NOW)
            assert e.value.status == 429 and who in e.value.message, e.value.message
        for a in flying:  # once they settle, the new limits admit again
            await adm.settle(key_before, a, 10, 1, NOW)
            await adm.settle(org_before, org_of(a), 10, 1, NOW)
        a = replace(ask(10), record=material)
        assert (await adm.admit_all((replace(org_before, max_concurrent=2), org_of(a)),
                                    replace(key_before, max_concurrent=2), a, NOW)).allowed
    finally:
        await adm.close()
        await store.close()
        if server is not None:
            server.stop()


class _Flaky(MemoryLimitStore):
    """Away for the first admissions; back, it refuses `consume` with an error reply."""

    def __init__(self) -> None:
        super().__init__()
        self.away = True

    async def admit(self, limits: Limits, ask: Ask, now: float, take: bool = True
                    ) -> Decision:
        if self.away:
            raise LimitStoreUnavailable("away")
        return await super().admit(limits, ask, now, take)

    async def consume(self, limits: Limits, key_id: str, requests: int, tokens: int,
                      now: float, batch_id: str = "") -> None:
        raise LimitStoreRefused("WRONGTYPE")


async def test_usage_the_store_refuses_to_count_does_not_block_admissions(
        caplog: pytest.LogCaptureFixture) -> None:
    """The outage's usage is counted before each decision; a store that answers that
    count with an error would have failed every admission after it: they go on, and after
    MAX_REFUSED errors the count is dropped, said once."""
    store = _Flaky()
    adm = Admission(store, OnStoreError(requests="fail_open"))
    limits = Limits(rpm=100)
    assert (await adm.admit(limits, ask(0), NOW)).allowed  # locally
    store.away = False
    for i in range(1, 14):
        assert (await adm.admit(limits, ask(i), NOW)).allowed
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "usage admitted during the outage could not be counted: WRONGTYPE"]


async def test_a_clock_offset_gone_wrong_costs_one_refusal(own_redis: RedisServer) -> None:
    """Redis' clock stepped (or this replica's) after the offset was measured: every
    deadline would be past, every admission refused until the next measure. The first
    `stale` answered in time drops the deadlines until then."""
    store = RedisLimitStore(own_redis.url, timeout_s=0.5)
    adm = Admission(store)
    limits = Limits(max_concurrent=5)
    try:
        assert await store.sweep(NOW.timestamp()) == []  # measures the offset
        store._offset = -3600.0  # as if Redis' clock had stepped back an hour
        with pytest.raises(ApiError) as e:
            await adm.admit(limits, ask(0), NOW)
        assert e.value.status == 503
        assert (await adm.admit(limits, ask(1), NOW)).allowed
        assert await store.sweep(NOW.timestamp()) == []  # measured again: right
        assert store._offset is not None and abs(store._offset) < 5
        assert (await adm.admit(limits, ask(2), NOW)).allowed
    finally:
        await store.close()


async def test_slow_clock_reads_still_give_admissions_a_deadline(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under load every TIME reply took longer than the 50 ms a measure wanted, and
    admissions went out with no deadline (a stalled Redis could run them after their
    503). A slow reply measures the offset when there is none, its error (half the round
    trip) added to the deadline; it does not replace a quicker reply's offset."""
    store = RedisLimitStore(own_redis.url, timeout_s=0.5)
    execute = store._redis.execute
    slow = [True]

    async def slow_time(*args: Any) -> Any:  # TIME's round trip 0.3 s: a loaded machine
        if args == ("TIME",) and slow[0]:
            await asyncio.sleep(0.3)
        return await execute(*args)

    monkeypatch.setattr(store._redis, "execute", slow_time)
    try:
        assert await store.sweep(NOW.timestamp()) == []
        assert store._offset is not None and abs(store._offset) < 1
        slow_error = store._offset_error
        assert slow_error >= 0.1
        # Never early: Redis runs on this machine (a true offset of ~0), and the reply's
        # error covers the midpoint's.
        assert float(store._deadline()) >= time.time() + 0.5 + 1.0 - 0.01
        slow[0] = False
        store._offset_checked = -1e9  # measure again now: a quick reply replaces it
        assert await store.sweep(NOW.timestamp()) == []
        assert store._offset_error < slow_error
        quick = store._offset
        slow[0] = True
        store._offset_checked = -1e9  # a slow one does not replace the quick one
        assert await store.sweep(NOW.timestamp()) == []
        assert store._offset == quick
    finally:
        await store.close()


class _Away(MemoryLimitStore):
    """A memory store that is away (admissions time out) until `away` is cleared; what
    `consume` gets is noted."""

    def __init__(self) -> None:
        super().__init__()
        self.away = True
        self.consumed_calls: list[tuple[int, int, str]] = []

    async def admit(self, limits: Limits, ask: Ask, now: float, take: bool = True
                    ) -> Decision:
        if self.away:
            raise LimitStoreUnavailable("away")
        return await super().admit(limits, ask, now, take)

    async def consume(self, limits: Limits, key_id: str, requests: int, tokens: int,
                      now: float, batch_id: str = "") -> None:
        if self.away:
            raise LimitStoreUnavailable("away")
        self.consumed_calls.append((requests, tokens, batch_id))
        await super().consume(limits, key_id, requests, tokens, now, batch_id)


async def test_an_outage_counts_at_most_a_window_of_the_key_rates() -> None:
    """Five minutes at exactly rpm 5 (25 requests admitted locally): counted at once,
    they blocked the key for as long as the outage had lasted."""
    store = _Away()
    adm = Admission(store, OnStoreError(requests="fail_open"))
    limits = Limits(rpm=5)
    for i in range(25):
        assert (await adm.admit(limits, ask(i), NOW + timedelta(seconds=12 * i))).allowed
    store.away = False
    later = NOW + timedelta(seconds=300)
    assert await adm.reconcile(later)
    assert sum(n for n, _, _ in store.consumed_calls) == 5
    # The window after the outage is the key's own again once a request's refill is in.
    assert (await adm.admit(limits, ask(100), later + timedelta(seconds=12))).allowed


async def test_the_local_limiter_starts_from_what_has_not_refilled_since() -> None:
    """The store said 5 of 5 used a minute ago: a new outage starts the key full (it was
    refused its whole first burst), and a second outage starts from the store's count,
    not on top of the first's."""
    store = _Away()
    store.away = False
    adm = Admission(store, OnStoreError(requests="fail_open"))
    limits = Limits(rpm=5)
    for i in range(5):
        assert (await adm.admit(limits, ask(i), NOW)).allowed
    at, used_r, used_t = adm._store_used["k"]
    assert used_r == 5
    adm._store_used["k"] = (at - 60.0, used_r, used_t)  # as if a minute had passed
    store.away = True
    later = NOW + timedelta(seconds=60)
    for i in range(5, 10):
        assert (await adm.admit(limits, ask(i), later)).allowed
    with pytest.raises(ApiError):
        await adm.admit(limits, ask(10), later)


async def test_a_count_the_stalled_store_runs_late_is_counted_once(
        own_redis: RedisServer) -> None:
    """Each try to count the outage's usage that timed out ran when Redis woke (57
    requests counted for 11): a batch is sent again as it was, with its id, and Redis
    counts an id once."""
    store = RedisLimitStore(own_redis.url, timeout_s=0.2)
    adm = Admission(store, OnStoreError(requests="fail_open"))
    limits = Limits(rpm=20)
    assert own_redis.proc is not None
    try:
        assert (await adm.admit(limits, ask(0), NOW)).allowed  # connected, scripts loaded
        assert await store.sweep(NOW.timestamp()) == []  # Redis' clock: late admissions
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            for i in range(1, 9):  # each probes the store with the same first batch
                assert (await adm.admit(limits, ask(i), NOW)).allowed
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        assert await adm.reconcile(NOW)
        look = await store.admit(limits, ask(99), NOW.timestamp(), take=False)
        assert look.remaining_requests == 20 - 1 - 8 - 1  # after the look's own request
    finally:
        await store.close()


@pytest.mark.parametrize("password", [None, "wrong"])
async def test_a_refusal_redis_never_ran_spools_nothing(
        own_redis: RedisServer, tmp_path: Path, password: str | None) -> None:
    """Last round's note: Redis restarted with a password answers NOAUTH to every call
    (or WRONGPASS to the AUTH of a stale one): each refused admission spooled a release
    for a script Redis never ran, moving the spool's counter and alert; and each call
    with a refused AUTH left its connection open (Redis ran out of clients). Nothing is
    spooled, and the connections close."""
    from redis.asyncio import Redis
    url = own_redis.url if password is None else \
        own_redis.url.replace("redis://", f"redis://:{password}@")
    store = RedisLimitStore(url, timeout_s=0.5)
    spooled: list[int] = []
    adm = Admission(store, OnStoreError(), spool_dir=tmp_path / "spool",
                    on_spooled=lambda: spooled.append(1))
    own_redis.stop()
    own_redis.args = ["--requirepass", "s3cret-pw"]
    own_redis.start()
    limits = Limits(max_concurrent=5)
    with contextlib.suppress(Exception):
        await store.start()  # (where Redis refuses it, the calls below connect)
    for i in range(12):
        with pytest.raises(ApiError) as e:
            await adm.admit(limits, ask(i), NOW)
        assert e.value.status == 503
    assert spooled == [] and adm.spooled_bytes == 0
    admin = Redis.from_url(own_redis.url.replace("redis://", "redis://:s3cret-pw@"))
    try:
        clients = len(await admin.client_list())
        assert clients <= 2, clients  # this one, and at most the store's own
    finally:
        await admin.aclose()
        await store.close()


async def test_a_batch_is_not_run_only_when_none_of_its_needed_calls_ran() -> None:
    """Review: "not run" is one command's. A refused ZADD beside an ADMIT that ran made
    the whole batch "not run": no release spooled for a hold the sweep cannot find."""
    from authz.state.limits.base import LimitStoreUnwritable
    from authz.state.resp import NotRun

    store = RedisLimitStore("redis://127.0.0.1:1/0", timeout_s=0.2)
    replies: list[Any] = []

    async def batch(*_calls: Any) -> list[Any]:
        return replies

    store._redis.batch = batch  # type: ignore[method-assign]
    replies[:] = [NotRun("BUSY Redis is busy"), NotRun("BUSY Redis is busy")]
    with pytest.raises(LimitStoreUnwritable):
        await store._batch(("ZADD",), ("EVALSHA",), must=(0, 1))
    replies[:] = [NotRun("BUSY Redis is busy"), [1, 0]]
    with pytest.raises(LimitStoreRefused):
        await store._batch(("ZADD",), ("EVALSHA",), must=(0, 1))


async def test_a_refusal_redis_never_heard_spools_nothing(own_redis: RedisServer,
                                                          tmp_path: Path) -> None:
    """Observability tester: with Redis down, every refused admission spooled a release
    (348 bytes each; "2,839 settlements spooled" with none admitted, the spool alert
    firing on an outage with no traffic let through). An admission no connection
    could be made for never reached Redis: nothing to release. One sent to a frozen
    Redis may still run: its release is spooled, as before."""
    store = RedisLimitStore(own_redis.url, timeout_s=0.2)
    spooled: list[int] = []
    adm = Admission(store, OnStoreError(), spool_dir=tmp_path / "spool",
                    on_spooled=lambda: spooled.append(1))
    await store.start()
    limits = Limits(max_concurrent=5)
    assert (await adm.admit(limits, ask(0), NOW)).allowed
    await adm.settle(limits, ask(0), 0, 0, NOW)
    own_redis.stop()
    # The first finds the connection lost as it writes (Redis may have read it: its
    # release is spooled); the next ones cannot connect at all.
    with pytest.raises(ApiError):
        await adm.admit(limits, ask(1), NOW)
    spooled.clear()
    held = adm.spooled_bytes
    for i in range(2, 7):
        with pytest.raises(ApiError) as e:
            await adm.admit(limits, ask(i), NOW)
        assert e.value.status == 503
    assert spooled == [] and adm.spooled_bytes == held
    own_redis.start()
    await _first_request_then_frozen(adm, limits, own_redis)  # sent, unanswered
    assert spooled == [1]
    await store.close()
