"""Request parsing and validation for the simulator, with vLLM-style error responses.

Only the fields that change the simulated output or its usage are checked; everything
else a real request may carry (temperature, stop, ...) is accepted and ignored, as vLLM
would accept it. As vLLM does: ``n`` choices per prompt; one prompt per entry of a batched
completions ``prompt``; no ``max_tokens`` means up to the context length for chat (or the
server's ``default_max_tokens``, vLLM's generation config) and 16 for completions.
``best_of`` is ignored, as vLLM 0.32 ignores it; ``n > 1`` with ``temperature: 0`` is
refused; a ``max_tokens`` past what the context leaves a prompt is clipped (see ``_gen``).
Errors have vLLM 0.32's body, ``{"error": {message, type, param, code}}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson

from authz.sim.tokens import prompt_token_counts, prompt_tokens_chat
from policy.tokens import is_token_id, token_ids


class SimError(Exception):
    """An error answered with vLLM 0.32's ``ErrorResponse`` body (``error_body``)."""

    def __init__(self, status: int, message: str, err_type: str | None = None,
                 param: str | None = None, in_stream: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type or error_type(status)
        self.param = param
        # vLLM finds it only once a stream has begun: a streamed request gets a 200 whose
        # first event is this error, then [DONE] (a JSON request, the error itself).
        self.in_stream = in_stream

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.err_type, self.param)


def error_type(status: int) -> str:
    """vLLM-style error type: 400 -> BadRequestError, 503 -> ServiceUnavailableError."""
    try:
        name = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        return "Error"
    return name if name.endswith("Error") else name + "Error"


def error_body(status: int, message: str, err_type: str | None = None,
               param: str | None = None) -> bytes:
    """vLLM 0.32's ``ErrorResponse`` JSON: OpenAI's ``{"error": {message, type, param,
    code}}`` (older vLLM sent the fields at the top level, beside ``"object": "error"``)."""
    return orjson.dumps({"error": {"message": message, "type": err_type or error_type(status),
                                   "param": param, "code": status}})


def param_error(message: str, param: str, value: Any = None) -> SimError:
    """vLLM's ``VLLMValidationError``: a 400 naming the parameter in ``param`` and, as its
    ``str()`` does, at the end of the message."""
    tail = f"parameter={param}" if value is None else f"parameter={param}, value={value}"
    return SimError(400, f"{message} ({tail})", param=param)


@dataclass(frozen=True, slots=True)
class GenRequest:
    """What the simulator needs to know to answer a completion request."""

    model: str
    prompt_tokens: int  # all prompts together
    max_tokens: int  # per sequence
    stream: bool
    include_usage: bool
    n: int = 1  # choices returned per prompt
    prompts: int = 1
    # vLLM's stream_interval: after the first token, one chunk per this many tokens.
    stream_interval: int = 1
    # stream_options.continuous_usage_stats (honoured only beside include_usage): every
    # chunk carries its own choice's usage so far (its prompt's tokens, its tokens).
    continuous_usage: bool = False
    prompt_counts: tuple[int, ...] = ()  # each prompt's tokens (a batch: one each)
    # Each prompt's tokens per sequence when they differ (vLLM clips each prompt's
    # max_tokens to what the context leaves it); empty: max_tokens for every prompt.
    clipped: tuple[int, ...] = ()

    @property
    def choices(self) -> int:
        return self.n * self.prompts

    @property
    def lengths(self) -> tuple[int, ...]:
        """Tokens generated per sequence, prompt by prompt."""
        return self.clipped or (self.max_tokens,) * self.prompts

    @property
    def choice_lengths(self) -> list[int]:
        """Tokens of each returned choice, in vLLM's order (prompt by prompt, n each)."""
        return [length for length in self.lengths for _ in range(self.n)]

    @property
    def completion_tokens(self) -> int:
        """Tokens generated in all: what usage and the metrics report."""
        return sum(self.lengths) * self.n


def prompt_too_long(count: int, max_model_len: int) -> SimError:
    """vLLM 0.32's renderer refusing a prompt longer than the context."""
    return param_error(
        f"This model's maximum context length is {max_model_len} tokens. However, your "
        f"prompt contains {count} input tokens, which exceeds this limit even without any "
        "output tokens. Please reduce the length of the input prompt.", "input_tokens", count)


def _input_text(value: Any) -> str:
    """The ``input`` of a validation error as vLLM 0.32 prints it."""
    if isinstance(value, dict):
        return f"<dict of {len(value)} items>"
    if isinstance(value, list):
        return f"<list of {len(value)} items>"
    return str(value)


def invalid_field(field: str, msg: str, kind: str, value: Any) -> SimError:
    """A request validation error as vLLM 0.32 answers FastAPI's: type ``Bad Request``,
    ``param`` the dotted location (``body.messages``), and the error in the message."""
    loc = f"body.{field}" if field != "" else "body"
    detail = {"type": kind, "loc": loc, "msg": msg, "input": _input_text(value)}
    return SimError(400, f"1 validation error:\n  {detail}", "Bad Request", loc)


def parse_body(raw: bytes) -> dict[str, Any]:
    """Decode a JSON object body or raise a 400."""
    if not raw.strip():
        raise invalid_field("", "Field required", "missing", None)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid_field(str(exc.pos), "JSON decode error", "json_invalid", {}) from None
    if not isinstance(body, dict):
        raise invalid_field("", "Input should be a valid dictionary or object to extract "
                            "fields from", "model_attributes_type", body)
    return body


_INT_TEXT = re.compile(r"\s*[+-]?\d+\s*")
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def opt_int(body: Mapping[str, Any], field: str) -> int | None:
    """An optional integer, read as vLLM's pydantic models read it (lax mode): a bool, a
    whole float and a string of digits are integers too."""
    value = body.get(field)
    if value is None or type(value) is int:
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise invalid_field(field, "Input should be a valid integer, got a number with a "
                            "fractional part", "int_from_float", value)
    if isinstance(value, str):
        if _INT_TEXT.fullmatch(value):
            return int(value)
        raise invalid_field(field, "Input should be a valid integer, unable to parse string "
                            "as an integer", "int_parsing", value)
    raise invalid_field(field, "Input should be a valid integer", "int_type", value)


def opt_bool(body: Mapping[str, Any], field: str) -> bool:
    """An optional boolean (absent or null: False), read in pydantic's lax mode: 0 and 1,
    and strings such as "true", "yes", "off"."""
    value = body.get(field)
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    kind, msg = (("bool_parsing", "Input should be a valid boolean, unable to interpret input")
                 if isinstance(value, str) else ("bool_type", "Input should be a valid boolean"))
    raise invalid_field(field, msg, kind, value)


def opt_float(body: Mapping[str, Any], field: str) -> float | None:
    """An optional number (lax: a numeric string too)."""
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise invalid_field(field, "Input should be a valid number, unable to parse "
                                "string as a number", "float_parsing", value) from None
    raise invalid_field(field, "Input should be a valid number", "float_type", value)


@dataclass(frozen=True, slots=True)
class _Common:
    model: str
    stream: bool
    include_usage: bool
    n: int
    stream_interval: int
    continuous_usage: bool = False


def model_of(body: Mapping[str, Any], models: Mapping[str, Any], *,
             aliases: bool = True) -> str:
    """The body's served model name (the first served one when it names none, as vLLM
    does), or vLLM's 400 / 404. vLLM 0.32's pooling endpoints (embeddings, rerank, score)
    answer the 404 without the aliases and without ``param`` (``aliases=False``)."""
    model = body.get("model")
    if model is None:
        return next(iter(models))
    if not isinstance(model, str):
        raise invalid_field("model", "Input should be a valid string", "string_type", model)
    if model not in models:
        if not aliases:
            raise SimError(404, f"The model `{model}` does not exist.", "NotFoundError")
        raise SimError(404, f"The model `{model}` does not exist. Valid aliases: "
                       f"{', '.join(models)}.", "NotFoundError", "model")
    return model


def _grammar(body: Mapping[str, Any]) -> None:
    """A `structured_outputs.regex` that does not compile: vLLM 0.32's grammar backend
    refuses it after the stream began (SimError.in_stream); `re` stands in for it."""
    spec = body.get("structured_outputs")
    regex = spec.get("regex") if isinstance(spec, dict) else None
    if not isinstance(regex, str):
        return
    try:
        re.compile(regex)
    except re.error as e:
        raise SimError(400, f"Grammar error: {e}", in_stream=True) from None


def _common(body: Mapping[str, Any], models: Mapping[str, Any]) -> _Common:
    """Validate model, stream, stream_options, n and best_of."""
    model = model_of(body, models)
    _grammar(body)
    stream = opt_bool(body, "stream")
    options = body.get("stream_options")
    include_usage = continuous = False
    if options is not None:
        if not isinstance(options, dict):
            raise invalid_field(
                "stream_options", "Input should be a valid dictionary", "dict_type", options
            )
        if options and not stream:  # vLLM's test: an empty object passes
            raise param_error("Stream options can only be defined when `stream=True`.",
                              "stream_options")
        include_usage = opt_bool(options, "include_usage")
        continuous = include_usage and opt_bool(options, "continuous_usage_stats")
    n = _n(body)
    interval = opt_int(body, "stream_interval")
    if interval is not None and interval < 1:
        raise invalid_field("stream_interval", "Input should be greater than or equal to 1",
                            "greater_than_equal", interval)
    return _Common(model, stream, include_usage, n, interval or 1, continuous)


def sampling_temperature(body: Mapping[str, Any]) -> float | None:
    """``temperature``, or vLLM's 400 for a negative one."""
    temperature = opt_float(body, "temperature")
    if temperature is not None and temperature < 0:
        raise param_error(f"temperature must be non-negative, got {temperature}.",
                          "temperature", temperature)
    return temperature


# vLLM's _SAMPLING_EPS: a temperature below it is greedy sampling.
SAMPLING_EPS = 1e-5


def _n(body: Mapping[str, Any]) -> int:
    """``n``, as vLLM 0.32 checks it. ``best_of`` is type-checked and otherwise ignored,
    as vLLM 0.32 ignores it (streaming or not, below ``n`` or above): one sequence per
    choice. ``n > 1`` with greedy sampling (``temperature`` below 1e-5) is a 400."""
    n = opt_int(body, "n")
    n = 1 if n is None else n
    if n < 1:
        raise SimError(400, f"n must be at least 1, got {n}.")
    opt_int(body, "best_of")
    temperature = sampling_temperature(body)
    if n > 1 and temperature is not None and temperature < SAMPLING_EPS:
        raise SimError(400, f"n must be 1 when using greedy sampling, got {n}.")
    return n


def _gen(
    common: _Common,
    requested: int | None,
    default: int | None,
    prompt_counts: list[int],
    max_model_len: int,
    field: str = "max_tokens",
) -> GenRequest:
    """The generation, as vLLM 0.32's renderer and ``get_max_tokens`` make it: a
    ``requested`` (``field``) above the context length is a 400, and so is a prompt
    longer than the context; each prompt then generates ``requested`` tokens (else
    ``default``), clipped to what the context leaves it (200, finish_reason "length"); a
    prompt that fills the context leaves 0, a 400."""
    if requested is not None and requested > max_model_len:
        raise param_error(f"{field}={requested} cannot be greater than max_model_len="
                          f"{max_model_len}. Please request fewer output tokens.",
                          field, requested)
    for count in prompt_counts:
        if count > max_model_len:
            raise prompt_too_long(count, max_model_len)
    value = requested if requested is not None else default
    lengths = tuple(max_model_len - count if value is None else min(value, max_model_len - count)
                    for count in prompt_counts)
    if min(lengths) < 1:
        raise param_error(f"max_tokens must be at least 1, got {min(lengths)}.", "max_tokens",
                          min(lengths))
    top = max(lengths)
    return GenRequest(common.model, sum(prompt_counts), top, common.stream,
                      common.include_usage, common.n, len(prompt_counts),
                      common.stream_interval, common.continuous_usage, tuple(prompt_counts),
                      lengths if min(lengths) != top else ())


def parse_chat(body: Mapping[str, Any], models: Mapping[str, Any],
               default_max_tokens: int | None, max_model_len: int) -> GenRequest:
    """Validate a ``/v1/chat/completions`` body."""
    common = _common(body, models)
    messages = body.get("messages")
    if messages is None:
        raise invalid_field("messages", "Field required", "missing", None)
    if not isinstance(messages, list):
        raise invalid_field("messages", "Input should be a valid list", "list_type", messages)
    if not messages:
        raise SimError(400, "Cannot apply chat template to an empty conversation. Provide at "
                       "least one message.")
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
    requested, field = opt_int(body, "max_completion_tokens"), "max_completion_tokens"
    if requested is None:
        requested, field = opt_int(body, "max_tokens"), "max_tokens"
    return _gen(common, min_one_token(requested), default_max_tokens,
                [prompt_tokens], max_model_len, field)


def min_one_token(requested: int | None) -> int | None:
    """vLLM's SamplingParams check, worded for max_tokens whichever field carried it."""
    if requested is not None and requested < 1:
        raise param_error(f"max_tokens must be at least 1, got {requested}.", "max_tokens",
                          requested)
    return requested


def valid_prompt(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return True
    if not isinstance(prompt, list) or not prompt:
        return False
    if all(isinstance(p, str) for p in prompt) or token_ids(prompt):
        return True
    # Lists of ids, read as vLLM's request models read them (`1.0`, `true`, `"1"`).
    return all(isinstance(p, list) and all(is_token_id(t) for t in p) for p in prompt)


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
    if prompt == "":
        raise param_error("Either prompt or prompt_embeds must be provided and non-empty.",
                          "prompt")
    if prompt == []:
        raise SimError(400, "You must pass at least one prompt")
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
    if isinstance(prompt, list) and any(p in ("", []) for p in prompt):
        # vLLM's input processor: an empty prompt of a batch leaves no token to decode from.
        raise SimError(400, "The decoder prompt cannot be empty")
    counts = prompt_token_counts(prompt, suffix)
    requested = opt_int(body, "max_tokens")
    if requested == 0 and opt_bool(body, "echo"):
        # vLLM 0.32 scores the prompt: it generates one token (counted in its usage, not
        # returned); the sim does not echo the prompt's text.
        requested = 1
    requested = min_one_token(requested)
    if requested is None:
        requested = COMPLETIONS_DEFAULT_MAX_TOKENS
    return _gen(common, requested, None, counts, max_model_len)
