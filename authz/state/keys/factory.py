"""Pick the key store a config asks for."""

from __future__ import annotations

from authz.state.keys.base import KeyStore
from authz.state.keys.cache import RemoteOptions
from policy.config import Config


def make_store(cfg: Config) -> KeyStore:
    """The validation service if configured, else Redis for `state: redis://`, else the keyring."""
    ks = cfg.key_store
    if ks.validation_url:
        from authz.state.keys.http import HttpValidationStore

        return HttpValidationStore(
            ks.validation_url,
            RemoteOptions(timeout_s=ks.timeout_s, grace_s=ks.grace_s),
            positive_ttl_s=ks.positive_ttl_s,
            negative_ttl_s=ks.negative_ttl_s,
        )
    if cfg.state_is_redis:
        from authz.state.keys.redis_store import RedisKeyStore

        return RedisKeyStore(cfg.state, RemoteOptions(timeout_s=ks.timeout_s, grace_s=ks.grace_s))
    from authz.state.keys.keyring import KeyringStore

    return KeyringStore(cfg.data_dir, wait_s=ks.timeout_s)
