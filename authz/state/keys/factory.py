"""Pick the key store a config asks for."""

from __future__ import annotations

from typing import Any

from policy.config import Config


def make_store(cfg: Config) -> Any:
    """The validation service if configured, else Redis for `state: redis://`, else the keyring."""
    ks = cfg.key_store
    if ks.validation_url:
        from authz.state.keys.http import HttpValidationStore

        return HttpValidationStore(
            ks.validation_url,
            positive_ttl_s=ks.positive_ttl_s,
            negative_ttl_s=ks.negative_ttl_s,
            timeout_s=ks.timeout_s,
            grace_s=ks.grace_s,
        )
    if cfg.state.startswith(("redis://", "rediss://")):
        from authz.state.keys.redis_store import RedisKeyStore

        return RedisKeyStore(cfg.state, timeout_s=ks.timeout_s, grace_s=ks.grace_s)
    from authz.state.keys.keyring import KeyringStore

    return KeyringStore(cfg.data_dir)
