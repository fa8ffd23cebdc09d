"""The types of the fields the gateway passes on unread, checked as vLLM checks them,
before anything is held: a `temperature: "hot"` was admitted, sent upstream, and its 400
came back after it had spent one of the key's requests per minute. And vLLM's rules that
hold whatever its server's options (`check_vllm_rules`).

The types are vLLM 0.32's (`ChatCompletionRequest`, `CompletionRequest`,
`ResponsesRequest`, `EmbeddingCompletionRequest`), read by pydantic in its lax mode as
vLLM reads them, so nothing vLLM accepts is refused here (`"0.5"` is a number to both,
`"yes"` a boolean); a field vLLM reads by a model of its own is checked as the object it
must be (`_Object`). Fields the gateway reads itself (`max_tokens`, `n`, `stream`,
`encoding_format`, ...) keep their own, stricter rules in `policy.request`; values in
range (a negative temperature) stay the backend's to judge. The parity test against
vLLM's own models: tests/vllm/test_vllm_field_types.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal, TypeVar, get_args, get_origin, get_type_hints

from pydantic import Field, StrictInt, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from policy.endpoints import Kind
from policy.errors import ApiError, invalid_request

_Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
_Truncate = Annotated[int, Field(ge=-1, le=2**63 - 1)]
# A field typed by one of vLLM's request models (`response_format`, `reasoning`, ...):
# checked here as the object it must be; its members are the backend's to judge.
_Object = dict[str, Any]
_Side = Literal["left", "right"]
_Payload = Literal["tensors", "none"]
_ToolChoice = Literal["none", "auto", "required"]


class _Common(TypedDict, total=False):
    """Every generation endpoint's (chat, completions, Responses) vLLM extras."""

    request_id: str
    session_id: str | None
    cache_salt: str | None
    mm_payload: _Payload
    return_mm_kwargs: bool | None
    structured_outputs: _Object | None
    watermarking: bool | None
    vllm_xargs: _Object | None
    kv_transfer_params: _Object | None
    ec_transfer_params: _Object | None


class _Sampling(_Common, total=False):
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
    truncate_prompt_tokens: _Truncate | None
    truncation_side: _Side | None
    logprob_token_ids: list[int] | None
    response_format: _Object | None
    repetition_detection: _Object | None
    # vLLM's own validator: an integer proper (not `"1"`, `2.0`, `true`), -1 or more
    thinking_token_budget: Annotated[StrictInt, Field(ge=-1)] | None
    return_tokens_as_token_ids: bool | None
    return_token_ids: bool | None
    return_token_offsets: bool | None
    routed_experts_prompt_start: int


class _Chat(_Sampling, total=False):
    logprobs: bool | None
    top_logprobs: int | None
    parallel_tool_calls: bool | None
    echo: bool
    add_generation_prompt: bool
    continue_final_message: bool
    tool_choice: _ToolChoice | _Object | None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh",
                              "max"] | None
    documents: list[dict[str, str]] | None
    chat_template: str | None
    chat_template_kwargs: dict[str, Any] | None
    media_io_kwargs: dict[str, dict[str, Any]] | None
    mm_processor_kwargs: dict[str, Any] | None
    return_prompt_text: bool | None


class _Completion(_Sampling, total=False):
    logprobs: int | None
    echo: bool | None
    suffix: str | None


class _Responses(_Common, total=False):
    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    presence_penalty: float | None
    frequency_penalty: float | None
    repetition_penalty: float | None
    logit_bias: dict[str, float] | None
    seed: _Seed | None
    stop: str | list[str] | None
    stop_token_ids: list[int] | None
    ignore_eos: bool
    top_logprobs: int | None
    parallel_tool_calls: bool | None
    user: str | None
    instructions: str | None
    skip_special_tokens: bool
    include_stop_str_in_output: bool
    max_tool_calls: int | None
    background: bool | None
    store: bool | None
    metadata: dict[str, str] | None
    previous_response_id: str | None
    prompt_cache_key: str | None
    prompt: _Object | None
    reasoning: _Object | None
    text: _Object | None
    tool_choice: _ToolChoice | _Object
    truncation: Literal["auto", "disabled"] | None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"]
    include: list[Literal["code_interpreter_call.outputs",
                          "computer_call_output.output.image_url",
                          "file_search_call.results", "message.input_image.image_url",
                          "message.output_text.logprobs",
                          "reasoning.encrypted_content"]] | None
    enable_response_messages: bool
    chat_template_kwargs: dict[str, Any] | None
    media_io_kwargs: dict[str, dict[str, Any]] | None
    mm_processor_kwargs: dict[str, Any] | None


class _Embeddings(TypedDict, total=False):
    """What vLLM's embedding requests share, whether by `input` or by `messages`."""

    user: str | None
    dimensions: int | None
    embed_dtype: Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"]
    endianness: Literal["native", "big", "little"]
    padding: Literal["max_length", "do_not_pad"] | None
    use_activation: bool | None
    add_special_tokens: bool
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None
    truncation_side: _Side | None
    request_id: str
    cache_salt: str | None
    mm_processor_kwargs: dict[str, Any] | None


class _ChatEmbeddings(_Embeddings, total=False):
    """What vLLM's chat-style embedding requests add (read only for those: vLLM lets an
    unknown field of an `input` request through)."""

    add_generation_prompt: bool
    continue_final_message: bool
    chat_template_kwargs: dict[str, Any] | None
    media_io_kwargs: dict[str, dict[str, Any]] | None


_CHAT_EMBEDDINGS: Final = TypeAdapter(_ChatEmbeddings)


def check_chat_embeddings_types(body: dict[str, Any]) -> None:
    """`check_field_types` for a chat-style embeddings request's own fields."""
    try:
        _CHAT_EMBEDDINGS.validate_python(body)
    except ValidationError as e:
        raise _refusal(e) from None


_SHAPES: Final[dict[Kind, type[Any]]] = {
    Kind.CHAT: _Chat, Kind.COMPLETION: _Completion, Kind.RESPONSES: _Responses,
    Kind.EMBEDDINGS: _Embeddings}
_ADAPTERS: Final[dict[Kind, TypeAdapter[Any]]] = {
    kind: TypeAdapter(shape) for kind, shape in _SHAPES.items()}


def checked_fields(kind: Kind) -> frozenset[str]:
    """The fields whose types `check_field_types` checks for `kind`."""
    shape = _SHAPES.get(kind)
    return frozenset() if shape is None else frozenset(shape.__optional_keys__)


def objects_only(kind: Kind) -> frozenset[str]:
    """The fields of `kind` checked only as objects (`_Object`): vLLM reads their members
    by its own models, which may refuse an object this check lets through."""
    shape = _SHAPES.get(kind)
    if shape is None:
        return frozenset()
    return frozenset(name for name, hint in get_type_hints(shape).items()
                     if _Object in (hint, *get_args(hint)))


# What a union field must be, said whole (pydantic names only the branch it tried first).
_UNION_WORDS: Final = {
    "stop": "a string or an array of strings",
    "tool_choice": "\"none\", \"auto\", \"required\" or an object",
}
# What each type is called in the message, by the pydantic error's type.
_EXPECTED: Final = {
    "float": "a number", "int": "an integer", "bool": "a boolean", "string": "a string",
    "list": "an array", "dict": "an object",
}


_BOOL: Final = TypeAdapter(bool)
_INT: Final = TypeAdapter(int)
T = TypeVar("T")


def _lax(adapter: TypeAdapter[T], value: Any) -> T | None:
    """`value` as pydantic's lax mode reads it, as vLLM reads its fields; else None."""
    try:
        return adapter.validate_python(value)
    except ValidationError:
        return None


def lax_true(value: Any) -> bool:
    """Whether vLLM reads `value` as true (`true`, `1`, `"true"`, `"yes"`, `"on"`, ...):
    pydantic's lax boolean, as `check_field_types` admits it."""
    return _lax(_BOOL, value) is True


def lax_bool(value: Any) -> bool | None:
    """`value` as vLLM reads a boolean field (`true`, `"true"`, `1`, `"no"`), else None."""
    return _lax(_BOOL, value)


def lax_int(value: Any) -> int | None:
    """`value` as vLLM reads an integer field (`5`, `"5"`, `5.0`), else None."""
    return _lax(_INT, value)


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


_MAX_SALT: Final = 128
_SALT_FORBIDDEN: Final = frozenset("@/\\\x00")


def _check_cache_salt(salt: Any) -> None:
    """vLLM's `validate_cache_salt`, for every endpoint that takes one."""
    if salt is None:
        return
    if not isinstance(salt, str) or not salt:
        raise invalid_request("Parameter 'cache_salt' must be a non-empty string if "
                              "provided.", "cache_salt")
    if len(salt) > _MAX_SALT or not _SALT_FORBIDDEN.isdisjoint(salt):
        raise invalid_request("Parameter 'cache_salt' must be at most 128 characters and "
                              "must not contain '@', '/', '\\', or NUL.", "cache_salt")



def check_vllm_rules(body: dict[str, Any], kind: Kind) -> None:
    """vLLM 0.32's refusals of a body that hold whatever its server's options
    (its request models' "before" validators, read as they read the raw body: Python
    truthiness), so that such a request is refused before anything is held, as
    `stream_options` without `stream` is (shapes tester: it spent one of the key's
    requests per minute on vLLM's 400)."""
    _check_cache_salt(body.get("cache_salt"))
    _check_logprobs(body, kind)
    if kind is Kind.COMPLETION and body.get("logprob_token_ids") \
            and body.get("logprobs") is None:
        raise invalid_request("when using `logprob_token_ids`, `logprobs` must be set.",
                              "logprob_token_ids")
    if kind is Kind.EMBEDDINGS:
        _check_pooling_removed(body)
    if kind is Kind.RESPONSES:
        _check_responses_tools(body)
    if kind is not Kind.CHAT:
        return
    choice = body.get("tool_choice")
    if choice is not None and choice != "none" and body.get("tools") is None:
        raise invalid_request("When using `tool_choice`, `tools` must be set.", "tool_choice")
    if body.get("continue_final_message") and body.get("add_generation_prompt"):
        raise invalid_request("Cannot set both `continue_final_message` and "
                              "`add_generation_prompt` to True.", "continue_final_message")
    if body.get("logprob_token_ids") and not body.get("logprobs"):
        raise invalid_request("when using `logprob_token_ids`, `logprobs` must be set to "
                              "true.", "logprob_token_ids")
    if body.get("tools") == []:
        raise invalid_request("`tools` must not be an empty array. Either provide at least "
                              "one tool or omit the field entirely.", "tools")


# The fields vLLM's `check_logprobs` compares as numbers, by kind: the prompt's, then
# the completion's (chat's `top_logprobs`, completions' `logprobs`).
_LOGPROBS: Final = {Kind.CHAT: ("prompt_logprobs", "top_logprobs"),
                    Kind.COMPLETION: ("prompt_logprobs", "logprobs")}


def _check_logprobs(body: dict[str, Any], kind: Kind) -> None:
    """vLLM's `check_logprobs` (chat and completions), read as it reads the raw body
    (real-vLLM tester: `top_logprobs: "3"` and `prompt_logprobs` on a stream were
    admitted, and vLLM's 400 spent an rpm slot)."""
    names = _LOGPROBS.get(kind)
    if names is None:
        return
    for name in names:
        v = body.get(name)
        if v is not None and not isinstance(v, int | float):
            raise invalid_request(f"`{name}` must be an integer.", name)
    prompt = body.get("prompt_logprobs")
    if prompt is not None:
        if body.get("stream") and (prompt > 0 or prompt == -1):
            raise invalid_request("`prompt_logprobs` are not available when `stream=True`.",
                                  "prompt_logprobs")
        if prompt < 0 and prompt != -1:
            raise invalid_request("`prompt_logprobs` must be a positive value or -1.",
                                  "prompt_logprobs")
    name = names[1]
    top = body.get(name)
    if top is None:
        return
    if top < 0 and top != -1:
        raise invalid_request(f"`{name}` must be a positive value or -1.", name)
    if kind is Kind.CHAT and (top == -1 or top > 0) and not body.get("logprobs"):
        raise invalid_request("when using `top_logprobs`, `logprobs` must be set to true.",
                              name)


def _check_responses_tools(body: dict[str, Any]) -> None:
    """vLLM's ResponsesRequest.check_tool_usage: a tool required, or named, with none."""
    tools, choice = body.get("tools"), body.get("tool_choice", "auto")
    if tools is not None and not (isinstance(tools, list | dict | str) and not tools):
        return
    if choice == "required":
        raise invalid_request("Tool choice 'required' must be specified with 'tools' "
                              "parameter.", "tool_choice")
    if isinstance(choice, dict) and choice.get("type") in ("function", "custom"):
        raise invalid_request("Tool choice 'function' not found in 'tools' parameter.",
                              "tool_choice")


# vLLM's `reject_removed_pooling_parameters`: pooling parameters it no longer takes.
_REMOVED_TASKS: Final = {
    "score": "`score` task was removed; use `classify` instead.",
    "encode": "`encode` task was removed; use `token_embed` or `token_classify` instead.",
}


def _check_pooling_removed(body: dict[str, Any]) -> None:
    if "normalize" in body:  # present at all, null included, as vLLM reads it
        raise invalid_request("Parameter `normalize` was removed; use `use_activation` "
                              "instead.", "normalize")
    task = body.get("task")
    if isinstance(task, str) and task in _REMOVED_TASKS:
        raise invalid_request(_REMOVED_TASKS[task], "task")


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
    value = err.get("input")
    if type(value) is float and value.is_integer() and abs(value) >= 2**63:
        # An integer past 64 bits reaches here as a float (the JSON reader's way).
        return invalid_request(f"'{param}' must be a 64-bit integer.", param)
    if kind in ("greater", "less"):
        bound = (err.get("ctx") or {})
        if any(abs(v) >= 2**63 - 1 for v in bound.values() if isinstance(v, int)):
            return invalid_request(f"'{param}' must be a 64-bit integer.", param)
        if "ge" in bound:
            return invalid_request(f"'{param}' must be at least {bound['ge']}.", param)
        if "le" in bound:
            return invalid_request(f"'{param}' must be at most {bound['le']}.", param)
        return invalid_request(f"'{param}' is not valid: {err['msg']}.", param)
    expected = _UNION_WORDS.get(name) if not inner else None
    expected = expected or _EXPECTED.get(kind)
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
