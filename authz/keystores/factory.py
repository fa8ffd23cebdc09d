"""Pick the key store a config asks for."""

from __future__ import annotations

from typing import Any

from policy.config import Config


def make_store(cfg: Config) -> Any:
    """Redis for `state: redis://`, else the embedded keyring."""
    ks = cfg.key_store
    if cfg.state.startswith(("redis://", "rediss://")):
        from authz.keystores.redis_store import RedisKeyStore

        return RedisKeyStore(cfg.state, timeout_s=ks.timeout_s, grace_s=ks.grace_s)
    from authz.keystores.keyring import KeyringStore

    return KeyringStore(cfg.data_dir)
