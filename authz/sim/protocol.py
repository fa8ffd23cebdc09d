"""Request parsing and validation for the simulator, with vLLM-style error responses.

Only the fields that change the simulated output or its usage are checked; everything
else a real request may carry (temperature, stop, ...) is accepted and ignored, as vLLM
would accept it. As vLLM does: ``n`` choices per prompt; one prompt per entry of a batched
completions ``prompt``; no ``max_tokens`` means up to the context length for chat (or the
server's ``default_max_tokens``, vLLM's generation config) and 16 for completions.
``best_of`` is honoured as vLLM's V0 engine did (``best_of`` sequences generated, the
best ``n`` returned, refused when streaming), and all generated tokens are reported in
usage: the costliest reading of a field that vLLM 0.32 ignores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson

from authz.sim.tokens import prompt_token_counts, prompt_tokens_chat


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
    prompt_tokens: int  # all prompts together
    max_tokens: int  # per sequence
    stream: bool
    include_usage: bool
    n: int = 1  # choices returned per prompt
    best_of: int = 1  # sequences generated per prompt (at least n)
    prompts: int = 1
    # vLLM's stream_interval: after the first token, one chunk per this many tokens.
    stream_interval: int = 1
    # stream_options.continuous_usage_stats (honoured only beside include_usage): every
    # chunk carries its own choice's usage so far (its prompt's tokens, its tokens).
    continuous_usage: bool = False
    prompt_counts: tuple[int, ...] = ()  # each prompt's tokens (a batch: one each)

    @property
    def choices(self) -> int:
        return self.n * self.prompts

    @property
    def completion_tokens(self) -> int:
        """Tokens generated in all: what usage and the metrics report."""
        return self.max_tokens * self.best_of * self.prompts


def invalid_field(field: str, msg: str, kind: str, value: Any) -> SimError:
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
        raise invalid_field("", "Input should be a valid dictionary", "model_attributes_type", body)
    return body


def opt_int(body: Mapping[str, Any], field: str) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_field(field, "Input should be a valid integer", "int_type", value)
    return value


def opt_bool(body: Mapping[str, Any], field: str) -> bool:
    value = body.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid_field(field, "Input should be a valid boolean", "bool_type", value)
    return value


@dataclass(frozen=True, slots=True)
class _Common:
    model: str
    stream: bool
    include_usage: bool
    n: int
    best_of: int
    stream_interval: int
    continuous_usage: bool = False


def model_of(body: Mapping[str, Any], models: Mapping[str, Any]) -> str:
    """The body's served model name, or vLLM's 400 / 404."""
    model = body.get("model")
    if model is None:
        raise invalid_field("model", "Field required", "missing", None)
    if not isinstance(model, str):
        raise invalid_field("model", "Input should be a valid string", "string_type", model)
    if model not in models:
        raise SimError(404, f"The model `{model}` does not exist.", "NotFoundError")
    return model


def _common(body: Mapping[str, Any], models: Mapping[str, Any]) -> _Common:
    """Validate model, stream, stream_options, n and best_of."""
    model = model_of(body, models)
    stream = opt_bool(body, "stream")
    options = body.get("stream_options")
    include_usage = continuous = False
    if options is not None:
        if not isinstance(options, dict):
            raise invalid_field(
                "stream_options", "Input should be a valid dictionary", "dict_type", options
            )
        if options and not stream:  # vLLM's test: an empty object passes
            raise SimError(400, "Stream options can only be defined when `stream=True`.")
        include_usage = opt_bool(options, "include_usage")
        continuous = include_usage and opt_bool(options, "continuous_usage_stats")
    n, best_of = _n_best_of(body, stream)
    interval = opt_int(body, "stream_interval")
    if interval is not None and interval < 1:
        raise invalid_field("stream_interval", "Input should be greater than or equal to 1",
                            "greater_than_equal", interval)
    return _Common(model, stream, include_usage, n, best_of, interval or 1, continuous)


def _n_best_of(body: Mapping[str, Any], stream: bool) -> tuple[int, int]:
    n = opt_int(body, "n")
    n = 1 if n is None else n
    if n < 1:
        raise SimError(400, f"n must be at least 1, got {n}.")
    best_of = opt_int(body, "best_of")
    best_of = n if best_of is None else best_of
    if best_of < n:
        raise SimError(
            400, f"best_of must be greater than or equal to n, got n={n} and best_of={best_of}."
        )
    if stream and best_of > n:
        raise SimError(400, "best_of must equal n when streaming.")
    return n, best_of


def _gen(
    common: _Common,
    requested: int | None,
    default: int | None,
    prompt_counts: list[int],
    max_model_len: int,
) -> GenRequest:
    """The generation: ``requested`` tokens per sequence, else ``default``, else what the
    context leaves (vLLM's rule); a 400 when a prompt and its output do not fit."""
    longest = max(prompt_counts)
    if requested is not None and requested < 1:
        raise SimError(400, f"max_tokens must be at least 1, got {requested}.")
    value = requested if requested is not None else default
    if value is None:
        value = max(1, max_model_len - longest)
    if longest + value > max_model_len:
        raise SimError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {longest + value} tokens ({longest} in the messages, "
            f"{value} in the completion). Please reduce the length of the messages or "
            "completion.",
        )
    return GenRequest(common.model, sum(prompt_counts), value, common.stream,
                      common.include_usage, common.n, common.best_of, len(prompt_counts),
                      common.stream_interval, common.continuous_usage, tuple(prompt_counts))


def parse_chat(body: Mapping[str, Any], models: Mapping[str, Any],
               default_max_tokens: int | None, max_model_len: int) -> GenRequest:
    """Validate a ``/v1/chat/completions`` body."""
    common = _common(body, models)
    messages = body.get("messages")
    if messages is None:
        raise invalid_field("messages", "Field required", "missing", None)
    if not isinstance(messages, list):
        raise invalid_field("messages", "Input should be a valid list", "list_type", messages)
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid_field("messages", "Each message needs a string role", "value_error",
                                message)
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise invalid_field(
                "messages", "content should be a string or a list of parts", "value_error", content
            )
    prompt_tokens = prompt_tokens_chat(messages, body)
    # vLLM prefers max_completion_tokens over the deprecated max_tokens.
    requested = opt_int(body, "max_completion_tokens")
    if requested is None:
        requested = opt_int(body, "max_tokens")
    return _gen(common, requested, default_max_tokens, [prompt_tokens], max_model_len)


def valid_prompt(prompt: Any) -> bool:
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


# vLLM's CompletionRequest default for max_tokens (OpenAI's too).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def parse_completion(body: Mapping[str, Any], models: Mapping[str, Any],
                     default_max_tokens: int | None, max_model_len: int) -> GenRequest:
    """Validate a ``/v1/completions`` body (``default_max_tokens`` is for chat only, as in
    vLLM, where a completions request always carries one)."""
    common = _common(body, models)
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid_field("prompt", "Field required", "missing", None)
    if not valid_prompt(prompt):
        raise invalid_field(
            "prompt",
            "Input should be a string, a list of strings or token ids",
            "union_type",
            prompt,
        )
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise invalid_field("suffix", "Input should be a valid string", "string_type", suffix)
    counts = prompt_token_counts(prompt, suffix)
    requested = opt_int(body, "max_tokens")
    if requested is None:
        requested = COMPLETIONS_DEFAULT_MAX_TOKENS
    return _gen(common, requested, None, counts, max_model_len)
