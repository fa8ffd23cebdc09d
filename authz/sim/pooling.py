"""The simulator's pooling and tokenizer endpoints, in vLLM 0.32's shapes: /v1/embeddings,
rerank, score, /tokenize and /detokenize. Each takes a decoded body and returns an
``Answer`` (or raises ``SimError``). Deterministic:

* an input's tokens: ``count_tokens(text)`` for a string, the length of a token-id list
  (``prompt_token_counts``, as for completions);
* an embedding: ``dimensions`` (default ``EMBED_DIM``) floats from the input's CRC-32;
  ``encoding_format: "base64"`` packs them as little-endian float32, as vLLM does;
* a scored pair (vLLM's bi-encoder): the query's tokens, one padding token and the
  document's; its score, the share of the query's words found in the document;
* a token's id: its CRC-32 modulo ``VOCAB``; /detokenize maps id ``i`` to
  ``WORDS[i % len(WORDS)]``.
"""

from __future__ import annotations

import base64
import os
import struct
import time
import zlib
from collections.abc import Mapping
from typing import Any, Final

import orjson

from authz.sim.protocol import (
    SimError,
    invalid_field,
    model_of,
    opt_int,
    prompt_too_long,
    valid_prompt,
)
from authz.sim.tokens import (
    TOKEN_RE,
    WORDS,
    count_tokens,
    prompt_token_counts,
    prompt_tokens_chat,
)

# The response body, the served model, and the prompt tokens the engine processed.
Answer = tuple[bytes, str, int]
EMBED_DIM: Final = 16
VOCAB: Final = 4096
# Where score requests put their two sides (vLLM takes any one of these pairs).
SCORE_SIDES: Final = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"),
                      ("text_1", "text_2"))


def usage(prompt_tokens: int) -> dict[str, Any]:
    """vLLM's UsageInfo of a prompt-only request."""
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
            "completion_tokens": 0, "prompt_tokens_details": None,
            "completion_tokens_details": None}


def _vector(seed: bytes, dims: int) -> list[float]:
    crc = zlib.crc32(seed)
    return [((crc + k * 2654435761) % 2001 - 1000) / 1000.0 for k in range(dims)]


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _fits(counts: list[int], max_model_len: int) -> None:
    for count in counts:
        if count > max_model_len:
            raise prompt_too_long(count, max_model_len)


def embeddings(body: Mapping[str, Any], models: Mapping[str, Any],
               max_model_len: int) -> Answer:
    """A /v1/embeddings answer: one vector per input, prompt-only usage."""
    model = model_of(body, models, aliases=False)
    convs = _conversations(body)
    if convs is not None:  # chat-style, as vLLM 0.32 takes it: one vector a conversation
        counts = [prompt_tokens_chat(c, body) for c in convs]
        return _embedded(body, model, [orjson.dumps(c) for c in convs], counts,
                         max_model_len)
    inputs = body.get("input")
    if inputs == []:
        raise SimError(400, "You must pass at least one prompt")
    if inputs == "" or (isinstance(inputs, list) and any(x in ("", []) for x in inputs)):
        raise SimError(400, "The decoder prompt cannot be empty")
    if inputs is None or not valid_prompt(inputs):
        raise invalid_field("input", "Input should be a string, a list of strings or token "
                            "ids", "union_type", inputs)
    if isinstance(inputs, str) or isinstance(inputs[0], int):
        inputs = [inputs]
    return _embedded(body, model, [orjson.dumps(x) for x in inputs],
                     prompt_token_counts(inputs), max_model_len)


def _conversations(body: Mapping[str, Any]) -> list[Any] | None:
    """vLLM's chat-style embeddings: a conversation or a batch of them, in `messages` or
    in `input` (`messages` first); None for texts or token ids."""
    def conversation(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in v)

    value = body.get("messages")
    if value is None:
        value = body.get("input")
        if not (conversation(value) or (isinstance(value, list) and bool(value)
                                        and all(map(conversation, value)))):
            return None
    if not isinstance(value, list) or not value:
        raise invalid_field("messages", "Input should be a non-empty list", "list_type",
                            value)
    if all(isinstance(c, list) for c in value):
        return value
    if not all(isinstance(m, dict) for m in value):
        raise invalid_field("messages", "Input should be a valid dictionary", "dict_type",
                            value)
    return [value]


def _embedded(body: Mapping[str, Any], model: str, seeds: list[bytes], counts: list[int],
              max_model_len: int) -> Answer:
    """The answer: one vector per input (from its seed), prompt-only usage."""
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise SimError(400, f"encoding_format {encoding!r} is not supported by the simulator.")
    dims = opt_int(body, "dimensions") or EMBED_DIM
    if not 1 <= dims <= 65536:
        raise SimError(400, f"dimensions must be from 1 to 65536, got {dims}.")
    data = [{"index": i, "object": "embedding",
             "embedding": _encode(_vector(seed, dims), encoding)}
            for i, seed in enumerate(seeds)]
    _fits(counts, max_model_len)
    tokens = sum(counts)
    return orjson.dumps({
        "id": "embd-" + os.urandom(16).hex(), "object": "list", "created": int(time.time()),
        "model": model, "data": data, "usage": usage(tokens)}), model, tokens


def _side(value: Any, field: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise invalid_field(field, "Input should be a string or a list of strings", "union_type",
                        value)


def _words(text: str) -> set[str]:
    return {m.lower() for m in TOKEN_RE.findall(text)}


def _pairs(queries: list[str], docs: list[str], max_model_len: int
           ) -> tuple[list[float], int]:
    """(score per document, prompt tokens of all pairs)."""
    if len(queries) not in (1, len(docs)):
        raise SimError(400, "Input lengths must be either 1:1, 1:N or N:N")
    _fits([count_tokens(t) for t in (*queries, *docs)], max_model_len)
    scores: list[float] = []
    tokens = 0
    for i, doc in enumerate(docs):
        q = queries[0 if len(queries) == 1 else i]
        words = _words(q)
        scores.append(len(words & _words(doc)) / max(1, len(words)))
        tokens += count_tokens(q) + 1 + count_tokens(doc)
    return scores, tokens


def rerank(body: Mapping[str, Any], models: Mapping[str, Any], max_model_len: int
           ) -> Answer:
    """A rerank answer: documents by relevance, the `top_n` first (0: all)."""
    model = model_of(body, models, aliases=False)
    query = body.get("query")
    if not isinstance(query, str):
        raise invalid_field("query", "Input should be a valid string", "string_type", query)
    docs = _side(body.get("documents"), "documents")
    top_n = opt_int(body, "top_n") or len(docs)
    scores, tokens = _pairs([query], docs, max_model_len)
    order = sorted(range(len(docs)), key=lambda i: -scores[i])  # stable: ties keep order
    results = [{"index": i, "document": {"text": docs[i], "multi_modal": None},
                "relevance_score": scores[i]} for i in order]
    return orjson.dumps({"id": "score-" + os.urandom(16).hex(), "model": model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                         "results": results[:top_n]}), model, tokens


def score(body: Mapping[str, Any], models: Mapping[str, Any], max_model_len: int
          ) -> Answer:
    """A score answer: one score per pair."""
    model = model_of(body, models, aliases=False)
    first, second = next(((a, b) for a, b in SCORE_SIDES if a in body and b in body),
                         SCORE_SIDES[0])
    scores, tokens = _pairs(_side(body.get(first), first), _side(body.get(second), second),
                            max_model_len)
    return orjson.dumps({
        "id": "score-" + os.urandom(16).hex(), "object": "list", "created": int(time.time()),
        "model": model, "data": [{"index": i, "object": "score", "score": s}
                                 for i, s in enumerate(scores)],
        "usage": usage(tokens)}), model, tokens


def tokenize(body: Mapping[str, Any], models: Mapping[str, Any],
             max_model_len: int) -> Answer:
    """A /tokenize answer for a `prompt` or chat `messages` (no usage: no engine work)."""
    model = model_of(body, models)
    prompt, messages = body.get("prompt"), body.get("messages")
    if isinstance(messages, list):
        if not all(isinstance(m, dict) for m in messages):
            raise invalid_field("messages", "Input should be a valid dictionary", "dict_type",
                                messages)
        n = prompt_tokens_chat(messages, body)
        ids = [zlib.crc32(str(i).encode()) % VOCAB for i in range(n)]
    elif isinstance(prompt, str):
        ids = [zlib.crc32(t.encode()) % VOCAB for t in TOKEN_RE.findall(prompt)]
    else:
        raise invalid_field("prompt", "Field required", "missing", None)
    return orjson.dumps({"count": len(ids), "max_model_len": max_model_len, "tokens": ids,
                         "token_strs": None}), model, 0


def detokenize(body: Mapping[str, Any], models: Mapping[str, Any],
               max_model_len: int) -> Answer:
    """A /detokenize answer: each id as one word."""
    model = model_of(body, models)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(type(t) is int and t >= 0 for t in ids):
        raise invalid_field("tokens", "Input should be a list of token ids", "list_type", ids)
    return orjson.dumps({"prompt": " ".join(WORDS[t % len(WORDS)] for t in ids)}), model, 0


ANSWERS: Final = {
    "/v1/embeddings": embeddings,
    "/rerank": rerank, "/v1/rerank": rerank, "/v2/rerank": rerank,
    "/score": score, "/v1/score": score,
    "/tokenize": tokenize, "/detokenize": detokenize,
}  # fmt: skip
