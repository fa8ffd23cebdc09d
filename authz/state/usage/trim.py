"""Keeping the usage stream bounded: it is a delivery queue, not the archive.

`trim()` drops the entries before a cut (XTRIM MINID, approximate: whole stream nodes
only, so it is cheap and may keep up to a node's worth more). The cut is the later of
  - the retention cut: `retention_s` before Redis' own clock (entry ids are its time);
  - with `acked`, the acked cut: the first entry some consumer group has not yet
    acknowledged (its oldest pending entry, else the one after its last delivered).
A configured group that does not exist yet has acknowledged nothing. Several replicas
may trim at once: each cut is safe on its own, and groups only move forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from policy.config import UsageSettings

log = logging.getLogger("tokenbooth.records")

# The consumer group of `tokenbooth usage export` (PostgreSQL, the ledger of record).
EXPORT_GROUP = "tokenbooth-export"

StreamId = tuple[int, int]
TRIM_STEP = 100_000  # entries per XTRIM call
_MAX_STEPS = 100  # per trim(): ten million entries


@dataclass(frozen=True, slots=True)
class TrimPolicy:
    mode: str = "acked"  # 'acked' or 'retention' (see UsageSettings)
    retention_s: float | None = 7 * 86400.0
    groups: tuple[str, ...] = ()  # the groups whose acknowledgements count

    @classmethod
    def from_config(cls, usage: UsageSettings) -> TrimPolicy:
        groups = ((EXPORT_GROUP,) if usage.sink else ()) + usage.consumer_groups
        return cls(usage.trim, usage.retention_s, tuple(dict.fromkeys(groups)))


def parse_id(raw: bytes | str) -> StreamId:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


async def ensure_groups(client: aioredis.Redis, stream: str, groups: tuple[str, ...]) -> None:
    """Creates the groups that do not exist yet, reading from the stream's start."""
    for group in groups:
        try:
            await client.xgroup_create(stream, group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise


async def acked_cut(client: aioredis.Redis, stream: str, groups: tuple[str, ...]) -> StreamId:
    """The first entry id that some group of `groups` has not acknowledged."""
    try:
        infos: list[dict[str, Any]] = await client.xinfo_groups(stream)
    except ResponseError:  # no stream yet
        return (0, 0)
    by_name = {_text(i["name"]): i for i in infos}
    cut: StreamId | None = None
    for group in groups:
        info = by_name.get(group)
        if info is None:
            return (0, 0)
        if int(info["pending"]) > 0:
            first: Any = await client.xpending_range(stream, group, "-", "+", 1)
            here = parse_id(first[0]["message_id"]) if first else (0, 0)
        else:
            ms, seq = parse_id(info["last-delivered-id"])
            here = (ms, seq + 1)
        cut = here if cut is None else min(cut, here)
    return cut if cut is not None else (0, 0)


async def trim(client: aioredis.Redis, stream: str, policy: TrimPolicy) -> int:
    """Drops the entries before the policy's cut; the number XTRIM removed."""
    cut: StreamId | None = None
    if policy.retention_s is not None:
        secs, micros = await client.time()
        cut = (int(secs) * 1000 + int(micros) // 1000 - int(policy.retention_s * 1000), 0)
    if policy.mode == "acked" and policy.groups:
        acked = await acked_cut(client, stream, policy.groups)
        if cut is not None and cut > acked and await client.xrange(
                stream, f"{acked[0]}-{acked[1]}", f"({cut[0]}-{cut[1]}", count=1):
            log.error("usage stream %s: dropping records older than the retention that "
                      "consumer group(s) %s have not acknowledged (is the exporter running?)",
                      stream, ", ".join(policy.groups))
        cut = acked if cut is None else max(cut, acked)
    if cut is None or cut <= (0, 0):
        return 0
    # `~` trims at most LIMIT entries a call (Redis' default: 10,000): a backlog (an
    # exporter back after an outage) goes in steps, each a short pause for Redis.
    removed = 0
    for _ in range(_MAX_STEPS):
        step = int(await client.xtrim(stream, minid=f"{cut[0]}-{cut[1]}", approximate=True,
                                      limit=TRIM_STEP))
        removed += step
        if step == 0:
            break
    return removed


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v
