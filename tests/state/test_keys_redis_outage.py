"""Redis stops mid-run: cached keys keep working for the grace period, unknown keys
fail closed fast, and the store recovers when Redis returns — no restart."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from authz.runtime.metrics import Metrics, ObservedKeyStore
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


async def test_the_store_says_an_outage_while_cached_keys_are_served(
        own_redis: RedisServer) -> None:
    """Observability tester: `tokenbooth_store_up{store="keys"}` stayed 1 through a whole
    Redis outage while cached keys were served, since only lookups reported. The store's
    own version polls now say each failed call, and the first that answers after."""
    m = Metrics()
    store = RedisKeyStore(own_redis.url, RemoteOptions(timeout_s=0.3, grace_s=60), poll_s=0.1)
    keys = ObservedKeyStore(store, m)
    await keys.start()
    try:
        secret = new_secret()
        rec = KeyRecord(id="k1", org="acme", sha256=fingerprint(secret))
        await store.create(rec)
        assert await keys.find(rec.sha256, secret) == rec
        own_redis.stop()
        for _ in range(100):
            if m.registry.get_sample_value("tokenbooth_store_up", {"store": "keys"}) == 0:
                break
            await asyncio.sleep(0.05)
        assert await keys.find(rec.sha256, secret) == rec  # cached: still served
        assert m.registry.get_sample_value("tokenbooth_store_up", {"store": "keys"}) == 0
        errors = m.registry.get_sample_value("tokenbooth_store_errors_total",
                                             {"store": "keys"})
        assert errors is not None and errors >= 1
        own_redis.start()
        for _ in range(100):
            if m.registry.get_sample_value("tokenbooth_store_up", {"store": "keys"}) == 1:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the store's return was never said")
    finally:
        await keys.close()


async def test_random_keys_never_evict_a_cached_key(own_redis: RedisServer) -> None:
    """A spray of random bearer tokens (each a miss, cached as such) evicts only other
    misses: a real key not used meanwhile keeps its cached answer, so it keeps working
    through a Redis outage within the grace period."""
    store = RedisKeyStore(own_redis.url, RemoteOptions(timeout_s=0.3, grace_s=60,
                                                       max_entries=10), poll_s=0.1)
    await store.start()
    try:
        known = new_secret()
        rec = KeyRecord(id="k1", org="acme", sha256=fingerprint(known))
        await store.create(rec)
        assert await store.find(rec.sha256, known) == rec  # now cached
        for _ in range(100):
            spray = new_secret()
            assert await store.find(fingerprint(spray), spray) is None

        own_redis.stop()
        await asyncio.sleep(0.3)  # the version poll notices
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


async def test_a_lookup_that_read_an_older_version_does_not_revive_a_revoked_key(
        own_redis: RedisServer) -> None:
    """A lookup reads the version, another replica revokes a key, the poll sees the new
    version, then the lookup ends: the older version it read must not become the
    replica's again, or the revoked key's cached entry passes as fresh until the next
    poll."""
    store = RedisKeyStore(own_redis.url, RemoteOptions(timeout_s=1.0), poll_s=3600)
    admin = RedisKeyStore(own_redis.url, RemoteOptions(timeout_s=1.0))
    await store.start()
    try:
        revoked, other = new_secret(), new_secret()
        a = KeyRecord(id="k-a", org="acme", sha256=fingerprint(revoked))
        b = KeyRecord(id="k-b", org="acme", sha256=fingerprint(other))
        await admin.create(a)
        await admin.create(b)
        assert await store.find(a.sha256, revoked) == a  # cached
        slow_read = await store._fetch(b.sha256)  # the version as it was, then...
        await admin.revoke("k-a")  # ...another replica revokes
        await store._check_version()  # the poll sees it
        fetch = store._fetch

        async def late(fp: str) -> tuple[bytes | None, bytes | None]:
            return slow_read if fp == b.sha256 else await fetch(fp)

        store._fetch = late  # type: ignore[method-assign]
        assert await store.find(b.sha256, other) == b  # the slow lookup ends now
        found = await store.find(a.sha256, revoked)
        assert found is not None and found.status == "revoked"
    finally:
        await store.close()
        await admin.close()


async def test_listing_many_keys_takes_a_few_round_trips(own_redis: RedisServer) -> None:
    """Budget alerts list every stored key at each rescan: 2,500 keys come in order, in
    a few MGETs, not two GETs per key."""
    import redis

    store = RedisKeyStore(own_redis.url, RemoteOptions(timeout_s=5.0))
    try:
        recs = [KeyRecord(id=f"k-{i:05d}", org=f"org-{i % 3}",
                          sha256=fingerprint(f"sk-tb-list-{i}")) for i in range(2500)]
        for r in recs:
            await store.create(r)
        sync = redis.Redis.from_url(own_redis.url)
        sync.config_resetstat()
        assert await store.list_keys() == recs
        assert await store.list_keys("org-1") == [r for r in recs if r.org == "org-1"]
        calls = {k.removeprefix("cmdstat_"): v["calls"]
                 for k, v in sync.info("commandstats").items()}
        sync.close()
        assert calls.get("get", 0) == 0 and calls["mget"] <= 12, calls
    finally:
        await store.close()
