"""HttpValidationStore against a real validation server on a free port."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from authz.cli.main import main
from authz.state.keys.base import KeyAdmin, KeyStore, StoreUnavailable
from authz.state.keys.cache import RemoteOptions
from authz.state.keys.http import NO_MODEL, HttpValidationStore
from policy.errors import ApiError
from policy.keyrecord import KeyRecord
from policy.keys import check_record, fingerprint, new_secret
from tests.helpers import write_policy
from tests.state.validation_server import ValidationServer

NOW = datetime(2026, 6, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


MakeStore = Callable[..., Awaitable[HttpValidationStore]]


@pytest.fixture
async def server() -> AsyncIterator[ValidationServer]:
    s = ValidationServer()
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def make_store(server: ValidationServer, clock: Clock) -> AsyncIterator[MakeStore]:
    stores: list[HttpValidationStore] = []

    async def make(**kw: Any) -> HttpValidationStore:
        """RemoteOptions fields (timeout_s, grace_s, max_entries) or the store's TTLs."""
        kw.setdefault("clock", clock)
        kw.setdefault("timeout_s", 0.5)
        opts = {k: kw.pop(k) for k in ("timeout_s", "grace_s", "max_entries", "clock") if k in kw}
        store = HttpValidationStore(server.base_url, RemoteOptions(**opts), **kw)
        await store.start()
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


@pytest.fixture
async def store(make_store: MakeStore) -> HttpValidationStore:
    return await make_store()


async def find(store: HttpValidationStore, secret: str) -> KeyRecord | None:
    return await store.find(fingerprint(secret), secret)


def find_now(store: HttpValidationStore, secret: str) -> KeyRecord | None:
    """find() that must complete without suspending once (no I/O, no awaiting)."""
    coro: Coroutine[Any, Any, KeyRecord | None] = store.find(fingerprint(secret), secret)
    with pytest.raises(StopIteration) as stop:
        coro.send(None)
    result: KeyRecord | None = stop.value.value
    return result


async def until(cond: Callable[[], bool], within_s: float = 2.0) -> None:
    deadline = time.monotonic() + within_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def reason(key: KeyRecord | None) -> str:
    with pytest.raises(ApiError) as err:
        check_record(key, NOW)
    assert err.value.status == 401
    return err.value.message


# --- mapping -----------------------------------------------------------------------------


def test_is_a_read_only_keystore() -> None:
    store = HttpValidationStore("http://127.0.0.1:1")
    assert isinstance(store, KeyStore)
    assert not isinstance(store, KeyAdmin)


@pytest.mark.parametrize("argv", [["keys", "update", "k1", "--rpm", "5"],
                                  ["keys", "create", "--org", "o"]])
def test_the_cli_refuses_to_write_its_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           argv: list[str]) -> None:
    url = "http://127.0.0.1:1"
    path = write_policy(tmp_path, url, key_store={"validation_url": url})
    assert main([*argv, "--config", str(path)], env={}) == 1
    err = capsys.readouterr().err.strip()
    assert f"keys are managed by the validation service at {url}" in err and "\n" not in err


@pytest.mark.parametrize("url", ["ftp://host", "127.0.0.1:80", "http://"])
def test_rejects_bad_url(url: str) -> None:
    with pytest.raises(ValueError):
        HttpValidationStore(url)


def test_repr_has_no_credentials() -> None:
    store = HttpValidationStore("http://user:hunter2@svc:8080/")
    assert "hunter2" not in repr(store)
    assert store.url == "http://svc:8080/v1/auth/validate-api-key"


async def test_valid_restricted_key(server: ValidationServer, store: HttpValidationStore) -> None:
    secret = new_secret()
    server.valid(
        secret, apiKeyId="ak_123", organizationId="org-9",
        scopes=["inference:read", "admin:everything"],
        modelAccessMode="restricted", grantedModels=["model-a", "model-b"],
        expiresAt="2027-01-01T00:00:00Z",
    )
    rec = await find(store, secret)
    assert rec == KeyRecord(
        id="ak_123", org="org-9", sha256=fingerprint(secret), scopes=("inference:read",),
        models=("model-a", "model-b"), status="active",
        expires_at=datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert server.calls[secret] == 1


async def test_auto_grant_means_every_model(
    server: ValidationServer, store: HttpValidationStore
) -> None:
    secret = new_secret()
    server.valid(secret, modelAccessMode="auto_grant", grantedModels=["model-a"])
    rec = await find(store, secret)
    assert rec is not None
    assert rec.models == ()
    assert rec.scopes == ("inference:read", "inference:write")
    assert rec.expires_at is None
    assert check_record(rec, NOW).may_use("anything")


async def test_restricted_without_models_grants_none(
    server: ValidationServer, store: HttpValidationStore
) -> None:
    secret = new_secret()
    server.valid(secret, modelAccessMode="restricted", grantedModels=[])
    rec = await find(store, secret)
    assert rec is not None and rec.models == (NO_MODEL,)
    assert not check_record(rec, NOW).may_use("model-a")


async def test_missing_fields_and_go_timestamps(
    server: ValidationServer, store: HttpValidationStore
) -> None:
    secret = new_secret()
    server.valid(secret, expiresAt="2027-01-01T00:00:00.123456789+02:00")
    del server.answers[secret]["scopes"], server.answers[secret]["modelAccessMode"]
    rec = await find(store, secret)
    assert rec is not None
    assert rec.scopes == () and rec.models == ()
    assert rec.expires_at == datetime(2026, 12, 31, 22, 0, 0, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    ("key_id", "expected"),
    [("key id/ä:1", "key_id___1"), ("k" * 100, "k" * 64), ("", "unknown")],
)
async def test_odd_key_ids_are_made_safe(
    server: ValidationServer, store: HttpValidationStore, key_id: str, expected: str
) -> None:
    secret = new_secret()
    server.valid(secret, apiKeyId=key_id)
    rec = await find(store, secret)
    assert rec is not None and rec.id == expected


async def test_revoked_expired_and_unknown_keep_their_401s(
    server: ValidationServer, store: HttpValidationStore
) -> None:
    revoked, expired, unknown = new_secret(), new_secret(), new_secret()
    server.revoked(revoked)
    server.expired(expired)
    r = await find(store, revoked)
    assert r is not None and r.status == "revoked" and r.scopes == ()
    e = await find(store, expired)
    assert e is not None and e.expires_at is not None and e.expires_at < NOW
    assert await find(store, unknown) is None
    assert "revoked" in reason(r)
    assert "expired" in reason(e)
    assert "Incorrect" in reason(None)


# --- caching -----------------------------------------------------------------------------


async def test_positive_and_negative_answers_are_cached(
    server: ValidationServer, store: HttpValidationStore
) -> None:
    good, bad, revoked = new_secret(), new_secret(), new_secret()
    server.valid(good)
    server.revoked(revoked)
    first = [await find(store, s) for s in (good, bad, revoked)]
    # a fresh hit completes without suspending: no HTTP round trip, no awaiting
    assert [find_now(store, s) for s in (good, bad, revoked)] == first
    assert server.total_calls == 3


async def test_negative_ttl_expiry_asks_again(
    server: ValidationServer, store: HttpValidationStore, clock: Clock
) -> None:
    secret = new_secret()
    assert await find(store, secret) is None
    server.valid(secret)
    clock.t += 0.5
    assert find_now(store, secret) is None
    clock.t += 0.6  # created at the service: visible once the negative TTL has passed
    assert await find(store, secret) is not None
    assert server.calls[secret] == 2


async def test_stale_positive_is_served_while_refreshing_once(
    server: ValidationServer, store: HttpValidationStore, clock: Clock
) -> None:
    secret = new_secret()
    server.valid(secret)
    old = await find(store, secret)
    server.valid(secret, scopes=["inference:read"])
    server.delay_s = 0.1
    clock.t += 1.5  # stale but younger than 2 x TTL
    for _ in range(5):
        assert find_now(store, secret) == old  # at once, while one refresh runs
    await until(lambda: server.calls[secret] == 2)
    await until(lambda: find_now(store, secret) != old)
    rec = find_now(store, secret)
    assert rec is not None and rec.scopes == ("inference:read",)
    await asyncio.sleep(0.05)
    assert server.calls[secret] == 2


async def test_old_positive_waits_for_the_service(
    server: ValidationServer, store: HttpValidationStore, clock: Clock
) -> None:
    secret = new_secret()
    server.valid(secret)
    assert await find(store, secret) is not None
    server.revoked(secret)
    clock.t += 2.0  # revocation at the service is visible within 2 x TTL (2 s)
    rec = await find(store, secret)
    assert rec is not None and rec.status == "revoked"
    assert server.calls[secret] == 2


async def test_cache_is_bounded(server: ValidationServer, make_store: MakeStore) -> None:
    store = await make_store(max_entries=10)
    hot = new_secret()
    server.valid(hot)
    await find(store, hot)
    for _ in range(50):
        await find(store, new_secret())
        assert find_now(store, hot) is not None  # recently used: not evicted
        assert store.cache_size <= 10 + 10  # keys found, and apart those not found
    assert store.cache_size == 1 + 10
    assert server.calls[hot] == 1


async def test_random_keys_never_evict_a_real_one(
    server: ValidationServer, make_store: MakeStore, clock: Clock
) -> None:
    """A spray of random bearer tokens (each a miss) fills only the misses' LRU: a real
    key not used meanwhile keeps its cached answer, and so keeps working through an
    outage of the service within the grace period."""
    store = await make_store(max_entries=10)
    real = new_secret()
    server.valid(real)
    rec = await find(store, real)
    assert rec is not None
    for _ in range(100):
        assert await find(store, new_secret()) is None
    assert store.cache_size == 1 + 10
    await server.stop()
    clock.t += 5  # past 2 x TTL: a refresh is tried, fails, the cached answer serves
    assert await find(store, real) == rec


# --- coalescing and cancellation ---------------------------------------------------------


async def test_concurrent_misses_share_one_request(
    server: ValidationServer, store: HttpValidationStore
) -> None:
    secret = new_secret()
    server.delay_s = 0.1
    results = await asyncio.gather(*(find(store, secret) for _ in range(100)))
    assert results == [None] * 100
    assert server.total_calls == 1


async def test_a_cancelled_waiter_does_not_cancel_the_others(
    server: ValidationServer, store: HttpValidationStore
) -> None:
    secret = new_secret()
    server.valid(secret)
    server.delay_s = 0.2
    tasks = [asyncio.create_task(find(store, secret)) for _ in range(3)]
    await asyncio.sleep(0.05)
    tasks[0].cancel()
    r1, r2 = await tasks[1], await tasks[2]
    assert r1 is not None and r1 == r2
    assert tasks[0].cancelled()
    assert server.calls[secret] == 1


async def test_request_completes_when_every_waiter_is_cancelled(
    server: ValidationServer, store: HttpValidationStore
) -> None:
    secret = new_secret()
    server.valid(secret)
    server.delay_s = 0.1
    task = asyncio.create_task(find(store, secret))
    await asyncio.sleep(0.03)
    task.cancel()
    await until(lambda: store.cache_size == 1)
    assert find_now(store, secret) is not None
    assert server.calls[secret] == 1


async def test_close_fails_waiters_cleanly(
    server: ValidationServer, store: HttpValidationStore
) -> None:
    server.delay_s = 1.0
    task = asyncio.create_task(find(store, new_secret()))
    await asyncio.sleep(0.05)
    await store.close()
    with pytest.raises(StoreUnavailable):
        await task


# --- failures ----------------------------------------------------------------------------


async def test_service_down_grace_and_recovery(
    server: ValidationServer, store: HttpValidationStore, clock: Clock
) -> None:
    known, unknown = new_secret(), new_secret()
    server.valid(known)
    rec = await find(store, known)
    await server.stop()

    clock.t += 5  # past 2 x TTL: a refresh is attempted, fails, the cached key works
    assert await find(store, known) == rec
    assert find_now(store, known) == rec  # known outage: no waiting within grace

    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as err:
        await find(store, unknown)
    assert time.monotonic() - started < 0.5 + 0.5
    assert server.base_url in str(err.value)

    clock.t += 300  # grace over: fail closed
    with pytest.raises(StoreUnavailable):
        await find(store, known)

    await server.start()  # same port, same store
    assert await find(store, known) == rec
    assert await find(store, unknown) is None
    server.valid(unknown)
    clock.t += 1.1
    assert await find(store, unknown) is not None


async def test_timeout_is_bounded(server: ValidationServer, make_store: MakeStore) -> None:
    store = await make_store(timeout_s=0.3)
    server.delay_s = 5.0
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"no answer within 0\.3s"):
        await find(store, new_secret())
    assert time.monotonic() - started < 0.3 + 0.4


@pytest.mark.parametrize(
    "setup",
    [
        {"fail_status": 500},
        {"fail_status": 503},
        {"fail_status": 400},
        {"raw": b"<html>oops</html>"},
        {"raw": b'{"ok": true}'},
        {"raw": b'{"valid": true, "apiKeyId": "k"}'},
        {"raw": b'{"valid": true, "apiKeyId": "k", "organizationId": "o", "scopes": "x"}'},
        {"raw": b"x" * (2 << 20)},
    ],
)
async def test_bad_answers_fail_closed_unless_in_grace(
    server: ValidationServer, store: HttpValidationStore, clock: Clock, setup: dict[str, Any]
) -> None:
    known = new_secret()
    server.valid(known)
    rec = await find(store, known)
    for name, value in setup.items():
        setattr(server, name, value)
    with pytest.raises(StoreUnavailable, match="key validation service"):
        await find(store, new_secret())
    clock.t += 10
    assert await find(store, known) == rec


async def test_secret_never_logged_or_raised(
    server: ValidationServer, make_store: MakeStore, clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    store = await make_store(timeout_s=0.2)
    secret, other = new_secret(), new_secret()
    server.valid(secret)
    await find(store, secret)
    errors: list[BaseException] = []
    for setup in ({"fail_status": 500}, {"delay_s": 1.0}, {"raw": secret.encode()}):
        for name, value in setup.items():
            setattr(server, name, value)
        clock.t += 1000
        for s in (secret, other):
            with pytest.raises(StoreUnavailable) as err:
                await find(store, s)
            errors.append(err.value)
        server.fail_status, server.delay_s, server.raw = None, 0.0, None
    await server.stop()
    clock.t += 1000
    with pytest.raises(StoreUnavailable) as err:
        await find(store, other)
    errors.append(err.value)

    keys_logs = [r for r in caplog.records if r.name == "tokenbooth.keys"]
    assert len(keys_logs) == 7
    assert any(fingerprint(secret)[:8] in r.getMessage() for r in keys_logs)
    for s in (secret, other):
        for record in caplog.records:
            assert s not in record.getMessage()
        for exc in errors:
            assert s not in str(exc) and s not in repr(exc)
            assert exc.__cause__ is None and s not in str(exc.__context__)
        assert s not in repr(store) and s not in repr(store._cache)


async def test_a_redirect_is_not_followed_with_the_clients_key() -> None:
    """Security review: aiohttp follows a 307/308 and sends the body again, the client's
    key in it, wherever the redirect points (plain http, another host). Not followed:
    the store fails as unavailable, saying why."""
    from aiohttp import web

    from tests.helpers import free_port

    got: list[bytes] = []

    async def elsewhere(request: web.Request) -> web.Response:
        got.append(await request.read())
        return web.json_response({"valid": False})

    other_port, port = free_port(), free_port()

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"http://127.0.0.1:{other_port}/steal")

    runners = []
    for handler, p in ((elsewhere, other_port), (redirect, port)):
        app = web.Application()
        app.router.add_post("/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", p).start()
        runners.append(runner)
    store = HttpValidationStore(f"http://127.0.0.1:{port}/validate",
                                RemoteOptions(timeout_s=2.0))
    await store.start()
    try:
        secret = new_secret()
        with pytest.raises(StoreUnavailable, match="redirect: not followed"):
            await store.find(fingerprint(secret), secret)
        assert got == []
    finally:
        await store.close()
        for runner in runners:
            await runner.cleanup()
