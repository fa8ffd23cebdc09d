"""What the two remote key stores (Redis, the HTTP validation service) share: their
options, and the bounded LRU cache of answers by fingerprint (never by secret)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class RemoteOptions:
    """How a store that asks a remote service bounds its calls and caches the answers."""

    # Every call gives up after this long (the caller then fails closed).
    timeout_s: float = 0.5
    # While the service is unreachable, answers cached within this long of the last
    # successful contact keep working.
    grace_s: float = 300.0
    # Cached answers at most, for keys found and, apart, for keys not found; the least
    # recently used go first.
    max_entries: int = 100_000
    # Monotonic seconds (tests pass a fake).
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.grace_s < 0 or self.max_entries < 1:
            raise ValueError("timeout_s must be > 0, grace_s >= 0 and max_entries >= 1")


class LruCache(Generic[V]):
    """fingerprint -> V, at most `max_entries`; a read or write makes an entry the newest."""

    __slots__ = ("_entries", "_max")

    def __init__(self, max_entries: int) -> None:
        self._entries: OrderedDict[str, V] = OrderedDict()
        self._max = max_entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"LruCache({len(self._entries)} of {self._max})"

    def get(self, fingerprint: str) -> V | None:
        value = self._entries.get(fingerprint)
        if value is not None:
            self._entries.move_to_end(fingerprint)  # hot keys survive a spray of misses
        return value

    def put(self, fingerprint: str, value: V) -> None:
        self._entries[fingerprint] = value
        self._entries.move_to_end(fingerprint)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def pop(self, fingerprint: str) -> None:
        self._entries.pop(fingerprint, None)

    def clear(self) -> None:
        self._entries.clear()


class AnswerCache(Generic[V]):
    """A remote store's answers by fingerprint: keys found and keys not found in LRUs of
    their own, each at most `max_entries`. A spray of random keys (every one a miss)
    then evicts only other misses, never a real key's answer: one shared LRU let 100,000
    random bearer tokens push every real key out, each then costing a store round trip
    again, and failing closed during an outage that its cached answer would have
    outlived (`grace_s`)."""

    __slots__ = ("_found", "_missing")

    def __init__(self, max_entries: int) -> None:
        self._found: LruCache[V] = LruCache(max_entries)
        self._missing: LruCache[V] = LruCache(max_entries)

    def __len__(self) -> int:
        return len(self._found) + len(self._missing)

    def __repr__(self) -> str:
        return f"AnswerCache(found={self._found!r}, missing={self._missing!r})"

    @property
    def found(self) -> int:
        """How many answers for keys found are cached."""
        return len(self._found)

    def get(self, fingerprint: str) -> V | None:
        value = self._found.get(fingerprint)
        return value if value is not None else self._missing.get(fingerprint)

    def put(self, fingerprint: str, value: V, found: bool) -> None:
        """Cache `value`, the answer for a key that exists (`found`) or does not."""
        keep, drop = (self._found, self._missing) if found else (self._missing, self._found)
        drop.pop(fingerprint)
        keep.put(fingerprint, value)

    def pop(self, fingerprint: str) -> None:
        self._found.pop(fingerprint)
        self._missing.pop(fingerprint)

    def clear(self) -> None:
        self._found.clear()
        self._missing.clear()
