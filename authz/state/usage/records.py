"""Usage records: the embedded store is an append-only JSON-lines file.

One line per record, written and flushed when a request ends, so records
survive a restart of the services. Readers deduplicate by `request_id`,
preferring a real record over a `lost` one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import orjson

from policy.config import Config, redacted
from policy.usage import LOST, UsageRecord

log = logging.getLogger("tokenbooth.records")

USAGE_FILE = "usage.jsonl"
# Hash-tagged so the stream and its dedup keys share one Redis Cluster slot.
USAGE_STREAM = "tb:{usage}"


class UsageSink(Protocol):
    def write(self, record: UsageRecord) -> None: ...

    def close(self) -> None: ...


class JsonlUsageLog:
    """Appends records to `<data_dir>/usage.jsonl` (0600)."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / USAGE_FILE
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "ab", buffering=0)

    def write(self, record: UsageRecord) -> None:
        # One write() of one whole line: O_APPEND keeps lines intact across processes.
        # orjson serialises the (flat) dataclass itself, without a dict in between.
        self._file.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))

    def close(self) -> None:
        self._file.close()


def one_per_request(records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """One record per `request_id` (a record may be delivered twice), in the order of
    first appearance: the first, except that a real record supersedes a `lost` one
    (status LOST: a hold charged in full, then settled late), whichever came first."""
    out: dict[str, dict[str, Any]] = {}
    for rec in records:
        rid = rec.get("request_id")
        if not isinstance(rid, str):
            continue
        old = out.get(rid)
        if old is None or (old.get("status") == LOST and rec.get("status") != LOST):
            out[rid] = rec
    yield from out.values()


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every record in a usage log, one per `request_id` (see one_per_request)."""
    if path.exists():
        yield from one_per_request(_lines(path))


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict):
                log.warning("%s:%d: skipping a damaged usage line", path, n)
                continue
            yield rec


def make_sink(cfg: Config) -> UsageSink:
    """Redis Stream (spooled on disk through outages) for `state: redis://`, else the
    local JSON-lines log."""
    if cfg.state_is_redis:
        from authz.state.usage.redis_sink import RedisUsageSink

        return RedisUsageSink(cfg.state, cfg.data_dir / "spool", stream=USAGE_STREAM,
                              timeout_s=cfg.key_store.timeout_s)
    return JsonlUsageLog(cfg.data_dir)


def load_records(cfg: Config) -> list[dict[str, Any]]:
    """Every usage record of the configured state backend, deduplicated by request_id."""
    if cfg.state_is_redis:
        import asyncio

        from redis.exceptions import RedisError

        from authz.state.usage.redis_sink import read_stream

        try:
            stream = asyncio.run(read_stream(cfg.state, USAGE_STREAM))
        except (RedisError, OSError) as e:
            raise OSError(f"cannot read usage records from {redacted(cfg.state)}: {e}") from None
        return list(one_per_request(stream))
    return list(read_records(cfg.data_dir / USAGE_FILE))
