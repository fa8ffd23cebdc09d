"""vLLM's pooling endpoints: /v1/embeddings and rerank / score. Their usage is prompt
tokens only (no completion), and they are bounded input by input, or pair by pair, as
`policy.tokens` describes.

`padding: "max_length"` pads every input to the context length, so it needs the model's
`max_model_len`; chat-style embeddings (`messages`) and multimodal score inputs are
refused (send text), as are the binary encodings (their usage is not in a JSON body).
"""

from __future__ import annotations

from typing import Any, Final

from policy.config import Model
from policy.errors import invalid_request
from policy.request_fields import lax_int
from policy.tokens import (
    Tally,
    batch_bound,
    field_tally,
    json_factor,
    pairs_bound,
    prompt_list,
    refuse_past_context,
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


def embeddings_input(body: dict[str, Any], model: Model) -> tuple[int, int, int]:
    """(estimate, bound, inputs) of a /v1/embeddings request."""
    if body.get("messages") is not None:
        raise invalid_request("Chat-style embeddings are not accepted here: send the text "
                              "as 'input'.", "messages")
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
    inputs = prompt_list(body.get("input"), "input")
    refuse_past_context(inputs, body, model, "input")
    estimate, bound = batch_bound(inputs, model)
    pad = _padded(body, model)
    if pad is not None:  # every input padded to the context: known, not estimated (a
        # key's TPM took the bytes' estimate and let a request far past it through)
        estimate = bound = pad * len(inputs)
    return estimate, bound, len(inputs)


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
    tally = Tally()
    for name in PAIR_TEMPLATE_FIELDS:
        field_tally(body.get(name), tally)
    per_pair = (model.chat_template_tokens_per_request + tally.text
                + json_factor(model.chat_template_json_indent) * tally.json)
    estimate, bound = pairs_bound(queries, docs, model, per_pair)
    pad = _padded(body, model)
    if pad is not None:  # each text of a pair padded to the context: the cap, and
        # what a key's TPM takes (as embeddings')
        estimate = bound = (2 * pad + 1) * len(docs)
    return estimate, bound, len(docs)
