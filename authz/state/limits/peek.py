"""A key's (and its org's) budget and limits as they stand now, read from the limit store
without changing it: `tokenbooth keys show`, locally (the state the running process
journals in data_dir, or Redis) and through the admin API (the live store)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from authz.state.limits.base import LimitStore
from policy.admission import hold_live
from policy.audit import ORG_PREFIX
from policy.config import Config, OrgLimits, redacted
from policy.keyrecord import KeyRecord
from policy.limits import (
    Limits,
    bucket_level,
    bucket_reset_s,
    nano_to_usd,
    period_id,
    period_reset_s,
)
from policy.quota import limits_from
from policy.usage import iso_z

STATE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Counters:
    """What the limit store keeps of one owner (a key id or `org:<name>`)."""

    spent: int = 0  # nano-USD in the current period (holds past their lease included)
    reserved: int = 0  # nano-USD held by requests in flight
    requests: float | None = None  # GCRA's bucket: requests left at `rts` (None: full)
    rts: float = 0.0
    level: float | None = None  # TPM bucket at `ts` (None: full)
    ts: float = 0.0
    in_flight: int = 0  # live concurrency leases


async def show_state(cfg: Config, key: KeyRecord, now: datetime,
                     org: OrgLimits | None = None,
                     live: LimitStore | None = None) -> dict[str, Any]:
    """The key's (and its org's: `org`, the config's by default) budget and limits as they
    stand at `now`. `live`: the running process's own embedded store, read in place;
    else the journal in data_dir, or Redis."""
    from authz.state.limits.durable import DurableMemoryLimitStore

    owners = {key.id: limits_from(key)}
    org = org if org is not None else cfg.orgs.get(key.org)
    if org is not None and limits_from(org).any:
        owners[ORG_PREFIX + key.org] = limits_from(org)
    periods = {o: period_id(lim.budget_period, now) for o, lim in owners.items()}
    t = now.timestamp()
    if cfg.state_is_redis:
        counters, source = await _read_redis(cfg.state, periods, t), "redis"
    elif isinstance(live, DurableMemoryLimitStore):
        counters, source = await _read_store(live, periods, t), "memory"
    else:
        counters, source = await _read_memory(cfg.data_dir, periods, t), "memory"
    views = {o: owner_view(lim, counters[o], periods[o], now) for o, lim in owners.items()}
    return {"at": iso_z(now), "source": f"{source} {_where(cfg)}", "key": views[key.id],
            "org": views.get(ORG_PREFIX + key.org)}


def _where(cfg: Config) -> str:
    return redacted(cfg.state) if cfg.state_is_redis else str(cfg.data_dir)


async def _read_memory(data_dir: Path, periods: dict[str, str], now: float
                       ) -> dict[str, Counters]:
    """From the state the running process journals in data_dir (read only, no lock)."""
    from authz.state.limits.durable import DurableMemoryLimitStore

    store = DurableMemoryLimitStore(data_dir)
    await store.load()
    return await _read_store(store, periods, now)


async def _read_store(store: Any, periods: dict[str, str], now: float) -> dict[str, Counters]:
    """From an embedded store (a DurableMemoryLimitStore), loaded or live."""
    keys = store.key_states()
    out = {}
    for owner, period in periods.items():
        spent, reserved = await store.budget(owner, "", period, now)
        ks = keys.get(owner)
        if ks is None:
            out[owner] = Counters(spent, reserved)
            continue
        live = sum(1 for rid in ks.leased
                   if rid in ks.holds and hold_live(ks.holds[rid].exp, now))
        out[owner] = Counters(spent, reserved, ks.requests, ks.rts, ks.level, ks.ts, live)
    return out


async def _read_redis(url: str, periods: dict[str, str], now: float) -> dict[str, Counters]:
    """HMGET / ZCOUNT on the keys redis_scripts.py describes, and the store's own
    budget read."""
    from redis.exceptions import RedisError

    from authz.state.keys.redis_store import connect
    from authz.state.limits.base import LimitStoreUnavailable
    from authz.state.limits.redis_limits import RedisLimitStore

    store, client = RedisLimitStore(url, timeout_s=STATE_TIMEOUT_S), connect(url, STATE_TIMEOUT_S)
    out = {}
    try:
        for owner, period in periods.items():
            ns = f"tb:{{k:{owner}}}:"
            async with client.pipeline(transaction=False) as pipe:
                pipe.hmget(ns + "rpm", ["level", "ts"])
                pipe.hmget(ns + "tpm", ["level", "ts"])
                pipe.zcount(ns + "conc", f"({now!r}", "+inf")
                (requests, rts), (level, ts), conc = await pipe.execute()
            spent, reserved = await store.budget(owner, "", period, now)
            out[owner] = Counters(spent, reserved, float(requests) if requests else None,
                                  float(rts or 0), float(level) if level else None,
                                  float(ts or 0), int(conc))
    except (RedisError, OSError, LimitStoreUnavailable) as e:
        raise OSError(f"cannot read the limit state from {redacted(url)}: {e}") from None
    finally:
        await client.aclose()
        await store.close()
    return out


def owner_view(limits: Limits, c: Counters, period: str, now: datetime) -> dict[str, Any]:
    """One owner's budget, requests, tokens and concurrency at `now` (None: no limit)."""
    t = now.timestamp()
    budget = None
    if limits.budget_nano is not None:
        reset = period_reset_s(limits.budget_period, now)
        budget = {"period": period, "budget_usd": _dollars(limits.budget_nano),
                  "spent_usd": _dollars(c.spent), "reserved_usd": _dollars(c.reserved),
                  "remaining_usd": _dollars(max(0, limits.budget_nano - c.spent - c.reserved)),
                  "resets_at": None if reset is None else iso_z(now + timedelta(seconds=reset))}
    requests = None
    if limits.rpm is not None:
        left = (float(limits.rpm) if c.requests is None
                else bucket_level(c.requests, c.rts, t, limits.rpm))
        requests = {"limit": limits.rpm, "remaining": max(0, math.floor(left)),
                    "reset_s": round(bucket_reset_s(left, limits.rpm), 3)}
    tokens = None
    if limits.tpm is not None:
        level = (float(limits.tpm) if c.level is None
                 else bucket_level(c.level, c.ts, t, limits.tpm))
        tokens = {"limit": limits.tpm, "remaining": max(0, math.floor(level)),
                  "reset_s": round(bucket_reset_s(level, limits.tpm), 3)}
    conc = (None if limits.max_concurrent is None
            else {"limit": limits.max_concurrent, "in_flight": c.in_flight})
    return {"budget": budget, "requests": requests, "tokens": tokens, "concurrency": conc}


def _dollars(nano: int) -> str:
    return format(nano_to_usd(nano).normalize() if nano else Decimal(0), "f")
