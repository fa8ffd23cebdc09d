"""The usage records as the admin API reads them: every record of the configured
backend (`load_usage`, one per request_id) or each as written (`stream_usage`, a batch
at a time). Backends: the JSON-lines log with its rotated files, the Redis stream, or
with usage.sink the PostgreSQL archive and the stream's unexported tail (query.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from typing import Any

import orjson

from authz.state.usage.records import (
    USAGE_FILE,
    USAGE_STREAM,
    LogReader,
    one_per_request,
    read_records,
)
from policy.config import Config

Records = list[dict[str, Any]]
READ_BATCH = 1000  # Redis stream entries per XRANGE
READ_BYTES = 1 << 20  # JSON-lines read per thread hop


def archived(cfg: Config) -> bool:
    """Whether PostgreSQL holds the records (usage.sink, with a Redis state)."""
    return cfg.state_is_redis and cfg.usage.sink is not None


async def trimmed_before(cfg: Config) -> datetime | None:
    """When the records still readable begin, if some were trimmed away with no archive
    (a Redis state without usage.sink, trimmed by retention): the time of the newest entry
    XTRIM removed (XINFO STREAM's max-deleted-entry-id). None: nothing is missing."""
    if not cfg.state_is_redis or archived(cfg):
        return None
    from redis.exceptions import ResponseError

    from authz.state.keys.redis_store import connect

    client = connect(cfg.state, 5.0)
    try:
        info: dict[Any, Any] = await client.xinfo_stream(USAGE_STREAM)
    except ResponseError:  # no stream yet
        return None
    finally:
        await client.aclose()
    raw = info.get("max-deleted-entry-id", info.get(b"max-deleted-entry-id"))
    text = raw.decode() if isinstance(raw, bytes) else str(raw or "0-0")
    ms = int(text.partition("-")[0] or 0)
    return datetime.fromtimestamp(ms / 1000, UTC) if ms else None


async def load_usage(cfg: Config) -> Records:
    """Every usage record of the configured backend, one per request_id."""
    if archived(cfg):
        from authz.state.usage.query import every_record

        return [r async for page in every_record(cfg) for r in page]
    if cfg.state_is_redis:
        from authz.state.usage.redis_sink import read_stream

        return list(one_per_request(await read_stream(cfg.state, USAGE_STREAM)))
    return await asyncio.to_thread(lambda: list(read_records(cfg.data_dir / USAGE_FILE)))


def _loads(raw: bytes | None) -> dict[str, Any] | None:
    try:
        rec = orjson.loads(raw) if raw is not None and raw.strip() else None
    except orjson.JSONDecodeError:
        return None  # a damaged line: `tokenbooth audit` reports those
    return rec if isinstance(rec, dict) else None


async def stream_usage(cfg: Config) -> AsyncGenerator[dict[str, Any], None]:
    """Every usage record as written (duplicates included), read a batch at a time: the
    Redis stream by XRANGE pages, the JSON-lines log (its rotated files first) a megabyte
    per thread hop; with a sink, the archive by pages of rows, then the stream's tail."""
    if archived(cfg):
        from authz.state.usage.query import every_record

        async with contextlib.aclosing(every_record(cfg)) as pages:
            async for page in pages:
                for found in page:
                    yield found
        return
    if cfg.state_is_redis:
        async with contextlib.aclosing(_stream_redis(cfg.state)) as records:
            async for found in records:
                yield found
        return
    reader = LogReader(cfg.data_dir / USAGE_FILE, READ_BYTES)  # rotations lose nothing
    try:
        while lines := await asyncio.to_thread(reader.next_lines):
            for line in lines:
                if (rec := _loads(line)) is not None:
                    yield rec
    finally:
        reader.close()


async def _stream_redis(url: str) -> AsyncGenerator[dict[str, Any], None]:
    from authz.state.keys.redis_store import connect

    client = connect(url, 5.0)
    start = "-"
    try:
        while True:
            entries: list[Any] = await client.xrange(USAGE_STREAM, start, "+",
                                                     count=READ_BATCH) or []
            for _id, fields in entries:
                if (rec := _loads((fields or {}).get(b"data"))) is not None:
                    yield rec
            if len(entries) < READ_BATCH:
                return
            start = "(" + entries[-1][0].decode()  # after the last (Redis 6.2+)
    finally:
        await client.aclose()


