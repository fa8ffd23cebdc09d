"""The key-store protocol every store implements, and its errors.

`find` is the hot path: stores answer from a local cache when they can, so a
cached key check costs no network round trip. Only the HTTP validation store
uses the secret (its service hashes it); the others look up the fingerprint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

from pydantic import ValidationError

from policy.keyrecord import KeyRecord

# What `keys update` may change. A key's id, org, fingerprint, prefix and creation time
# are its identity; its status changes only by `revoke`.
UPDATABLE = frozenset({"name", "scopes", "models", "rpm", "tpm", "max_concurrent",
                       "budget_usd", "budget_period", "expires_at"})


class StoreUnavailable(Exception):
    """The store could not answer within its time limit (the caller fails closed)."""


class KeyExists(Exception):
    """A key with this id or fingerprint is already stored."""


class ReadOnlyStore(Exception):
    """This store's keys are managed elsewhere (e.g. by the validation service)."""


@runtime_checkable
class KeyStore(Protocol):
    async def start(self) -> None:
        """Connect and begin watching for changes."""

    async def close(self) -> None: ...

    async def find(self, fingerprint: str, secret: str) -> KeyRecord | None:
        """The key with this fingerprint, or None. Raises StoreUnavailable."""


@runtime_checkable
class ReportsHealth(Protocol):
    """A store that calls the store at times of its own (background polls) and says how
    each call went: False for each that failed as unavailable, True for the first that
    answered after."""

    on_health: Callable[[bool], None] | None


@runtime_checkable
class KeyAdmin(KeyStore, Protocol):
    """Stores that tokenbooth itself writes to (`tokenbooth keys ...`)."""

    async def create(self, record: KeyRecord) -> None:
        """Store a new key. Raises KeyExists."""

    async def get(self, key_id: str) -> KeyRecord | None: ...

    async def list_keys(self, org: str | None = None) -> list[KeyRecord]: ...

    async def revoke(self, key_id: str) -> KeyRecord | None:
        """Mark a key revoked; return the new record, or None if there is no such key."""

    async def update(self, key_id: str, changes: Mapping[str, object]) -> KeyRecord | None:
        """Change fields of a key in place (`updated`); return the new record, or None if
        there is no such key. Every replica sees it as it sees a revocation. Raises
        ValueError for a change that is not allowed."""


def updated(record: KeyRecord, changes: Mapping[str, object]) -> KeyRecord:
    """`record` with `changes` (field -> new value, None to clear) applied and
    validated; ValueError, in one line, for a field `keys update` may not change or a
    bad value."""
    fixed = sorted(set(changes) - UPDATABLE)
    if fixed:
        raise ValueError(f"cannot change {', '.join(fixed)} of a key")
    try:
        return KeyRecord.model_validate({**record.model_dump(), **changes})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"{where}: {err['msg']}") from None
