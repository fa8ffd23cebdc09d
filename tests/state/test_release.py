"""An admission that got no answer is released by its admission time: a settlement at zero
of the hold it made, if it made one, and never of another request's under the same id.

Review: a 503 while Redis was away spooled a plain settlement at zero; the client retried
with the same `x-request-id` (a mesh's retry keeps it) once Redis was back, and the spool's
replay settled the retry's live hold at zero: its real settlement then found nothing, and
the request went unbilled (its concurrency slot freed early too). Real redis-server.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from authz.state.limits.admission import Admission
from authz.state.limits.memory import MemoryLimitStore
from authz.state.limits.redis_limits import RedisLimitStore
from authz.state.limits.settle_spool import SettleSpool, Spooled
from policy.errors import ApiError
from policy.limits import Limits
from tests.redis_server import RedisServer
from tests.state.money import Clock, P, ask

LIM = Limits(budget_nano=10_000, tpm=10_000, max_concurrent=1)


async def test_a_retry_after_a_503_keeps_its_hold_and_is_billed(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    redis = RedisServer(tmp_path / "r", persist=True)
    clock = Clock()
    store = RedisLimitStore(redis.url, timeout_s=0.2)
    adm = Admission(store, spool_dir=tmp_path / "spool", clock=clock)
    a = ask(1, cost=3_000, lease=150.0)
    try:
        redis.start()
        await store.check_epoch()  # (the connection open)
        assert redis.proc is not None
        redis.proc.send_signal(signal.SIGSTOP)  # Redis stalls with the admission sent
        try:
            with pytest.raises(ApiError) as e:  # fails closed, its release spooled
                await adm.admit(LIM, a, clock.at())
            assert e.value.status == 503 and adm.spooled_bytes > 0
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        await store.check_epoch()
        assert (await adm.admit(LIM, a, clock.at(0.5))).allowed  # the retry, same id
        await adm.replay()
        assert adm.spooled_bytes == 0
        # The retry's hold stands: its budget reserved, its one slot taken.
        assert await store.budget("k1", "acme", P, clock()) == (0, 3_000)
        other = ask(2, cost=100, lease=150.0)
        with pytest.raises(ApiError) as e:  # max_concurrent 1
            await adm.admit(LIM, other, clock.at(0.6))
        assert e.value.status == 429
        done = await adm.settle(LIM, a, 25, 2_000, clock.at(2))
        assert done.applied
        assert await store.budget("k1", "acme", P, clock()) == (2_000, 0)
    finally:
        await adm.close()
        await store.close()
        redis.stop()


async def test_a_release_takes_only_the_hold_admitted_at_its_time(
        own_redis: RedisServer) -> None:
    """The admission that got no answer did land (a stalled Redis ran it late): its hold
    is released. A hold under the same id admitted at another time is not."""
    clock = Clock()
    store = RedisLimitStore(own_redis.url, timeout_s=2.0)
    try:
        a = ask(1, cost=3_000, lease=150.0)
        t0 = clock()
        assert (await store.admit(LIM, a, t0)).allowed
        assert not (await store.release(LIM, a, t0 - 0.25, t0 + 1)).applied  # not its time
        assert await store.budget("k1", "acme", P, clock()) == (0, 3_000)
        assert (await store.release(LIM, a, t0, t0 + 1)).applied
        assert await store.budget("k1", "acme", P, clock()) == (0, 0)
        assert (await store.admit(LIM, ask(2, cost=10, lease=150.0), t0 + 2)).allowed  # slot
    finally:
        await store.close()


async def test_release_lines_read_back_from_the_spool(tmp_path: Path) -> None:
    """A release keeps its admission time in the spool (a restart replays it as one);
    lines of the last release (no time) read as settlements."""
    spool = SettleSpool(tmp_path)
    a = ask(1)
    assert spool.append(Spooled(LIM, a, 0, 0, admitted=1_700_000_000.123456))
    assert spool.append(Spooled(LIM, a, 5, 50))
    got = [s for _, s in spool.read()]
    assert [(s.admitted, s.used_tokens) for s in got if s is not None] == [
        (1_700_000_000.123456, 0), (None, 5)]
    spool.close()


async def test_the_embedded_store_releases_only_the_hold_admitted_then() -> None:
    """As Redis: the org hold an admission just made (its key then refused) goes; a hold
    under the id admitted at another time stays."""
    store, clock = MemoryLimitStore(), Clock()
    a = ask(1, cost=3_000, lease=150.0)
    t0 = clock()
    assert (await store.admit(LIM, a, t0)).allowed
    assert not (await store.release(LIM, a, t0 - 1, t0 + 1)).applied
    assert await store.budget("k1", "acme", P, clock()) == (0, 3_000)
    assert (await store.release(LIM, a, t0, t0 + 1)).applied
    assert await store.budget("k1", "acme", P, clock()) == (0, 0)
