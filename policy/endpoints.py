"""The endpoint table: one row per OpenAI / vLLM path; one generic handler reads it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from urllib.parse import unquote


class Kind(Enum):
    """What a request is: which parser reads its body, and how its usage is metered."""

    CHAT = "chat"
    COMPLETION = "completion"
    MODELS = "models"  # the list, answered by the gateway
    MODEL = "model"  # one model, answered by the gateway
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"
    RERANK = "rerank"
    SCORE = "score"
    TOKENIZE = "tokenize"  # and detokenize: no usage, counted as requests only
    MULTIPART = "multipart"  # refused: the gateway reads JSON bodies only

    @property
    def answered_here(self) -> bool:
        """No body and no backend: the gateway answers from its config."""
        return self in _ANSWERED_HERE

    @property
    def metered(self) -> bool:
        """The backend reports token usage for it."""
        return self is not Kind.TOKENIZE


_ANSWERED_HERE = frozenset({Kind.MODELS, Kind.MODEL})


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    kind: Kind
    scope: str
    # Metric label; also the record's `endpoint`.
    name: str
    # `path` is a prefix followed by one more path part (GET /v1/models/{id}).
    prefix: bool = False


_R, _W = "inference:read", "inference:write"
ROWS = (
    Endpoint("POST", "/v1/chat/completions", Kind.CHAT, _W, "chat"),
    Endpoint("POST", "/v1/completions", Kind.COMPLETION, _W, "completions"),
    Endpoint("GET", "/v1/models", Kind.MODELS, _R, "models"),
    Endpoint("GET", "/v1/models/", Kind.MODEL, _R, "model", prefix=True),
    Endpoint("POST", "/v1/embeddings", Kind.EMBEDDINGS, _W, "embeddings"),
    Endpoint("POST", "/v1/responses", Kind.RESPONSES, _W, "responses"),
    # vLLM serves rerank and score at several paths.
    Endpoint("POST", "/v1/rerank", Kind.RERANK, _W, "rerank"),
    Endpoint("POST", "/rerank", Kind.RERANK, _W, "rerank"),
    Endpoint("POST", "/v2/rerank", Kind.RERANK, _W, "rerank"),
    Endpoint("POST", "/v1/score", Kind.SCORE, _W, "score"),
    Endpoint("POST", "/score", Kind.SCORE, _W, "score"),
    Endpoint("POST", "/tokenize", Kind.TOKENIZE, _W, "tokenize"),
    Endpoint("POST", "/detokenize", Kind.TOKENIZE, _W, "detokenize"),
    Endpoint("POST", "/v1/audio/transcriptions", Kind.MULTIPART, _W, "transcriptions"),
    Endpoint("POST", "/v1/audio/translations", Kind.MULTIPART, _W, "translations"),
)
ENDPOINTS: dict[tuple[str, str], Endpoint] = {
    (e.method, e.path): e for e in ROWS if not e.prefix
}
_PREFIXED = tuple(e for e in ROWS if e.prefix)
_PATHS = {path for _, path in ENDPOINTS}


def strip_query(path: str) -> str:
    return path.split("?", 1)[0]


def _prefixed(path: str) -> Endpoint | None:
    """The prefix row that `path` extends (by a non-empty rest: an id may hold `/`)."""
    for e in _PREFIXED:
        if len(path) > len(e.path) and path.startswith(e.path):
            return e
    return None


def lookup(method: str, path: str) -> Endpoint | None:
    """The endpoint for a request line, ignoring any query string. HEAD is the GET row
    (RFC 9110: the GET's status and headers; Envoy sends no body to a HEAD request).
    Methods are case-sensitive (RFC 9110 9.1): `post` is not POST (a 405 here; vLLM's
    server and aiohttp refuse it, after the request was admitted and charged)."""
    path = strip_query(path)
    if method == "HEAD":
        method = "GET"
    e = ENDPOINTS.get((method, path))
    if e is None:
        e = _prefixed(path)
        if e is not None and e.method != method:
            return None
    return e


def path_known(path: str) -> bool:
    """True when some method is served at `path` (so a wrong method is a 405, not a 404)."""
    path = strip_query(path)
    return path in _PATHS or _prefixed(path) is not None


def allowed_methods(path: str) -> tuple[str, ...]:
    """The methods served at `path` (a 405's `Allow` header), sorted."""
    path = strip_query(path)
    methods = {m for m, p in ENDPOINTS if p == path}
    e = _prefixed(path)
    if e is not None:
        methods.add(e.method)
    if "GET" in methods:
        methods.add("HEAD")
    return tuple(sorted(methods))


def compressed(content_encoding: str) -> bool:
    """True when a Content-Encoding header names a coding other than identity. A list
    (RFC 9110 allows one, and Envoy joins repeated headers with commas) counts as
    identity only when every member is: `identity, identity` is a plain body."""
    return any(c.strip().lower() not in ("", "identity") for c in content_encoding.split(","))


def path_argument(endpoint: Endpoint, path: str) -> str:
    """The part of `path` after a prefix row's prefix, percent-decoded (a model id)."""
    return unquote(strip_query(path)[len(endpoint.path):])
