"""Request parsing and validation for the simulator, with vLLM-style error responses.

Only the fields that change the simulated output are checked; everything else a real
request may carry (temperature, stop, tools, ...) is accepted and ignored, as vLLM would
accept it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson

from authz.sim.tokens import prompt_tokens_chat, prompt_tokens_completion


class SimError(Exception):
    """An error answered with vLLM's ``ErrorResponse`` body."""

    def __init__(self, status: int, message: str, err_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type or error_type(status)

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.err_type)


def error_type(status: int) -> str:
    """vLLM-style error type: 400 -> BadRequestError, 503 -> ServiceUnavailableError."""
    try:
        name = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        return "Error"
    return name if name.endswith("Error") else name + "Error"


def error_body(status: int, message: str, err_type: str | None = None) -> bytes:
    """vLLM's ``ErrorResponse`` JSON."""
    return orjson.dumps(
        {
            "object": "error",
            "message": message,
            "type": err_type or error_type(status),
            "param": None,
            "code": status,
        }
    )


@dataclass(frozen=True, slots=True)
class GenRequest:
    """What the simulator needs to know to answer a completion request."""

    model: str
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool


def _invalid(field: str, msg: str, kind: str, value: Any) -> SimError:
    # Shaped like the str() of FastAPI's RequestValidationError, which vLLM returns as message.
    detail = {"type": kind, "loc": ("body", field), "msg": msg, "input": value}
    return SimError(400, str([detail]))


def parse_body(raw: bytes) -> dict[str, Any]:
    """Decode a JSON object body or raise a 400."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        detail = {"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error"}
        raise SimError(400, str([detail])) from None
    if not isinstance(body, dict):
        raise _invalid("", "Input should be a valid dictionary", "model_attributes_type", body)
    return body


def _opt_int(body: Mapping[str, Any], field: str) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(field, "Input should be a valid integer", "int_type", value)
    return value


def _opt_bool(body: Mapping[str, Any], field: str) -> bool:
    value = body.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(field, "Input should be a valid boolean", "bool_type", value)
    return value


def _common(body: Mapping[str, Any], models: Mapping[str, Any]) -> tuple[str, bool, bool]:
    """Validate model, stream and stream_options; returns (model, stream, include_usage)."""
    model = body.get("model")
    if model is None:
        raise _invalid("model", "Field required", "missing", None)
    if not isinstance(model, str):
        raise _invalid("model", "Input should be a valid string", "string_type", model)
    if model not in models:
        raise SimError(404, f"The model `{model}` does not exist.", "NotFoundError")
    stream = _opt_bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _invalid(
                "stream_options", "Input should be a valid dictionary", "dict_type", options
            )
        if not stream:
            raise SimError(400, "Stream options can only be defined when `stream=True`.")
        include_usage = _opt_bool(options, "include_usage")
    n = _opt_int(body, "n")
    if n is not None and n != 1:
        raise SimError(400, f"n must be 1 in the tokenbooth simulator, got {n}.")
    return model, stream, include_usage


def _max_tokens(value: int | None, default: int, prompt_tokens: int, max_model_len: int) -> int:
    if value is None:
        value = default
    elif value < 1:
        raise SimError(400, f"max_tokens must be at least 1, got {value}.")
    if prompt_tokens + value > max_model_len:
        raise SimError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + value} tokens ({prompt_tokens} in the messages, "
            f"{value} in the completion). Please reduce the length of the messages or "
            "completion.",
        )
    return value


def parse_chat(
    body: Mapping[str, Any], models: Mapping[str, Any], default_max_tokens: int, max_model_len: int
) -> GenRequest:
    """Validate a ``/v1/chat/completions`` body."""
    model, stream, include_usage = _common(body, models)
    messages = body.get("messages")
    if messages is None:
        raise _invalid("messages", "Field required", "missing", None)
    if not isinstance(messages, list):
        raise _invalid("messages", "Input should be a valid list", "list_type", messages)
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _invalid("messages", "Each message needs a string role", "value_error", message)
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _invalid(
                "messages", "content should be a string or a list of parts", "value_error", content
            )
    prompt_tokens = prompt_tokens_chat(messages)
    # vLLM prefers max_completion_tokens over the deprecated max_tokens.
    requested = _opt_int(body, "max_completion_tokens")
    if requested is None:
        requested = _opt_int(body, "max_tokens")
    max_tokens = _max_tokens(requested, default_max_tokens, prompt_tokens, max_model_len)
    return GenRequest(model, prompt_tokens, max_tokens, stream, include_usage)


def _valid_prompt(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return True
    if not isinstance(prompt, list) or not prompt:
        return False
    if all(isinstance(p, str) for p in prompt):
        return True
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return True
    return all(
        isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
        for p in prompt
    )


def parse_completion(
    body: Mapping[str, Any], models: Mapping[str, Any], default_max_tokens: int, max_model_len: int
) -> GenRequest:
    """Validate a ``/v1/completions`` body."""
    model, stream, include_usage = _common(body, models)
    prompt = body.get("prompt")
    if prompt is None:
        raise _invalid("prompt", "Field required", "missing", None)
    if not _valid_prompt(prompt):
        raise _invalid(
            "prompt",
            "Input should be a string, a list of strings or token ids",
            "union_type",
            prompt,
        )
    prompt_tokens = prompt_tokens_completion(prompt)
    requested = _opt_int(body, "max_tokens")
    max_tokens = _max_tokens(requested, default_max_tokens, prompt_tokens, max_model_len)
    return GenRequest(model, prompt_tokens, max_tokens, stream, include_usage)
