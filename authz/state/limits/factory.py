"""Pick the limit store a config asks for: Redis for `state: redis://`, else the durable
embedded store (memory, journaled in `data_dir`)."""

from __future__ import annotations

from collections.abc import Callable

from authz.state.limits.base import LimitStore
from policy.admission import lost_record
from policy.config import Config
from policy.limits import Ask
from policy.usage import UsageRecord


def make_limit_store(cfg: Config,
                     on_lost: Callable[[UsageRecord], None] | None = None,
                     on_reset: Callable[[], None] | None = None,
                     records_waiting: Callable[[], bool] | None = None) -> LimitStore:
    """`on_lost` receives the records of holds found lost when the embedded store starts
    (in flight when the process died); without it they go straight to the usage log.
    `on_reset`: Redis was found to have lost its data. `records_waiting`: whether the
    usage log keeps records the disk refused (the embedded store's settlements wait)."""
    if cfg.state_is_redis:
        from authz.state.limits.redis_limits import RedisLimitStore
        from authz.state.usage.records import USAGE_STREAM
        from authz.state.usage.redis_sink import seen_prefix

        # The usage records' seen keys (the sink keeps them unless dedup_ttl_s is 0): the
        # sweep settles a hold whose request's record is there at its cost.
        seen = seen_prefix(USAGE_STREAM) if cfg.usage.dedup_ttl_s > 0 else None
        return RedisLimitStore(cfg.state, timeout_s=cfg.key_store.timeout_s,
                               on_reset=on_reset, seen_prefix=seen)
    from authz.state.limits.durable import make_durable_memory_store

    if on_lost is None:
        return make_durable_memory_store(cfg, records_waiting=records_waiting)
    deliver = on_lost

    def record_lost(ask: Ask) -> None:
        rec = lost_record(ask)
        if rec is not None:
            deliver(rec)

    return make_durable_memory_store(cfg, on_lost=record_lost,
                                     records_waiting=records_waiting)
