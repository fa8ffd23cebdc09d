"""The key-store protocol every store implements, and its errors.

`find` is the hot path: stores answer from a local cache when they can, so a
cached key check costs no network round trip. Only the HTTP validation store
uses the secret (its service hashes it); the others look up the fingerprint.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from policy.keyrecord import KeyRecord


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
class KeyAdmin(KeyStore, Protocol):
    """Stores that tokenbooth itself writes to (`tokenbooth keys ...`)."""

    async def create(self, record: KeyRecord) -> None:
        """Store a new key. Raises KeyExists."""

    async def get(self, key_id: str) -> KeyRecord | None: ...

    async def list_keys(self, org: str | None = None) -> list[KeyRecord]: ...

    async def revoke(self, key_id: str) -> KeyRecord | None:
        """Mark a key revoked; return the new record, or None if there is no such key."""
