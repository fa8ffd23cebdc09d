"""Keys in Redis, shared by every replica.

Layout (one hash slot, `{tb-keys}`, so Lua scripts work on Redis Cluster):
  tb:{tb-keys}:fp:<sha256>  JSON record     tb:{tb-keys}:id:<id>  its sha256
  tb:{tb-keys}:ids          set of ids      tb:{tb-keys}:version  bumped on every change

Each replica caches lookups (hits and misses), each stamped with the version
read in the same round trip, and polls the version key every 0.5 s: entries
older than the current version are looked up again, so creation, updates and
revocation reach every replica within a second. A fresh cached check is a
dictionary read. When Redis is unreachable, cached keys keep working for
`grace_s` after the last successful contact; others fail closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from authz.state.keys.base import KeyExists, StoreUnavailable, updated
from authz.state.keys.cache import AnswerCache, RemoteOptions
from authz.state.tasks import cancel_and_wait
from policy.keyrecord import KeyRecord

log = logging.getLogger("tokenbooth.keys")

_NS = "tb:{tb-keys}"
FP, ID, IDS, VERSION = f"{_NS}:fp:", f"{_NS}:id:", f"{_NS}:ids", f"{_NS}:version"
LIST_BATCH = 1000  # keys per MGET when listing

# KEYS: fp key, id key, ids set, version. ARGV: record JSON, id, sha256.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('INCR', KEYS[4])
return 1
"""
# Compare-and-set of one record. KEYS: fp key, version. ARGV: new JSON, the JSON it
# replaces. 0: no such key; -1: changed meanwhile (read again); 1: done.
_SWAP = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
if cur ~= ARGV[2] then return -1 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('INCR', KEYS[2])
return 1
"""
# Read-modify-write rounds before giving up under a storm of concurrent changes.
_SWAP_ATTEMPTS = 8


def connect(url: str, timeout_s: float) -> aioredis.Redis:
    """A client whose every call is bounded: short timeouts, no silent retries."""
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
    return client


class RedisKeyStore:
    def __init__(self, url: str, options: RemoteOptions | None = None, *,
                 poll_s: float = 0.5) -> None:
        options = options or RemoteOptions()
        self._url = url
        self._redis = connect(url, options.timeout_s)
        self._grace_s = options.grace_s
        self._poll_s = poll_s
        self._clock = options.clock
        # fingerprint -> (version it was read at, record or None for "no such key"); misses
        # apart, so random keys cannot evict real ones.
        self._cache: AnswerCache[tuple[bytes | None, KeyRecord | None]] = AnswerCache(
            options.max_entries)
        self._version: bytes | None = None
        self._last_ok = self._clock()
        self._healthy = True
        # Told of each call that failed as unavailable (False) and of the first that
        # answered after (True): the background polls too, not only lookups, so the
        # store's health shows while cached keys are served (`ObservedKeyStore`).
        self.on_health: Callable[[bool], None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._create = self._redis.register_script(_CREATE)
        self._swap = self._redis.register_script(_SWAP)

    # -- KeyStore ---------------------------------------------------------------

    async def start(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self._check_version()
        self._watch = asyncio.create_task(self._watch_loop())

    async def close(self) -> None:
        # Stop the poller by an event: a cancel that lands inside a redis-py call can
        # be swallowed by its timeout handling, and the loop would poll forever.
        self._stopping.set()
        if self._watch is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._watch), 2.0)
            except TimeoutError:
                await cancel_and_wait(self._watch)
        await self._redis.aclose()

    async def find(self, fingerprint: str, secret: str) -> KeyRecord | None:
        entry = self._cache.get(fingerprint)
        if entry is not None and entry[0] == self._version:
            if self._healthy or self._within_grace():
                return entry[1]
            raise StoreUnavailable(f"redis key store unreachable for over {self._grace_s:.0f}s")
        try:
            version, raw = await self._call(self._fetch(fingerprint))
        except StoreUnavailable:
            if entry is not None and self._within_grace():
                return entry[1]  # stale, but the best answer while Redis is away
            raise
        record = KeyRecord.model_validate_json(raw) if raw is not None else None
        if _count(version) > _count(self._version):
            # Only forward: a lookup that read the version before a change and ends after
            # the poll saw it would put the older one back, and entries cached before the
            # change (a key since revoked) would pass as fresh until the next poll.
            self._version = version
        self._cache.put(fingerprint, (version, record), found=record is not None)
        return record

    async def _fetch(self, fingerprint: str) -> tuple[bytes | None, bytes | None]:
        """The version and the record, in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(VERSION)
            pipe.get(FP + fingerprint)
            version, raw = await pipe.execute()
        return version, raw

    def _within_grace(self) -> bool:
        return self._clock() - self._last_ok < self._grace_s

    def invalidate(self) -> None:
        """Forget every cached lookup (the next find of each key asks Redis)."""
        self._cache.clear()

    # -- KeyAdmin ---------------------------------------------------------------

    async def create(self, record: KeyRecord) -> None:
        ok = await self._call(self._create(
            keys=[FP + record.sha256, ID + record.id, IDS, VERSION],
            args=[record.model_dump_json(), record.id, record.sha256],
        ))
        if not ok:
            raise KeyExists(f"a key with id {record.id!r} already exists")
        self._cache.pop(record.sha256)  # this replica need not wait for the poll

    async def get(self, key_id: str) -> KeyRecord | None:
        raw = await self._raw(key_id)
        return KeyRecord.model_validate_json(raw) if raw is not None else None

    async def _raw(self, key_id: str) -> bytes | None:
        """The stored JSON of a key, by id."""
        fp = await self._call(self._redis.get(ID + key_id))
        if fp is None:
            return None
        raw: bytes | None = await self._call(self._redis.get(FP + fp.decode()))
        return raw

    async def list_keys(self, org: str | None = None) -> list[KeyRecord]:
        """Every stored key (of `org`), by id: two MGETs per LIST_BATCH keys, not two
        round trips per key (budget alerts list them all at every rescan)."""
        ids = sorted(i.decode() for i in await self._call(self._redis.smembers(IDS)))
        out = []
        for start in range(0, len(ids), LIST_BATCH):
            fps = await self._call(self._redis.mget([ID + i for i in
                                                     ids[start:start + LIST_BATCH]]))
            found = [fp.decode() for fp in fps if fp is not None]
            raws = await self._call(self._redis.mget([FP + fp for fp in found])) \
                if found else []
            for raw in raws:
                rec = KeyRecord.model_validate_json(raw) if raw is not None else None
                if rec is not None and (org is None or rec.org == org):
                    out.append(rec)
        return out

    async def revoke(self, key_id: str) -> KeyRecord | None:
        return await self._modify(key_id, lambda r: r.model_copy(update={"status": "revoked"}))

    async def update(self, key_id: str, changes: Mapping[str, object]) -> KeyRecord | None:
        return await self._modify(key_id, lambda r: updated(r, changes))

    async def _modify(self, key_id: str, change: Callable[[KeyRecord], KeyRecord]
                      ) -> KeyRecord | None:
        """Read, change, compare-and-set (again if another writer came between); the
        version bump sends every replica to Redis for it."""
        for _ in range(_SWAP_ATTEMPTS):
            raw = await self._raw(key_id)
            if raw is None:
                return None
            new = change(KeyRecord.model_validate_json(raw))
            done = await self._call(self._swap(keys=[FP + new.sha256, VERSION],
                                               args=[new.model_dump_json(), raw]))
            if done == 0:
                return None
            if done == 1:
                self._cache.pop(new.sha256)  # this replica need not wait for the poll
                return new
        raise StoreUnavailable(f"key {key_id!r} kept changing under concurrent writers")

    # -- plumbing -----------------------------------------------------------------

    async def _call(self, awaitable: Any) -> Any:
        try:
            result = await awaitable
        except (RedisError, OSError) as e:
            self._mark_down(e)
            raise StoreUnavailable(f"redis key store unavailable: {type(e).__name__}: {e}"
                                   ) from None
        self._mark_up()
        return result

    def _mark_down(self, err: Exception) -> None:
        # A serving replica (its watch started) logs the outage once; a one-shot caller
        # (a CLI command) has the raised error, which says the same in one line.
        if self._healthy and self._watch is not None:
            log.error("redis key store unreachable: %s", err)
        self._healthy = False
        if self.on_health is not None:
            self.on_health(False)

    def _mark_up(self) -> None:
        if not self._healthy:
            log.info("redis key store reachable again")
            # Redis may have lost data and restarted its version count: trust no stamp.
            self._cache.clear()
            if self.on_health is not None:
                self.on_health(True)
        self._healthy = True
        self._last_ok = self._clock()

    async def _check_version(self) -> None:
        # Entries stamped with an older version become stale (looked up again on use).
        self._version = await self._call(self._redis.get(VERSION))

    async def _watch_loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._poll_s)
                return
            with contextlib.suppress(StoreUnavailable):
                await self._check_version()


def _count(version: bytes | None) -> int:
    """The version key's count (INCR'd by every write; absent: 0)."""
    try:
        return int(version) if version is not None else 0
    except ValueError:
        return 0
