"""The types of the sampling fields the gateway passes on unread, checked as vLLM checks
them, before anything is held: a `temperature: "hot"` was admitted, sent upstream, and
its 400 came back after it had spent one of the key's requests per minute.

The types are vLLM 0.32's (`ChatCompletionRequest`, `CompletionRequest`,
`ResponsesRequest`), read by pydantic in its lax mode as vLLM reads them, so nothing vLLM
accepts is refused here (`"0.5"` is a number to both, `"yes"` a boolean). Fields the
gateway reads itself (`max_tokens`, `n`, `stream`, ...) keep their own, stricter rules in
`policy.request`; values in range (a negative temperature) stay the backend's to judge.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, get_args, get_origin, get_type_hints

from pydantic import Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from policy.endpoints import Kind
from policy.errors import ApiError, invalid_request

_Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class _Sampling(TypedDict, total=False):
    """Chat and completions alike."""

    frequency_penalty: float | None
    presence_penalty: float | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    repetition_penalty: float | None
    length_penalty: float
    logit_bias: dict[str, float] | None
    seed: _Seed | None
    stop: str | list[str] | None
    user: str | None
    stop_token_ids: list[int] | None
    allowed_token_ids: list[int] | None
    bad_words: list[str]
    include_stop_str_in_output: bool
    ignore_eos: bool
    skip_special_tokens: bool
    spaces_between_special_tokens: bool
    add_special_tokens: bool
    prompt_logprobs: int | None


class _Chat(_Sampling, total=False):
    logprobs: bool | None
    top_logprobs: int | None
    parallel_tool_calls: bool | None
    echo: bool
    add_generation_prompt: bool
    continue_final_message: bool


class _Completion(_Sampling, total=False):
    logprobs: int | None
    echo: bool | None
    suffix: str | None


class _Responses(TypedDict, total=False):
    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    presence_penalty: float | None
    frequency_penalty: float | None
    logit_bias: dict[str, float] | None
    top_logprobs: int | None
    parallel_tool_calls: bool | None
    user: str | None
    instructions: str | None
    skip_special_tokens: bool
    include_stop_str_in_output: bool
    max_tool_calls: int | None


_SHAPES: Final[dict[Kind, type[Any]]] = {
    Kind.CHAT: _Chat, Kind.COMPLETION: _Completion, Kind.RESPONSES: _Responses}
_ADAPTERS: Final[dict[Kind, TypeAdapter[Any]]] = {
    kind: TypeAdapter(shape) for kind, shape in _SHAPES.items()}


def checked_fields(kind: Kind) -> frozenset[str]:
    """The fields whose types `check_field_types` checks for `kind`."""
    shape = _SHAPES.get(kind)
    return frozenset() if shape is None else frozenset(shape.__optional_keys__)


# What each type is called in the message, by the pydantic error's type.
_EXPECTED: Final = {
    "float": "a number", "int": "an integer", "bool": "a boolean", "string": "a string",
    "list": "an array", "dict": "an object",
}


_BOOL: Final = TypeAdapter(bool)


def lax_true(value: Any) -> bool:
    """Whether vLLM reads `value` as true (`true`, `1`, `"true"`, `"yes"`, `"on"`, ...):
    pydantic's lax boolean, as `check_field_types` admits it."""
    try:
        return _BOOL.validate_python(value) is True
    except ValidationError:
        return False


def check_field_types(body: dict[str, Any], kind: Kind) -> None:
    """A 400 naming the first field of `body` whose value vLLM would refuse by its type
    (and `seed` past 64 bits); nothing for a kind without such fields."""
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        return
    try:
        adapter.validate_python(body)
    except ValidationError as e:
        raise _refusal(e) from None


def check_vllm_rules(body: dict[str, Any], kind: Kind) -> None:
    """vLLM 0.32's refusals of a chat body that hold whatever its server's options
    (`ChatCompletionRequest`'s "before" validators, read as they read the raw body:
    Python truthiness), so that such a request is refused before anything is held, as
    `stream_options` without `stream` is (shapes tester: it spent one of the key's
    requests per minute on vLLM's 400)."""
    if kind is not Kind.CHAT:
        return
    if body.get("continue_final_message") and body.get("add_generation_prompt"):
        raise invalid_request("Cannot set both `continue_final_message` and "
                              "`add_generation_prompt` to True.", "continue_final_message")
    if body.get("logprob_token_ids") and not body.get("logprobs"):
        raise invalid_request("when using `logprob_token_ids`, `logprobs` must be set to "
                              "true.", "logprob_token_ids")
    if body.get("tools") == []:
        raise invalid_request("`tools` must not be an empty array. Either provide at least "
                              "one tool or omit the field entirely.", "tools")


def _refusal(e: ValidationError) -> ApiError:
    err = e.errors(include_url=False)[0]
    loc = err["loc"]
    name = str(loc[0])
    # The innermost place for an array's or object's member (`stop.1`, `logit_bias.42`);
    # a union's branch name (`stop`'s `list[str]`) is pydantic's, not the body's, but an
    # object's key named like one (`logit_bias.int`) is the body's.
    rest = list(loc[1:])
    if name in _UNIONS and rest:
        rest = rest[1:]
    inner = [str(p) for p in rest]
    param = ".".join([name, *inner])
    kind = str(err["type"]).split("_", 1)[0]
    if kind in ("greater", "less"):
        return invalid_request(f"'{param}' must be a 64-bit integer.", param)
    expected = _EXPECTED.get(kind)
    if name == "stop" and not inner:
        expected = "a string or an array of strings"
    if expected is None:
        return invalid_request(f"'{param}' is not valid: {err['msg']}.", param)
    return invalid_request(f"'{param}' must be {expected}.", param)


def _union_fields() -> frozenset[str]:
    """The fields typed as a union of several types besides null: pydantic names the
    branch it tried right after the field."""
    names: set[str] = set()
    for shape in _SHAPES.values():
        for field, hint in get_type_hints(shape).items():
            if len([a for a in get_args(hint) if a is not type(None)]) > 1 \
                    and get_origin(hint) is not Annotated:
                names.add(field)
    return frozenset(names)


_UNIONS: Final = _union_fields()
