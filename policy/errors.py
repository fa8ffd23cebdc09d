"""OpenAI-shaped errors: one type for every refusal the gateway can make."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

# The OpenAI error `type` for each HTTP status we emit. SDKs pick the
# exception class from the status; `code` is what programs branch on.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


@dataclass(frozen=True, slots=True)
class ApiError(Exception):
    """A refusal: HTTP status, OpenAI `code`, human message, offending `param`."""

    status: int
    code: str
    message: str
    param: str | None = None
    type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    @property
    def error_type(self) -> str:
        return self.type or _TYPE_BY_STATUS.get(self.status, "server_error")

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


def model_not_found(model: str) -> ApiError:
    return ApiError(404, "model_not_found", f"The model {model!r} does not exist.", "model")


def not_found(path: str) -> ApiError:
    return ApiError(404, "not_found", f"No endpoint {path!r} on this gateway.")


def request_too_large(limit: int) -> ApiError:
    return ApiError(413, "request_too_large", f"The request body exceeds {limit} bytes.")


def service_unavailable(message: str) -> ApiError:
    return ApiError(503, "service_unavailable", message)
