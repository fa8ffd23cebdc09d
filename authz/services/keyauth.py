"""The key check's lookups: static keys from the policy file first, then the key store.
The decisions (no key, unknown, revoked, expired) are `policy.keys`'s."""

from __future__ import annotations

import logging

from authz.runtime.snapshot import Runtime
from authz.state.keys.base import KeyStore, StoreUnavailable
from authz.state.repeats import REPEATS
from policy.errors import invalid_api_key, service_unavailable
from policy.keys import NO_KEY, Principal, check_record, fingerprint

log = logging.getLogger("tokenbooth.keys")


class KeyAuthority:
    def __init__(self, runtime: Runtime, store: KeyStore | None) -> None:
        self._rt = runtime
        self._store = store

    async def authenticate(self, secret: str | None) -> Principal:
        """A Principal, or an ApiError: 401 saying why, 503 when the store cannot answer."""
        if secret is None:
            raise invalid_api_key(NO_KEY)
        fp = fingerprint(secret)  # hash first: nothing below branches on secret bytes
        record = self._rt.snapshot.keys_by_fingerprint.get(fp)
        if record is None and self._store is not None:
            try:
                record = await self._store.find(fp, secret)
            except StoreUnavailable as e:
                log.warning("key check failed closed: %s", e,
                            extra={"key_fp": fp[:8], **REPEATS})
                raise service_unavailable(
                    "The API key store is unavailable; retry shortly.", retry=True
                ) from None
            if record is not None and record.id in self._rt.snapshot.config_key_ids:
                # Ledgers, limits and revocation go by key id: a stored key sharing one
                # with a config key spent on that key's ledger and could not be revoked
                # by its id (the CLI and admin API leave config keys to the file).
                log.error("a stored key has the id of a key in the config file: refused "
                          "until one of them is renamed",
                          extra={"key_id": record.id, "key_fp": fp[:8], **REPEATS})
                raise invalid_api_key(
                    "This API key's id is also a key's in the gateway's config file; the "
                    "operator must rename one of them before it can be used.")
        return check_record(record, self._rt.clock())
