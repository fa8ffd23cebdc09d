"""vLLM's pooling endpoints: /v1/embeddings and rerank / score. Their usage is prompt
tokens only (no completion), and they are bounded input by input, or pair by pair, as
`policy.tokens` describes.

`padding: "max_length"` pads every input to the context length, so it needs the model's
`max_model_len`. Chat-style embeddings (a conversation, or a batch of them, in
`messages` or in `input`, as vLLM 0.32 takes them) are bounded as chat prompts are,
conversation by conversation. Multimodal score inputs are refused (send text), as are
the binary encodings (their usage is not in a JSON body).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Final

from policy.config import Model
from policy.errors import ApiError, invalid_request
from policy.request_fields import check_chat_embeddings_types, lax_int
from policy.tokens import (
    Tally,
    batch_bound,
    chat_prompt,
    field_tally,
    json_factor,
    pairs_bound,
    prompt_list,
    refuse_past_context,
    template_kwargs_tally,
)

ENCODINGS: Final = frozenset({"float", "base64"})
# Where score requests put their two sides (vLLM takes any one of these pairs).
SCORE_SIDES: Final = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"),
                      ("text_1", "text_2"))
# Score templates may render these for every pair.
PAIR_TEMPLATE_FIELDS: Final = ("instruction", "chat_template_kwargs")


def _padded(body: dict[str, Any], model: Model) -> int | None:
    """The context length every input is padded to, or None (no padding)."""
    padding = body.get("padding")
    if padding is None or padding == "do_not_pad":
        return None
    if padding != "max_length":
        raise invalid_request("'padding' must be 'max_length' or 'do_not_pad'.", "padding")
    if model.max_model_len is None:
        raise invalid_request("'padding' is not accepted for this model: it sets no "
                              "max_model_len, the length inputs are padded to.", "padding")
    return model.max_model_len


def _is_conversation(value: Any) -> bool:
    """vLLM's `_is_chat_messages`: a non-empty array of objects with a string role."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) for m in value)


def conversations(body: dict[str, Any]) -> list[Any] | None:
    """The conversations of a chat-style embeddings request, or None for one of texts or
    token ids: `messages` (one conversation, or a batch of them), else an `input` that is
    one or a batch (vLLM reads `messages` first). Each is checked by `chat_prompt`."""
    messages = body.get("messages")
    value = body.get("input") if messages is None else messages
    if messages is None and not (_is_conversation(value) or (
            isinstance(value, list) and bool(value) and all(map(_is_conversation, value)))):
        return None
    if isinstance(value, list) and value and all(isinstance(c, list) for c in value):
        return value  # a batch
    return [value]


def _chat_embeddings(body: dict[str, Any], model: Model, convs: list[Any]
                     ) -> tuple[int, int]:
    """(estimate, bound) of chat-style embeddings: each conversation as a chat prompt
    (the template's own fields counted with each)."""
    check_chat_embeddings_types(body)
    if body.get("continue_final_message") and body.get("add_generation_prompt"):
        raise invalid_request("Cannot set both `continue_final_message` and "
                              "`add_generation_prompt` to True.", "continue_final_message")
    param = "messages" if body.get("messages") is not None else "input"
    estimate = bound = 0
    for i, conv in enumerate(convs):
        try:
            e, b = chat_prompt({**body, "messages": conv}, model)
        except ApiError as err:  # name where it is: `input[1]`, not `messages`
            where = param if len(convs) == 1 else f"{param}[{i}]"
            if err.param is not None and err.param.startswith("messages"):
                err = replace(err, param=where + err.param.removeprefix("messages"))
            raise err from None
        estimate, bound = estimate + e, bound + b
    return estimate, bound


def embeddings_input(body: dict[str, Any], model: Model) -> tuple[int, int, int]:
    """(estimate, bound, inputs) of a /v1/embeddings request."""
    encoding = body.get("encoding_format")
    # (present and null too: vLLM's has a default, no null)
    if "encoding_format" in body and (not isinstance(encoding, str)
                                      or encoding not in ENCODINGS):
        raise invalid_request("'encoding_format' must be 'float' or 'base64'.",
                              "encoding_format")
    raw = body.get("dimensions")
    dimensions = lax_int(raw)  # as vLLM reads it: "256" is 256 (review)
    if raw is not None and (dimensions is None or dimensions < 1):
        raise invalid_request("'dimensions' must be a positive integer.", "dimensions")
    convs = conversations(body)
    if convs is not None:
        estimate, bound = _chat_embeddings(body, model, convs)
        count = len(convs)
    else:
        inputs = prompt_list(body.get("input"), "input")
        refuse_past_context(inputs, body, model, "input")
        estimate, bound = batch_bound(inputs, model)
        count = len(inputs)
    pad = _padded(body, model)
    if pad is not None:  # every input padded to the context: known, not estimated (a
        # key's TPM took the bytes' estimate and let a request far past it through)
        estimate = bound = pad * count
    if body.get("messages") is not None and body.get("input") is not None:
        # vLLM's request types are a union: `messages` that fail its own checks (a
        # `name` of 5) leave it the `input`, which it embeds instead (pooling tester: 512
        # held, 32,768 billed). Both are held, the larger.
        try:
            alt = embeddings_input({k: v for k, v in body.items() if k != "messages"}, model)
        except ApiError:
            return estimate, bound, count  # no `input` vLLM could embed either
        return max(estimate, alt[0]), max(bound, alt[1]), max(count, alt[2])
    return estimate, bound, count


def _texts(value: Any, param: str) -> list[str]:
    """One side of a rerank / score request: a string or a non-empty array of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise invalid_request(f"'{param}' must be a string or an array of strings (multimodal "
                          "inputs are not accepted here).", param)


def _score_sides(body: dict[str, Any]) -> tuple[str, str]:
    """The pair of names the body uses: both present, else the first one half-present."""
    for first, second in SCORE_SIDES:
        if first in body and second in body:
            return first, second
    for first, second in SCORE_SIDES:
        if first in body or second in body:
            return first, second
    raise invalid_request("A score request needs 'queries' and 'documents'.", "queries")


def scoring_pairs(body: dict[str, Any], model: Model, rerank: bool) -> tuple[int, int, int]:
    """(estimate, bound, pairs) of a rerank (`query`, `documents`) or score request."""
    first, second = ("query", "documents") if rerank else _score_sides(body)
    if rerank and not isinstance(body.get(first), str):
        raise invalid_request("'query' must be a string.", "query")
    queries = _texts(body.get(first), first)
    docs = _texts(body.get(second), second)
    if len(queries) not in (1, len(docs)):
        raise invalid_request(f"'{first}' must hold one item or as many as '{second}'.",
                              first)
    tally = Tally(messages=2)  # a pair renders as a query and a document
    for name in PAIR_TEMPLATE_FIELDS:
        if name == "chat_template_kwargs":
            template_kwargs_tally(body.get(name), tally)
        else:
            field_tally(body.get(name), tally)
    per_pair = (model.chat_template_tokens_per_request + model.prompt_tokens_per_byte
                * (tally.text + json_factor(model.chat_template_json_indent) * tally.json))
    estimate, bound = pairs_bound(queries, docs, model, per_pair)
    pad = _padded(body, model)
    if pad is not None:  # each text of a pair padded to the context: the cap, and
        # what a key's TPM takes (as embeddings')
        estimate = bound = (2 * pad + 1) * len(docs)
    return estimate, bound, len(docs)
