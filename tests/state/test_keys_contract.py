"""One contract, every writable key store: the embedded keyring and a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from authz.state.keys.base import UPDATABLE, KeyAdmin, KeyExists, KeyStore
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


@contextlib.asynccontextmanager
async def replicas(make: Factory) -> AsyncIterator[tuple[Any, Any]]:
    """Two started stores over one backing store."""
    a, b = make(), make()
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_another_replica_sees_create_and_revoke_within_2s(make: Factory) -> None:
    async with replicas(make) as (a, b):
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


async def test_a_new_key_works_on_another_replica_at_once(make: Factory) -> None:
    """Key rotation: a client switched to a new key as soon as `keys create` returned
    gets no 401 from a replica that has not polled since (nor after an unknown key)."""
    async with replicas(make) as (a, b):
        assert await b.find("0" * 64, "sk-tb-unknown") is None  # b just looked
        rec, secret = record()
        await a.create(rec)
        assert await b.find(rec.sha256, secret) == rec


async def test_an_unreadable_keyring_does_not_stop_the_watch(tmp_path: Path) -> None:
    """`sudo tokenbooth keys ...` can leave keys.json unreadable by the serving user for
    a while: the server keeps the last good keys and still sees the next good file (a
    revocation) once it is readable again."""
    serving, cli = KeyringStore(tmp_path, poll_s=0.05), KeyringStore(tmp_path)
    rec, secret = record()
    await cli.create(rec)
    await serving.start()
    try:
        assert await serving.find(rec.sha256, secret) == rec
        path = tmp_path / "keys.json"
        saved = path.read_bytes()
        path.unlink()
        path.mkdir()  # reading it fails with an OSError, as EACCES would (tests run as root)
        await asyncio.sleep(0.3)
        assert await serving.find(rec.sha256, secret) == rec  # the last good keys
        assert await serving.find("0" * 64, "sk-tb-unknown") is None
        path.rmdir()
        path.write_bytes(saved)
        await cli.revoke(rec.id)

        async def revoked() -> bool:
            found = await serving.find(rec.sha256, secret)
            return found is not None and found.status == "revoked"

        await within(2, revoked)
    finally:
        await serving.close()


@pytest.mark.parametrize(("content", "says"), [
    (b"{not json", "not JSON ("),
    (b"[]", 'expected a JSON object with "keys", found a list'),
    (b'{"keys": [{"id": "k1"}]}', "keys[0].org: Field required"),
    (b'{"keys": 5}', "keys: Input should be a valid"),
])
async def test_a_damaged_keyring_is_named_in_words(tmp_path: Path, content: bytes,
                                                   says: str) -> None:
    (tmp_path / "keys.json").write_bytes(content)
    with pytest.raises(ValueError) as e:
        await KeyringStore(tmp_path).list_keys(None)
    assert str(e.value).startswith(f"{tmp_path / 'keys.json'}: damaged keyring: {says}")


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


async def test_update_in_place(store: Any) -> None:
    rec, secret = record(rpm=10, budget_usd=Decimal("5"), name="before")
    await store.create(rec)
    new = await store.update("k1", {"rpm": 20, "tpm": 1000, "budget_usd": Decimal("1.25"),
                                    "budget_period": "day", "models": ("demo",),
                                    "scopes": ("inference:read",), "name": "after",
                                    "expires_at": datetime(2030, 1, 1, tzinfo=UTC)})
    assert new is not None
    # Same key, same secret: only the changed fields differ.
    assert new.model_dump(exclude=set(UPDATABLE)) == rec.model_dump(exclude=set(UPDATABLE))
    assert (new.rpm, new.tpm, new.budget_usd, new.budget_period) == (
        20, 1000, Decimal("1.25"), "day")
    assert (new.models, new.scopes, new.name) == (("demo",), ("inference:read",), "after")
    assert await store.get("k1") == new
    assert await store.find(rec.sha256, secret) == new
    cleared = await store.update("k1", {"rpm": None, "budget_usd": None, "models": (),
                                        "expires_at": None})
    assert cleared is not None
    assert (cleared.rpm, cleared.budget_usd, cleared.models, cleared.expires_at) == (
        None, None, (), None)
    assert cleared.tpm == 1000  # untouched
    assert await store.update("nope", {"rpm": 1}) is None


@pytest.mark.parametrize("changes", [{"org": "other"}, {"sha256": "0" * 64}, {"id": "k2"},
                                     {"status": "active"}, {"rpm": 0},
                                     {"budget_usd": Decimal(-1)}, {"scopes": ("admin",)}])
async def test_update_refuses_identity_and_bad_values(store: Any, changes: dict[str, Any]
                                                      ) -> None:
    rec, _ = record(rpm=10)
    await store.create(rec)
    with pytest.raises(ValueError) as e:
        await store.update("k1", changes)
    assert "\n" not in str(e.value)
    assert await store.get("k1") == rec  # nothing written


async def test_update_keeps_a_revocation(store: Any) -> None:
    rec, _ = record()
    await store.create(rec)
    await store.revoke("k1")
    new = await store.update("k1", {"rpm": 5})
    assert new is not None and new.status == "revoked" and new.rpm == 5


async def test_concurrent_updates_both_land(make: Factory) -> None:
    async with replicas(make) as (a, b):
        rec, _ = record()
        await a.create(rec)
        for i in range(1, 6):
            await asyncio.gather(a.update("k1", {"rpm": i}), b.update("k1", {"tpm": 10 * i}))
            got = await a.get("k1")
            assert got is not None and (got.rpm, got.tpm) == (i, 10 * i)


async def test_another_replica_sees_an_update_within_2s(make: Factory) -> None:
    async with replicas(make) as (a, b):
        rec, secret = record(rpm=100)
        await a.create(rec)

        def b_sees(rpm: int | None) -> Callable[[], Any]:
            async def check() -> bool:
                found = await b.find(rec.sha256, secret)
                return found is not None and found.rpm == rpm
            return check

        await within(2, b_sees(100))  # now cached on b
        await a.update(rec.id, {"rpm": 1})
        await within(2, b_sees(1))
        await a.update(rec.id, {"rpm": None})
        await within(2, b_sees(None))


async def test_a_keyring_write_waiting_on_its_lock_leaves_the_event_loop_free(
        tmp_path: Path) -> None:
    """The admin API writes keys on serve's event loop: a write waiting for the file lock
    (a CLI command holding it, a slow fsync) must not stall the requests beside it."""
    import fcntl
    import os
    import threading

    store = KeyringStore(tmp_path)
    rec = KeyRecord(id="k-lock", org="acme", sha256=fingerprint(new_secret()))
    fd = os.open(tmp_path / "keys.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process's `keys` command, say, for 1.5 s
    release = threading.Timer(1.5, os.close, (fd,))
    release.start()
    write = asyncio.create_task(store.create(rec))
    await asyncio.sleep(0)  # the write starts and waits for the lock
    t0 = time.monotonic()
    await asyncio.sleep(0.05)  # a request's turn on the loop
    assert time.monotonic() - t0 < 1.0 and not write.done()
    await asyncio.wait_for(write, 5)
    release.join()
    assert await store.get("k-lock") == rec
