"""One contract, every writable key store: the embedded keyring and a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from authz.state.keys.base import KeyAdmin, KeyExists, KeyStore
from authz.state.keys.keyring import KeyringStore
from authz.state.keys.redis_store import RedisKeyStore
from policy.keyrecord import KeyRecord
from policy.keys import fingerprint, new_secret
from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


Factory = Callable[[], Any]


@pytest.fixture(params=["keyring", "redis"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    """Makes store instances over one shared backing store (each one a 'replica')."""
    if request.param == "keyring":
        return lambda: KeyringStore(tmp_path, poll_s=0.1)
    server: RedisServer = request.getfixturevalue("redis_server")
    db = abs(hash(tmp_path)) % 15 + 1  # a database of its own per test
    url = server.url.rsplit("/", 1)[0] + f"/{db}"
    import redis

    redis.Redis.from_url(url).flushdb()
    return lambda: RedisKeyStore(url, poll_s=0.1)


@pytest.fixture
async def store(make: Factory) -> AsyncIterator[Any]:
    s = make()
    await s.start()
    yield s
    await s.close()


def record(key_id: str = "k1", org: str = "acme", **kw: Any) -> tuple[KeyRecord, str]:
    secret = new_secret()
    return KeyRecord(id=key_id, org=org, sha256=fingerprint(secret), prefix=secret[:10],
                     created_at=datetime.now(UTC), **kw), secret


async def test_implements_the_protocols(store: Any) -> None:
    assert isinstance(store, KeyStore) and isinstance(store, KeyAdmin)


async def test_create_find_get_list(store: Any) -> None:
    rec, secret = record(rpm=10, models=("demo",))
    assert await store.find(rec.sha256, secret) is None
    await store.create(rec)
    assert await store.find(rec.sha256, secret) == rec
    assert await store.get("k1") == rec
    other, _ = record("k2", org="beta")
    await store.create(other)
    assert [r.id for r in await store.list_keys()] == ["k1", "k2"]
    assert [r.id for r in await store.list_keys("beta")] == ["k2"]
    assert await store.get("nope") is None


async def test_duplicates_are_refused(store: Any) -> None:
    rec, _ = record()
    await store.create(rec)
    with pytest.raises(KeyExists):
        await store.create(record()[0])  # same id
    with pytest.raises(KeyExists):
        await store.create(rec.model_copy(update={"id": "k-other"}))  # same fingerprint


async def test_revoke(store: Any) -> None:
    rec, _ = record()
    await store.create(rec)
    revoked = await store.revoke("k1")
    assert revoked is not None and revoked.status == "revoked"
    assert (await store.get("k1")).status == "revoked"  # type: ignore[union-attr]
    assert await store.revoke("nope") is None


async def within(seconds: float, check: Callable[[], Any]) -> float:
    t0 = time.monotonic()
    while not await check():
        assert time.monotonic() - t0 < seconds, "not seen in time"
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


async def test_another_replica_sees_create_and_revoke_within_2s(make: Factory) -> None:
    a, b = make(), make()
    await a.start()
    await b.start()
    try:
        rec, secret = record()
        assert await b.find(rec.sha256, secret) is None  # cached as unknown on b
        await a.create(rec)

        async def b_knows() -> bool:
            return await b.find(rec.sha256, secret) is not None

        await within(2, b_knows)
        await a.revoke(rec.id)

        async def b_revoked() -> bool:
            found = await b.find(rec.sha256, secret)
            return found is not None and found.status == "revoked"

        await within(2, b_revoked)
    finally:
        await a.close()
        await b.close()


async def test_no_secret_is_stored(store: Any, tmp_path: Path) -> None:
    rec, secret = record()
    await store.create(rec)
    if isinstance(store, KeyringStore):
        dump = store.path.read_bytes()
    else:
        import redis

        r = redis.Redis.from_url(store._url)
        dump = b"".join(r.dump(k) or b"" for k in r.keys("*"))
    assert secret.encode() not in dump
    assert rec.sha256.encode() in dump or isinstance(store, RedisKeyStore)
