"""OpenAI-shaped errors: one type for every refusal the gateway can make."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import orjson

# The OpenAI error `type` for each HTTP status we emit. SDKs pick the
# exception class from the status; `code` is what programs branch on.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


def type_for(status: int) -> str:
    """The OpenAI error `type` of a status."""
    return _TYPE_BY_STATUS.get(status, "server_error")


@dataclass(frozen=True, slots=True)
class ApiError(Exception):
    """A refusal: HTTP status, OpenAI `code`, human message, offending `param`."""

    status: int
    code: str
    message: str
    param: str | None = None
    type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    # The configured alias the refused request named, where it was read (for the log
    # line; never in the body).
    model: str = ""

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    @property
    def error_type(self) -> str:
        return self.type or type_for(self.status)

    def body(self) -> bytes:
        """The JSON body OpenAI clients expect."""
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.error_type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )


# An exception's own attributes, which `raise` and `with` set as it travels: a frozen
# dataclass refused them, so an ApiError raised through a generator-based context manager
# (contextlib's `__exit__` sets `__traceback__`) became a TypeError, and a refusal a 500.
_RAISE_ATTRS = frozenset({"__traceback__", "__cause__", "__context__",
                          "__suppress_context__", "__notes__"})
_frozen_setattr = ApiError.__setattr__


def _setattr(self: ApiError, name: str, value: object) -> None:
    if name in _RAISE_ATTRS:
        BaseException.__setattr__(self, name, value)
    else:
        _frozen_setattr(self, name, value)


setattr(ApiError, "__setattr__", _setattr)  # noqa: B010 - past the dataclass's check


def invalid_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "invalid_request", message, param)


def invalid_api_key(message: str) -> ApiError:
    return ApiError(401, "invalid_api_key", message)


def insufficient_scope(scope: str) -> ApiError:
    return ApiError(403, "insufficient_scope", f"This API key lacks the scope {scope!r}.")


def model_not_allowed(model: str) -> ApiError:
    return ApiError(
        403, "model_not_allowed", f"This API key may not use the model {model!r}.", "model"
    )


def _echo(text: str, limit: int = 256) -> str:
    """A client's string in a message: at most `limit` characters of it (a 1 MB model
    name is not sent back whole)."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def model_not_found(model: str) -> ApiError:
    return ApiError(404, "model_not_found", f"The model {_echo(model)} does not exist.",
                    "model")


def not_found(path: str) -> ApiError:
    # Never the query: a client may put its key there (`?api-key=…`).
    return ApiError(404, "not_found",
                    f"No endpoint {_echo(path.split('?', 1)[0])} on this gateway.")


def request_too_large(limit: int) -> ApiError:
    return ApiError(413, "request_too_large", f"The request body exceeds {limit} bytes.")


# A 429 or 503 says whether a retry can help: `retry-after` when the cause passes (a
# store or service outage, backends restarting, a busy slot), else `x-should-retry:
# false`, which the openai SDKs honour over their status-based rule.
RETRY_AFTER_S = 1
RETRY_LATER = ("retry-after", str(RETRY_AFTER_S))
NO_RETRY = ("x-should-retry", "false")


def service_unavailable(message: str, retry: bool | None = None) -> ApiError:
    """`retry`: True, a retry-after; False, x-should-retry: false; None, no hint."""
    hint = () if retry is None else (RETRY_LATER if retry else NO_RETRY,)
    return ApiError(503, "service_unavailable", message, headers=hint)


# -- a backend's own error answers --------------------------------------------------------

UPSTREAM_MESSAGE_CHARS = 2000  # what a rewritten error keeps of the backend's message


def upstream_error(status: int, body: bytes, alias: str = "",
                   upstream_model: str = "") -> ApiError:
    """A backend's error answer, OpenAI-shaped. A 4xx keeps its status and the backend's
    message, `param` and string `code` (else `upstream_error`); a 5xx becomes the
    contract's 502 `upstream_error`, its message naming the backend's status. Bodies read:
    vLLM's `{"object": "error", "message", ...}`, OpenAI's `{"error": {...}}`, vLLM's
    `--api-key` refusal `{"error": "Unauthorized"}`, FastAPI's `{"detail": ...}`, text.
    A 404 for the model the gateway sent (`upstream_model`, the route of `alias`) is the
    gateway's configuration, not the client's request: said so, without the backend's
    message (it names the upstream model and the backend's own, operators' names)."""
    readable = _decompressed(body)
    fields = _error_fields(readable) if readable.strip() or not body.strip() else {}
    message = fields.get("message")
    if not isinstance(message, str) or not message.strip():
        message = (f"The backend answered HTTP {status} with a body that is not text."
                   if body.strip() and not fields else
                   f"The backend answered HTTP {status} with no message.")
    message = message.strip()[:UPSTREAM_MESSAGE_CHARS]
    if status == 404 and upstream_model and is_unserved_model(fields, upstream_model):
        return ApiError(404, "upstream_error",
                        f"The backend of model {_echo(alias)} does not serve the model name "
                        "the gateway sends it: the gateway's configuration must name a "
                        "model that backend serves (its operator fixes it; your request "
                        "was not the cause).")
    if status >= 500:
        return ApiError(502, "upstream_error", f"The backend failed (HTTP {status}): {message}")
    if status == 401:
        # The backend refused the gateway's own credential (a backend key not set, or
        # wrong): the client's key was accepted, and an SDK's AuthenticationError alone
        # would have its user suspect it (newcomer tester). The status stays the backend's.
        message = (f"The backend refused the gateway's credentials (HTTP 401: {message}); "
                   "your API key was accepted: the gateway's key for this backend is "
                   "missing or wrong (its operator sets it).")
    code, param = fields.get("code"), fields.get("param")
    return ApiError(status, code if isinstance(code, str) and code else "upstream_error",
                    message, param if isinstance(param, str) else None,
                    type=_TYPE_BY_STATUS.get(status, "invalid_request_error"))


def unserved_model_answer(status: int, body: bytes, upstream_model: str) -> bool:
    """Whether a backend's error answer refuses the model the gateway sent it (the
    gateway's configuration at fault), not the path or the request."""
    if status != 404 or not upstream_model:
        return False
    readable = _decompressed(body)
    return is_unserved_model(_error_fields(readable) if readable.strip() else {},
                             upstream_model)


def is_unserved_model(fields: dict[str, object], upstream_model: str) -> bool:
    """Whether a backend's 404 fields refuse the model it was sent (vLLM: "The model `X`
    does not exist.", `param` "model") rather than the path."""
    message = fields.get("message")
    return fields.get("param") == "model" or (
        isinstance(message, str) and f"`{upstream_model}`" in message)


def empty_answer(status: int) -> ApiError:
    """A backend's success with no body at all: no answer an SDK could parse (nor usage
    to meter), so it is the contract's 502 `upstream_error`, not an empty 200."""
    return ApiError(502, "upstream_error",
                    f"The backend sent no answer (HTTP {status} with an empty body).")


def redirected_answer(status: int) -> ApiError:
    """A backend's redirect: never an inference answer, and a client that followed it
    would send its key elsewhere. The contract's 502 `upstream_error`."""
    if status == 304:
        return ApiError(502, "upstream_error", "The backend answered HTTP 304 (not "
                        "modified), which is no answer to an inference request.")
    return ApiError(502, "upstream_error",
                    f"The backend redirected the request (HTTP {status}); the gateway "
                    "does not follow redirects.")


# (ESC is left to text: a backend's message may carry terminal colours.)
_BINARY = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1a\x1c-\x1f\x7f]")
ERROR_BODY_BYTES = 64 * 1024  # what is decompressed of an error body, at most


def _decompressed(body: bytes) -> bytes:
    """An error body gzipped or deflated (a backend that compresses although asked for
    identity; the gateway drops its `content-encoding` as it rewrites the answer): its
    first ERROR_BODY_BYTES decoded, as far as the bytes go (the body may be held up to a
    size, cut). Anything else as it is."""
    if body[:2] == b"\x1f\x8b":
        wbits = 31  # gzip
    elif len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0:
        wbits = 15  # zlib, HTTP's `deflate`
    else:
        return body
    try:
        # Nothing decoded (a short text whose first bytes read as a zlib header, say):
        # the bytes as they are.
        return zlib.decompressobj(wbits).decompress(body, ERROR_BODY_BYTES) or body
    except zlib.error:
        return body


def _error_fields(body: bytes) -> dict[str, object]:
    """`message`, `code`, `param` from an error body, as far as it has them."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            text = body.decode()
        except UnicodeDecodeError as e:
            # A character cut at the end (the body was held up to a size) is dropped;
            # anything else is not text (compressed, say): no message to keep.
            if e.start < len(body) - 3:
                return {}
            text = body[:e.start].decode()
        # Control characters other than line ends and tabs: binary, not a message.
        return {} if _BINARY.search(text) else {"message": text}
    if not isinstance(obj, dict):
        return {}
    inner = obj.get("error")
    if isinstance(inner, dict):  # OpenAI's shape (vLLM's newer one too)
        return inner
    if isinstance(inner, str):
        return {"message": inner}
    detail = obj.get("detail")
    if detail is not None and "message" not in obj:  # FastAPI / pydantic validation
        return {"message": detail if isinstance(detail, str) else orjson.dumps(detail).decode()}
    return obj
