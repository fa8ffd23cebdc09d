"""Pick the limit store a config asks for: Redis for `state: redis://`, else memory."""

from __future__ import annotations

from authz.state.limits.base import LimitStore
from policy.config import Config


def make_limit_store(cfg: Config) -> LimitStore:
    if cfg.state.startswith(("redis://", "rediss://")):
        from authz.state.limits.redis_limits import RedisLimitStore

        return RedisLimitStore(cfg.state, timeout_s=cfg.key_store.timeout_s)
    from authz.state.limits.memory import MemoryLimitStore

    return MemoryLimitStore()
