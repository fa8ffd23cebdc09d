"""The keyring is looked at and read off the event loop: a read that blocks (a stalled
mount; here a named pipe the test holds) leaves every known key answered and fails
unknown ones closed in bounded time, and a flood of unknown keys costs a bounded number
of looks and no read of an unchanged file."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from authz.state.keys.base import StoreUnavailable
from authz.state.keys.keyring import KeyringStore
from policy.keyrecord import KeyRecord
from policy.keys import fingerprint, new_secret


def record(key_id: str) -> tuple[KeyRecord, str]:
    secret = new_secret()
    return KeyRecord(id=key_id, org="acme", sha256=fingerprint(secret), prefix=secret[:10],
                     created_at=datetime.now(UTC)), secret


async def until(check: object, what: str, tries: int = 400) -> None:
    """Poll `check` (a coroutine function) on the loop; no time is asserted."""
    for _ in range(tries):
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"never: {what}")


async def test_a_keyring_read_that_blocks_leaves_the_loop_answering(tmp_path: Path) -> None:
    known, known_secret = record("k-known")
    await KeyringStore(tmp_path).create(known)  # `tokenbooth keys create`
    store = KeyringStore(tmp_path, poll_s=0.05, wait_s=0.2)
    await store.start()
    pipe_path = tmp_path / "keys.fifo"
    os.mkfifo(pipe_path)
    pipe_path.rename(store.path)  # the next look opens it and waits for a writer
    new, new_secret_ = record("k-new")
    content = orjson.dumps({"keys": [known.model_dump(mode="json"),
                                     new.model_dump(mode="json")]})
    opened, answered = threading.Event(), threading.Event()
    held: list[bool] = []

    def writer() -> None:
        with open(store.path, "wb") as pipe:  # returns once the store's read has opened it
            opened.set()
            # Were the read on the loop, nothing below would run: let it go after 30 s
            # and say so (a deadlock breaker, not a timing).
            if not answered.wait(30):
                held.append(True)
            pipe.write(content)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        await until(lambda: asyncio.sleep(0, opened.is_set()), "the store opened the pipe")
        assert not held, "the read held the event loop"
        # The read now waits on the pipe. A known key is a dictionary read.
        assert await store.find(known.sha256, known_secret) == known
        # An unknown key cannot be settled until the read ends: it fails closed (a 503,
        # retryable) after wait_s, instead of holding the decision.
        with pytest.raises(StoreUnavailable):
            await store.find(new.sha256, new_secret_)
        # Many of them at once: each bounded, and no look stacked on the hung one.
        begun = store._looks_begun
        secrets = [new_secret() for _ in range(200)]
        results = await asyncio.gather(*(store.find(fingerprint(s), s) for s in secrets),
                                       return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) for r in results)
        assert store._looks_begun == begun
        answered.set()
        thread.join(30)
        assert not held, "the loop was held by the read"

        async def new_key_found() -> bool:
            return await store.find(new.sha256, new_secret_) == new

        await until(new_key_found, "the key read from the pipe")
    finally:
        answered.set()
        await store.close()


class CountingStore(KeyringStore):
    """Counts looks at the file and reads of it."""

    looks = 0
    reads = 0

    def _scan(self, known: object) -> object:  # type: ignore[override]
        self.looks += 1
        return super()._scan(known)  # type: ignore[arg-type]

    def _parse_known(self, raw: bytes, stamp: Any) -> Any:
        self.reads += 1
        return super()._parse_known(raw, stamp)


async def test_a_flood_of_unknown_keys_costs_bounded_looks_and_no_read(tmp_path: Path
                                                                       ) -> None:
    known, _ = record("k-known")
    await KeyringStore(tmp_path).create(known)
    store = CountingStore(tmp_path, poll_s=3600)  # no poll: only misses look
    await store.start()
    try:
        looks, reads = store.looks, store.reads
        for _ in range(3):
            secrets = [new_secret() for _ in range(500)]
            found = await asyncio.gather(*(store.find(fingerprint(s), s) for s in secrets))
            assert found == [None] * 500
        # Each burst shares one look (a stat); the unchanged file is not read again.
        assert store.looks - looks == 3
        assert store.reads == reads
        # A key another process creates is found by the next miss, and read once.
        new, secret = record("k-new")
        await KeyringStore(tmp_path).create(new)
        assert await store.find(new.sha256, secret) == new
        assert store.reads == reads + 1
    finally:
        await store.close()


async def test_close_waits_for_a_look_in_flight(tmp_path: Path) -> None:
    """Operators tester: `keys update` (at 8,000 keys) exited 134, "FATAL: exception not
    rethrown", after it had updated the key: the watcher's look, left running in its
    daemon thread as the interpreter exited, was stopped inside pydantic's compiled code.
    `close` now waits for a look in flight."""
    ended = threading.Event()

    class SlowStore(KeyringStore):
        def _scan(self, known: Any) -> Any:
            time.sleep(0.3)  # a large keyring's read
            try:
                return super()._scan(known)
            finally:
                ended.set()

    known, _ = record("k-known")
    await KeyringStore(tmp_path).create(known)
    store = SlowStore(tmp_path, poll_s=0.01)
    await store.start()
    ended.clear()
    await asyncio.sleep(0.05)  # the watcher's next look is under way
    assert store._look is not None
    await store.close()
    assert ended.is_set()


async def test_writes_and_lists_cost_what_changed(tmp_path: Path) -> None:
    """Operators tester: at 8,000 keys each create re-read, re-validated and re-dumped
    every key (~220 ms of the interpreter, and requests slowed meanwhile; paging the
    admin API's list read the whole file per page). The file as last read or written is
    kept: an unchanged file is not read again, a changed one is validated only where it
    changed, and a write dumps only the record it adds or replaces."""
    validated: list[object] = []

    class Counting(CountingStore):
        def _validate(self, adapter: Any, value: object, at: tuple[int, ...]) -> Any:
            validated.append(value)
            return super()._validate(adapter, value, at)

    seed = KeyringStore(tmp_path)
    for i in range(50):
        await seed.create(record(f"k-{i}")[0])
    store = Counting(tmp_path)
    assert len(await store.list_keys()) == 50
    assert (store.reads, len(validated)) == (1, 50)  # the first read validates them all
    for i in range(5):
        await store.create(record(f"k-new-{i}")[0])
    for _ in range(3):
        assert len(await store.list_keys()) == 55
    assert await store.update("k-3", {"rpm": 7}) is not None
    assert (store.reads, len(validated)) == (1, 50)
    # Another process's write: read again, only its record validated.
    await seed.revoke("k-7")
    keys = {k.id: k for k in await store.list_keys()}
    assert (store.reads, len(validated)) == (2, 51)
    assert keys["k-7"].status == "revoked" and keys["k-3"].rpm == 7 and len(keys) == 55
    # What is written reads back the same, whoever reads it.
    assert {k.id: k for k in await KeyringStore(tmp_path).list_keys()} == keys


async def test_key_admin_refuses_a_keyring_that_is_not_a_file(tmp_path: Path) -> None:
    """A named pipe at keys.json held key admin (list, create) for good: refused now."""
    store = KeyringStore(tmp_path)
    os.mkfifo(store.path)
    with pytest.raises(ValueError, match="not a regular file"):
        await asyncio.wait_for(store.list_keys(), 10)
    with pytest.raises(ValueError, match="not a regular file"):
        await asyncio.wait_for(store.create(record("k-new")[0]), 10)


async def test_a_deleted_keyring_keeps_the_last_good_keys(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Storage tester: `rm keys.json` while serve ran made every stored key a 401 within
    2 s, without a word; the README promises that a keyring that cannot be read keeps
    the last good keys, with an error. A keyring that was there and is gone is one that
    cannot be read; one written again is read as ever."""
    known, secret = record("k-known")
    await KeyringStore(tmp_path).create(known)
    store = KeyringStore(tmp_path, poll_s=0.01)
    await store.start()
    try:
        assert await store.find(known.sha256, secret) is not None
        (tmp_path / "keys.json").unlink()
        await until(lambda: asyncio.sleep(0, "gone" in caplog.text), "the error line")
        assert await store.find(known.sha256, secret) is not None
        assert caplog.text.count("keeping the last good one") == 1  # said once
        other, other_secret = record("k-new")  # a new keyring is the keyring
        await KeyringStore(tmp_path).create(other)
        await until(lambda: asyncio.sleep(0, store._by_fp.get(other.sha256) is not None),
                    "the new keyring read")
        assert await store.find(known.sha256, secret) is None
        assert await store.find(other.sha256, other_secret) is not None
    finally:
        await store.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="gives files to another user: needs root")
async def test_a_keyring_written_by_root_stays_the_services_to_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Security review: `sudo tokenbooth keys revoke` wrote keys.json as root, mode 0600:
    the services (another user) could not read it and kept the keys they had, the
    revoked one working on. Root keeps the owner the keyring had (a first one: the
    data_dir's); another user than its owner is refused, saying why."""
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 1000, 1000)
    store = KeyringStore(data)
    rec = KeyRecord(id="k1", org="acme", sha256=fingerprint(new_secret()),
                    created_at=datetime(2026, 1, 1, tzinfo=UTC))
    await store.create(rec)  # a first keyring: the data_dir's owner
    assert (store.path.stat().st_uid, store.path.stat().st_gid) == (1000, 1000)
    await store.revoke("k1")
    assert store.path.stat().st_uid == 1000
    monkeypatch.setattr(os, "geteuid", lambda: 1001)  # another user than its owner
    with pytest.raises(PermissionError, match="run `keys` as that user"):
        await store.create(KeyRecord(id="k2", org="acme", sha256=fingerprint(new_secret()),
                                     created_at=datetime(2026, 1, 1, tzinfo=UTC)))
