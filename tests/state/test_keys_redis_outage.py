"""Redis stops mid-run: cached keys keep working for the grace period, unknown keys
fail closed fast, and the store recovers when Redis returns — no restart."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from authz.state.keys.base import StoreUnavailable
from authz.state.keys.cache import RemoteOptions
from authz.state.keys.redis_store import RedisKeyStore
from policy.keyrecord import KeyRecord
from policy.keys import fingerprint, new_secret
from tests.redis_server import RedisServer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_outage_grace_fail_closed_and_recovery(own_redis: RedisServer) -> None:
    clock = FakeClock()
    store = RedisKeyStore(own_redis.url, RemoteOptions(timeout_s=0.3, grace_s=60, clock=clock),
                          poll_s=0.1)
    await store.start()
    try:
        known, unknown = new_secret(), new_secret()
        rec = KeyRecord(id="k1", org="acme", sha256=fingerprint(known))
        await store.create(rec)
        assert await store.find(rec.sha256, known) == rec  # now cached

        own_redis.stop()
        await asyncio.sleep(0.3)  # the version poll notices
        # Cached: still served, no round trip.
        assert await store.find(rec.sha256, known) == rec
        # Unknown: refused fast, never a hang.
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.find(fingerprint(unknown), unknown)
        assert time.monotonic() - t0 < 1.0
        # Past the grace period even cached keys fail closed.
        clock.now += 61
        with pytest.raises(StoreUnavailable):
            await store.find(rec.sha256, known)

        own_redis.start()  # same port
        deadline = time.monotonic() + 5
        while True:
            try:
                found = await store.find(rec.sha256, known)
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "never recovered"
                await asyncio.sleep(0.1)
        # This Redis kept nothing on disk: the key is gone, and the store says so.
        assert found is None
        await store.create(rec)
        assert await store.find(rec.sha256, known) == rec
    finally:
        await store.close()


async def test_redis_down_at_start_does_not_block_start(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # never started
    store = RedisKeyStore(server.url, RemoteOptions(timeout_s=0.2), poll_s=0.1)
    t0 = time.monotonic()
    await store.start()
    try:
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(StoreUnavailable):
            await store.find("0" * 64, "x")
    finally:
        await store.close()
