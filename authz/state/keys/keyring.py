"""The embedded key store: `<data_dir>/keys.json`, fingerprints only.

`tokenbooth keys ...` rewrites the file atomically (temp file + rename) under
an exclusive lock; a running server re-reads it when it changes (polled every
0.5 s), so a created, updated or revoked key takes effect within a second, with
no restart. Lookups are dictionary reads; a miss also checks (one stat) whether the
file changed, so a key just created works at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import orjson
from pydantic import TypeAdapter, ValidationError

from authz.state.keys.base import KeyExists, updated
from policy.keyrecord import KeyRecord

log = logging.getLogger("tokenbooth.keys")

KEYRING_FILE = "keys.json"
POLL_S = 0.5
_RECORDS = TypeAdapter(list[KeyRecord])
# What tells that the file changed: mtime, ctime (a chmod or chown), inode, size.
Stamp = tuple[int, int, int, int]


class KeyringStore:
    def __init__(self, data_dir: Path, poll_s: float = POLL_S) -> None:
        self.path = data_dir / KEYRING_FILE
        self._lock_path = data_dir / "keys.lock"
        self._poll_s = poll_s
        self._by_fp: dict[str, KeyRecord] = {}
        self._stamp: Stamp | None = None
        self._damaged: Stamp | None = None  # unreadable: logged once, not read again
        self._watch: asyncio.Task[None] | None = None

    # -- KeyStore ---------------------------------------------------------------

    async def start(self) -> None:
        self._reload()
        self._watch = asyncio.create_task(self._watch_loop())

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch

    async def find(self, fingerprint: str, secret: str) -> KeyRecord | None:
        record = self._by_fp.get(fingerprint)
        if record is None:
            # A key created a moment ago works at once, not at the next poll (rotation
            # has no 401 window); a stat while the file is unchanged.
            with contextlib.suppress(OSError):
                self._reload()
            record = self._by_fp.get(fingerprint)
        return record

    # -- KeyAdmin ---------------------------------------------------------------

    # File I/O (a lock another process may hold, an fsync) runs in a worker thread: the
    # admin API calls these on serve's event loop, which every request passes through.

    async def create(self, record: KeyRecord) -> None:
        await asyncio.to_thread(self._create, record)

    async def get(self, key_id: str) -> KeyRecord | None:
        records = await asyncio.to_thread(self._read)
        return next((r for r in records if r.id == key_id), None)

    async def list_keys(self, org: str | None = None) -> list[KeyRecord]:
        records = await asyncio.to_thread(self._read)
        return [r for r in records if org is None or r.org == org]

    async def revoke(self, key_id: str) -> KeyRecord | None:
        return await asyncio.to_thread(
            self._modify, key_id, lambda r: r.model_copy(update={"status": "revoked"}))

    async def update(self, key_id: str, changes: Mapping[str, object]) -> KeyRecord | None:
        return await asyncio.to_thread(self._modify, key_id, lambda r: updated(r, changes))

    def _create(self, record: KeyRecord) -> None:
        with self._locked() as records:
            if any(r.id == record.id or r.sha256 == record.sha256 for r in records):
                raise KeyExists(f"a key with id {record.id!r} already exists")
            records.append(record)

    def _modify(self, key_id: str, change: Callable[[KeyRecord], KeyRecord]
                ) -> KeyRecord | None:
        """Replace one record under the lock (nothing is written if `change` raises)."""
        with self._locked() as records:
            for i, r in enumerate(records):
                if r.id == key_id:
                    records[i] = change(r)
                    return records[i]
        return None

    # -- file handling ------------------------------------------------------------

    def _read(self) -> list[KeyRecord]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            return _RECORDS.validate_python(orjson.loads(raw).get("keys", []))
        except (orjson.JSONDecodeError, ValidationError, AttributeError) as e:
            raise ValueError(f"{self.path}: damaged keyring: {str(e).splitlines()[0]}") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[KeyRecord]]:
        """Read-modify-write under an exclusive lock; the new file replaces the old at once."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            records = self._read()
            yield records
            data = orjson.dumps(
                {"keys": [r.model_dump(mode="json") for r in records]},
                option=orjson.OPT_INDENT_2,
            )
            tmp = self.path.with_suffix(".tmp")
            tfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(tfd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            os.close(fd)
        self._reload()

    def _reload(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size)
        except FileNotFoundError:
            stamp = (0, 0, 0, 0)
        if stamp in (self._stamp, self._damaged):
            return
        try:
            records = self._read()
        except (ValueError, OSError) as e:  # damaged, or unreadable (its owner, mode)
            log.error("keyring not reloaded, keeping the last good one: %s", e)
            self._damaged = stamp
            return
        self._stamp = stamp
        self._by_fp = {r.sha256: r for r in records}

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                self._reload()
            except OSError as e:  # never the end of the watch: revocations must land
                log.error("keyring not reloaded: %s", e)
