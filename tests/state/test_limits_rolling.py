"""A rolling upgrade: replicas of the last release and of this one share one Redis. The
last release kept a key's request rate as a GCRA arrival time (`tb:{k:<id>}:gcra`), this
one as a bucket (`tb:{k:<id>}:rpm`); each counted only its own requests (up to twice
the rpm in a window). This release keeps the old key up to date in the same script and
counts what the last release wrote there, so either version sees the other's requests.
The last release's own Lua (tests/state/last_release_redis_scripts.py) runs against the
same real redis-server; the clock is passed in, nothing sleeps."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis

from authz.state.limits.redis_limits import RedisLimitStore
from policy.limits import Ask, Limits
from tests.redis_server import RedisServer
from tests.state import last_release_redis_scripts as last

T0 = 1_700_000_000.25
RPM = 10  # a request every 6 s
NS = "tb:{k:k1}:"


class LastRelease:
    """A replica of the last release: its ADMIT and CONSUME scripts, as it called them."""

    def __init__(self, url: str) -> None:
        self._r = redis.Redis.from_url(url)
        self._admit = self._r.register_script(last.ADMIT)
        self._consume = self._r.register_script(last.CONSUME)
        self._n = 0

    def admit(self, now: float) -> bool:
        self._n += 1
        rid, p = f"old-{self._n}", "month:2023-11"
        keys = [NS + "gcra", NS + "tpm", NS + "conc", NS + "res:" + rid,
                NS + "budget:" + p, NS + "resv:" + p, NS + "lost:" + p]
        args = [repr(now), rid, str(RPM), "", "", "", "0", "0", "30.0", "60.0", p, "", "1"]
        return int(self._admit(keys, args)[0]) == 1

    def consume(self, n: int, now: float) -> None:
        self._consume([NS + "gcra", NS + "tpm"], [repr(now), str(RPM), "", str(n), "0",
                                                   "60.0"])

    def close(self) -> None:
        self._r.close()


@pytest.fixture
async def both(own_redis: RedisServer) -> AsyncIterator[tuple[RedisLimitStore, LastRelease]]:
    new, old = RedisLimitStore(own_redis.url, timeout_s=2.0), LastRelease(own_redis.url)
    yield new, old
    await new.close()
    old.close()


_n = 0


async def admit_new(store: RedisLimitStore, now: float) -> bool:
    global _n
    _n += 1
    d = await store.admit(Limits(rpm=RPM), Ask(f"new-{_n}", "k1", "acme", 0, 0,
                                                "month:2023-11", 30.0), now)
    return d.allowed


async def test_a_burst_split_between_the_versions_is_one_rpm(
        both: tuple[RedisLimitStore, LastRelease]) -> None:
    new, old = both
    got = [await admit_new(new, T0) if i % 2 == 0 else old.admit(T0) for i in range(RPM)]
    assert got == [True] * RPM
    assert not old.admit(T0) and not await admit_new(new, T0)  # each sees all ten
    # One request back every 6 s, for whichever version asks first.
    assert old.admit(T0 + 6.0) and not await admit_new(new, T0 + 6.0)
    assert await admit_new(new, T0 + 12.0) and not old.admit(T0 + 12.0)


@pytest.mark.parametrize("first", ["new", "old"])
async def test_either_version_alone_then_the_other_sees_its_requests(
        both: tuple[RedisLimitStore, LastRelease], first: str) -> None:
    """A roll starting (the last release admitted the burst) or a rollback (this one
    did): the other version's rate is not full."""
    new, old = both
    for _ in range(RPM):
        assert (await admit_new(new, T0)) if first == "new" else old.admit(T0)
    assert not ((await admit_new(new, T0 + 1.0)) if first == "old" else old.admit(T0 + 1.0))


async def test_requests_reconciled_after_an_outage_count_for_both(
        both: tuple[RedisLimitStore, LastRelease]) -> None:
    """`consume` (what a local limiter admitted during an outage) keeps the old key too,
    and counts what the last release's own `consume` wrote."""
    new, old = both
    await new.consume(Limits(rpm=RPM), "k1", 6, 0, T0)
    old.consume(3, T0)
    assert await admit_new(new, T0) and not await admit_new(new, T0)
    assert not old.admit(T0)


async def test_this_release_alone_never_reads_the_old_key_back(
        both: tuple[RedisLimitStore, LastRelease], own_redis: RedisServer) -> None:
    """Between replicas of this release the old key is written, never read back (an
    arrival time at an epoch-sized clock is off by ~0.24 us, which would make the exact
    bucket drift): it holds what this release wrote last (`g`), and a burst is exactly
    the rpm."""
    new, _ = both
    got = [await admit_new(new, T0) for _ in range(RPM + 1)]
    assert got == [True] * RPM + [False]
    with redis.Redis.from_url(own_redis.url) as r:
        assert r.get(NS + "gcra") == r.hget(NS + "rpm", "g")
        assert float(r.get(NS + "gcra") or 0) == T0 + 60.0  # the whole window spent
