"""The org limits cache (authz/state/orgs.py) against a real redis-server."""

from __future__ import annotations

import asyncio

from authz.state.orgs import OrgLimitsCache, RedisOrgStore
from policy.config import OrgLimits
from tests.redis_server import RedisServer


class _SlowRead(RedisOrgStore):
    """The first read_all reads, then its answer is held until `gate` opens (a slow
    network); later ones answer at once."""

    def __init__(self, url: str) -> None:
        super().__init__(url, timeout_s=2.0)
        self.gate = asyncio.Event()
        self.reading = asyncio.Event()
        self._first = True

    async def read_all(self) -> dict[str, OrgLimits]:
        found = await super().read_all()
        if self._first:
            self._first = False
            self.reading.set()
            await self.gate.wait()
        return found


async def test_a_slow_poll_does_not_put_back_limits_older_than_a_put(
        own_redis: RedisServer) -> None:
    other = RedisOrgStore(own_redis.url)  # another replica's admin API
    store = _SlowRead(own_redis.url)
    cache = OrgLimitsCache(store, poll_s=3600)
    try:
        await other.put("acme", OrgLimits(rpm=20))
        poll = asyncio.create_task(cache.refresh())  # reads rpm 20, answer held
        await store.reading.wait()
        put = asyncio.create_task(cache.put("acme", OrgLimits(rpm=30)))
        await asyncio.sleep(0.1)
        store.gate.set()
        await asyncio.gather(poll, put)
        limits = cache.stored("acme")
        assert limits is not None and limits.rpm == 30
    finally:
        await cache.close()
        await other.close()
