"""Org limits set over the admin API, stored beside the keys; the config's `orgs:` stays
the default for orgs with nothing stored.

memory: `<data_dir>/orgs.json` (atomic rename under a lock). Redis: the hash
`tb:{tb-orgs}:limits` (org -> JSON) and a version counter bumped on every change.
`OrgLimitsCache` polls the version (0.5 s) so every replica sees a change within 2 s;
`org_limits(cfg, org)` is a dictionary read.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from pathlib import Path
from typing import Protocol

import orjson
from pydantic import ValidationError

from authz.state.blocking import in_daemon_thread
from authz.state.keys.redis_store import connect
from authz.state.repeats import REPEATS
from authz.state.tasks import cancel_and_wait
from policy.config import Config, OrgLimits

log = logging.getLogger("tokenbooth.orgs")

ORGS_FILE = "orgs.json"
REDIS_LIMITS, REDIS_VERSION = "tb:{tb-orgs}:limits", "tb:{tb-orgs}:version"
POLL_S = 0.5


def _decode(raw: dict[str, object]) -> dict[str, OrgLimits]:
    return {org: OrgLimits.model_validate(v) for org, v in raw.items()}


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class OrgStore(Protocol):
    async def version(self) -> object:
        """Changes whenever the stored limits change."""

    async def read_all(self) -> dict[str, OrgLimits]: ...

    async def put(self, org: str, limits: OrgLimits | None) -> None:
        """Store an org's limits (None: drop them, the config's apply again)."""

    async def close(self) -> None: ...


class FileOrgStore:
    """The file is only touched in a daemon thread (authz/state/blocking.py): a stat, a
    read or a lock on a stalled mount (or held by a stuck writer) would hold the event
    loop, and every decision with it; the poll then waits, one look at a time."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / ORGS_FILE

    async def version(self) -> object:
        return await in_daemon_thread(self._version, "tokenbooth-orgs-look")

    async def read_all(self) -> dict[str, OrgLimits]:
        return await in_daemon_thread(self._read_all, "tokenbooth-orgs-read")

    async def put(self, org: str, limits: OrgLimits | None) -> None:
        await in_daemon_thread(lambda: self._put(org, limits), "tokenbooth-orgs-write")

    def _version(self) -> object:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_ino

    def _read_all(self) -> dict[str, OrgLimits]:
        try:
            return _decode(orjson.loads(self.path.read_bytes()))
        except FileNotFoundError:
            return {}
        except (orjson.JSONDecodeError, ValidationError, AttributeError) as e:
            raise ValueError(f"{self.path}: damaged org limits: "
                             f"{str(e).splitlines()[0]}") from None

    def _put(self, org: str, limits: OrgLimits | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self._read_all()
            if limits is None:
                current.pop(org, None)
            else:
                current[org] = limits
            body = {k: v.model_dump(mode="json") for k, v in sorted(current.items())}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_bytes(orjson.dumps(body, option=orjson.OPT_INDENT_2))
            tmp.chmod(0o600)
            os.replace(tmp, self.path)
        finally:
            os.close(lock)

    async def close(self) -> None:
        return None


class RedisOrgStore:
    def __init__(self, url: str, timeout_s: float = 0.5) -> None:
        self._redis = connect(url, timeout_s)

    async def version(self) -> object:
        return await self._redis.get(REDIS_VERSION)

    async def read_all(self) -> dict[str, OrgLimits]:
        raw = await self._redis.hgetall(REDIS_LIMITS)
        return _decode({_text(k): orjson.loads(v) for k, v in raw.items()})

    async def put(self, org: str, limits: OrgLimits | None) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            if limits is None:
                pipe.hdel(REDIS_LIMITS, org)
            else:
                pipe.hset(REDIS_LIMITS, org, limits.model_dump_json())
            pipe.incr(REDIS_VERSION)
            await pipe.execute()

    async def close(self) -> None:
        await self._redis.aclose()


def make_org_store(cfg: Config) -> OrgStore:
    if cfg.state_is_redis:
        return RedisOrgStore(cfg.state, cfg.key_store.timeout_s)
    return FileOrgStore(cfg.data_dir)


class OrgLimitsCache:
    """The stored org limits, polled; what the lifecycle asks for each request."""

    def __init__(self, store: OrgStore, poll_s: float = POLL_S) -> None:
        self.store = store
        self._poll_s = poll_s
        self._stored: dict[str, OrgLimits] = {}
        self._version: object = ()
        self._task: asyncio.Task[None] | None = None
        # One refresh at a time: a slow poll ending after a put's refresh would put the
        # older copy back until the next poll.
        self._refreshing = asyncio.Lock()
        self._failing = False  # the last refresh failed: said once, until one succeeds

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="org-limits")

    async def close(self) -> None:
        await cancel_and_wait(self._task)  # a cancel inside a Redis call can be lost
        await self.store.close()

    def org_limits(self, cfg: Config, org: str) -> OrgLimits | None:
        """The org's stored limits, else the config's, else None."""
        stored = self._stored.get(org)
        return stored if stored is not None else cfg.orgs.get(org)

    def in_force(self, cfg: Config) -> dict[str, OrgLimits]:
        """Every org's limits in force: the stored ones over the config's."""
        return {**cfg.orgs, **self._stored}

    def stored(self, org: str) -> OrgLimits | None:
        return self._stored.get(org)

    async def put(self, org: str, limits: OrgLimits | None) -> None:
        await self.store.put(org, limits)
        await self.refresh()

    async def refresh(self) -> None:
        """Re-read the store if its version moved; a failure keeps the last good copy."""
        async with self._refreshing:
            try:
                version = await self.store.version()
                if version != self._version:
                    self._stored = await self.store.read_all()
                    self._version = version
            except Exception as e:  # keep serving the last good limits
                # Said when the store goes away and when it is back, not at every poll
                # (twice a second: ~170,000 lines a day of an outage).
                if not self._failing:
                    self._failing = True
                    log.warning("org limits not refreshed: %s (the last ones read stay in "
                                "force; retried every %g s, said again once read)", e,
                                self._poll_s, extra=REPEATS)
                return
            if self._failing:
                self._failing = False
                log.warning("org limits read again")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            await self.refresh()
