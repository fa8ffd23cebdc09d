"""Bounded log of the requests the simulator received, served at ``/_sim/requests``.

Recording keeps references only (the request's immutable header view and body bytes);
the conversion to JSON-friendly dicts happens when the log is read, off the hot path.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any, Final

from multidict import CIMultiDictProxy

RING_SIZE: Final = 256


class RequestLog:
    """The last ``RING_SIZE`` requests, oldest first."""

    __slots__ = ("_entries",)

    def __init__(self, size: int = RING_SIZE) -> None:
        self._entries: deque[tuple[str, str, str, CIMultiDictProxy[str], bytes]] = deque(
            maxlen=size
        )

    def add(
        self, method: str, path: str, query: str, headers: CIMultiDictProxy[str], body: bytes
    ) -> None:
        self._entries.append((method, path, query, headers, body))

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def snapshot(self) -> list[dict[str, Any]]:
        """Entries as ``{"method", "path", "query", "headers", "body"}`` dicts.

        Header names are lower-cased; repeated headers are joined with ``", "``.
        """
        return [
            {
                "method": method,
                "path": path,
                "query": query,
                "headers": _header_dict(headers),
                "body": body.decode("utf-8", "replace"),
            }
            for method, path, query, headers, body in self._entries
        ]


def _header_dict(headers: Mapping[str, str] | CIMultiDictProxy[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers.items():
        key, value = _text(name.lower()), _text(value)
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def _text(s: str) -> str:
    """A header as text: bytes that are not UTF-8 (aiohttp keeps them as surrogates,
    which JSON cannot carry) become U+FFFD."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
