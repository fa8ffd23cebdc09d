"""The endpoint table: one row per OpenAI path; one generic handler reads it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    CHAT = "chat"
    COMPLETION = "completion"
    MODELS = "models"


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    kind: Kind
    scope: str
    # Metric label; also the record's `endpoint`.
    name: str


ENDPOINTS: dict[tuple[str, str], Endpoint] = {
    (e.method, e.path): e
    for e in (
        Endpoint("POST", "/v1/chat/completions", Kind.CHAT, "inference:write", "chat"),
        Endpoint("POST", "/v1/completions", Kind.COMPLETION, "inference:write", "completions"),
        Endpoint("GET", "/v1/models", Kind.MODELS, "inference:read", "models"),
    )
}
_PATHS = {path for _, path in ENDPOINTS}


def strip_query(path: str) -> str:
    return path.split("?", 1)[0]


def lookup(method: str, path: str) -> Endpoint | None:
    """The endpoint for a request line, ignoring any query string."""
    return ENDPOINTS.get((method.upper(), strip_query(path)))


def path_known(path: str) -> bool:
    """True when some method is served at `path` (so a wrong method is a 405, not a 404)."""
    return strip_query(path) in _PATHS
