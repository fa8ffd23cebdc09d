"""The org limits cache (authz/state/orgs.py) against a real redis-server."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path

import pytest

from authz.state.orgs import FileOrgStore, OrgLimitsCache, RedisOrgStore
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


async def test_a_file_read_that_blocks_holds_up_the_poll_not_the_loop(tmp_path: Path) -> None:
    """`state: memory` keeps org limits in `<data_dir>/orgs.json`, polled every 0.5 s:
    its stat and read ran on the event loop, where a stalled mount held every decision.
    A named pipe in its place plays the stall: its read waits for a writer, which a
    timer brings after 3 s."""
    store = FileOrgStore(tmp_path)
    os.mkfifo(store.path)
    released = threading.Event()

    def writer() -> None:
        with open(store.path, "wb") as pipe:
            pipe.write(b'{"acme": {"rpm": 7}}')
        released.set()

    timer = threading.Timer(3.0, writer)
    timer.start()
    cache = OrgLimitsCache(store, poll_s=0.05)
    try:
        start = asyncio.create_task(cache.start())  # its first refresh reads the pipe
        await asyncio.sleep(0.2)
        assert not start.done() and not released.is_set()  # the loop ran meanwhile
        await asyncio.wait_for(start, 10)
        # The writer's thread sets `released` just after the read it unblocked returns.
        assert released.wait(5) and cache.stored("acme") == OrgLimits(rpm=7)
    finally:
        timer.cancel()
        await cache.close()


async def test_a_store_away_is_said_once_and_its_return_once(
        own_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """Every poll (twice a second) logged a warning while Redis was away: ~170,000 lines
    a day of an outage. The refresh says the failure once, and once that it read again;
    the last good limits stay in force meanwhile."""
    store = RedisOrgStore(own_redis.url, timeout_s=0.5)
    cache = OrgLimitsCache(store, poll_s=3600)
    try:
        await store.put("acme", OrgLimits(rpm=20))
        await cache.refresh()
        own_redis.stop()
        with caplog.at_level(logging.WARNING, logger="tokenbooth"):
            for _ in range(5):
                await cache.refresh()
            limits = cache.stored("acme")
            assert limits is not None and limits.rpm == 20
            own_redis.start()
            await cache.refresh()
            await cache.refresh()
        said = [r.getMessage() for r in caplog.records if "org limits" in r.getMessage()]
        assert len(said) == 2 and "not refreshed" in said[0] and said[1] == \
            "org limits read again", said
    finally:
        await cache.close()
