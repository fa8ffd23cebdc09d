"""The simulator's pooling and tokenizer endpoints: vLLM's shapes, exact usage, errors."""

from __future__ import annotations

import base64
import struct
from typing import Any

import pytest

from authz.sim.pooling import EMBED_DIM, VOCAB
from authz.sim.tokens import WORDS

from .conftest import Sim


async def post(sim: Sim, path: str, body: Any, **headers: str) -> tuple[int, Any]:
    async with sim.http.post(sim.url + path, json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_embeddings_shape_and_usage(sim: Sim) -> None:
    status, body = await post(sim, "/v1/embeddings", {
        "model": "tiny-llama", "input": ["Hello, world!", "a b"]})
    assert status == 200
    assert body["object"] == "list" and body["model"] == "tiny-llama"
    assert body["id"].startswith("embd-")
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == EMBED_DIM
               for d in body["data"])
    assert body["usage"] == {"prompt_tokens": 4 + 2, "total_tokens": 6,
                             "completion_tokens": 0, "prompt_tokens_details": None,
                             "completion_tokens_details": None}
    assert sim.state.models["tiny-llama"].prompt_tokens._value.get() == 6


async def test_embeddings_are_deterministic_and_encode_as_base64(sim: Sim) -> None:
    req = {"model": "tiny-llama", "input": [[1, 2, 3]], "dimensions": 4}
    _, a = await post(sim, "/v1/embeddings", req)
    _, b = await post(sim, "/v1/embeddings", {**req, "encoding_format": "base64"})
    vector = a["data"][0]["embedding"]
    assert len(vector) == 4 and a["usage"]["prompt_tokens"] == 3
    packed = base64.b64decode(b["data"][0]["embedding"])
    assert list(struct.unpack("<4f", packed)) == pytest.approx(vector)
    _, again = await post(sim, "/v1/embeddings", req)
    assert again["data"] == a["data"]


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/v1/embeddings", {"model": "nope", "input": "a"}, 404),
    ("/v1/embeddings", {"model": "tiny-llama"}, 400),
    ("/v1/embeddings", {"model": "tiny-llama", "input": "a", "encoding_format": "bytes"},
     400),
    ("/v1/embeddings", {"model": "tiny-llama", "input": [list(range(40000))]}, 400),
    ("/rerank", {"model": "tiny-llama", "query": ["q"], "documents": ["d"]}, 400),
    ("/score", {"model": "tiny-llama", "queries": ["a", "b"], "documents": ["c"] * 3}, 400),
    ("/detokenize", {"model": "tiny-llama", "tokens": [-1]}, 400),
    ("/tokenize", {"model": "tiny-llama"}, 400),
])
async def test_errors(sim: Sim, path: str, body: dict[str, Any], status: int) -> None:
    got, err = await post(sim, path, body)
    assert got == status and list(err) == ["error"] and err["error"]["code"] == status


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
async def test_rerank_orders_by_relevance(sim: Sim, path: str) -> None:
    docs = ["cats and dogs", "the sky is blue", "blue sky today"]
    status, body = await post(sim, path, {"model": "tiny-llama", "query": "blue sky",
                                          "documents": docs, "top_n": 2})
    assert status == 200 and body["id"].startswith("score-")
    assert [r["index"] for r in body["results"]] == [1, 2]
    assert body["results"][0] == {"index": 1, "document": {"text": docs[1],
                                                           "multi_modal": None},
                                  "relevance_score": 1.0}
    # Per pair: the query (2), one padding token, the document.
    assert body["usage"] == {"prompt_tokens": 3 * 3 + 3 + 4 + 3,
                             "total_tokens": 3 * 3 + 3 + 4 + 3}


@pytest.mark.parametrize("sides", [("queries", "documents"), ("queries", "items"),
                                   ("data_1", "data_2"), ("text_1", "text_2")])
async def test_score_pairs(sim: Sim, sides: tuple[str, str]) -> None:
    first, second = sides
    status, body = await post(sim, "/v1/score", {"model": "tiny-llama", first: ["a b", "c"],
                                                 second: ["a", "d"]})
    assert status == 200 and body["object"] == "list"
    assert [(d["index"], d["object"], d["score"]) for d in body["data"]] == [
        (0, "score", 0.5), (1, "score", 0.0)]
    assert body["usage"]["prompt_tokens"] == (2 + 1 + 1) + (1 + 1 + 1)


async def test_tokenize_and_detokenize(sim: Sim) -> None:
    status, body = await post(sim, "/tokenize", {"model": "tiny-llama",
                                                 "prompt": "Hello, world!"})
    assert status == 200
    assert body["count"] == 4 and len(body["tokens"]) == 4
    assert all(0 <= t < VOCAB for t in body["tokens"])
    assert body["max_model_len"] == sim.state.max_model_len and body["token_strs"] is None
    _, chat = await post(sim, "/tokenize", {"model": "tiny-llama", "messages": [
        {"role": "user", "content": "Hello, world!"}]})
    assert chat["count"] == 10  # as a chat prompt
    _, text = await post(sim, "/detokenize", {"model": "tiny-llama", "tokens": [0, 1, 25]})
    assert text == {"prompt": f"{WORDS[0]} {WORDS[1]} {WORDS[1]}"}
    assert sim.state.models["tiny-llama"].prompt_tokens._value.get() == 0


async def test_status_hook_applies(sim: Sim) -> None:
    status, err = await post(sim, "/v1/embeddings", {"model": "tiny-llama", "input": "a"},
                             **{"x-sim-status": "503"})
    assert status == 503 and err["error"]["code"] == 503


@pytest.mark.parametrize(("path", "body", "status", "error"), [
    ("/v1/embeddings", {"model": "nope", "input": "a"}, 404,
     {"message": "The model `nope` does not exist.", "type": "NotFoundError", "param": None}),
    ("/rerank", {"model": "nope", "query": "a", "documents": ["b"]}, 404,
     {"message": "The model `nope` does not exist.", "type": "NotFoundError", "param": None}),
    ("/score", {"model": "nope", "queries": "a", "documents": ["b"]}, 404,
     {"message": "The model `nope` does not exist.", "type": "NotFoundError", "param": None}),
    ("/tokenize", {"model": "nope", "prompt": "a"}, 404,
     {"message": "The model `nope` does not exist. Valid aliases: tiny-llama, other-model.",
      "type": "NotFoundError", "param": "model"}),
    ("/v1/embeddings", {"model": "tiny-llama", "input": []}, 400,
     {"message": "You must pass at least one prompt", "type": "BadRequestError",
      "param": None}),
    ("/v1/embeddings", {"model": "tiny-llama", "input": ""}, 400,
     {"message": "The decoder prompt cannot be empty", "type": "BadRequestError",
      "param": None}),
    ("/v1/embeddings", {"model": "tiny-llama", "input": ["a", ""]}, 400,
     {"message": "The decoder prompt cannot be empty", "type": "BadRequestError",
      "param": None}),
    ("/v1/embeddings", {"model": "tiny-llama", "input": [[1] * 40000]}, 400,
     {"message": "This model's maximum context length is 32768 tokens. However, your prompt "
      "contains 40000 input tokens, which exceeds this limit even without any output tokens. "
      "Please reduce the length of the input prompt. (parameter=input_tokens, value=40000)",
      "type": "BadRequestError", "param": "input_tokens"}),
])
async def test_pooling_errors_are_vllms(sim: Sim, path: str, body: dict[str, Any],
                                        status: int, error: dict[str, Any]) -> None:
    """vLLM 0.32's pooling endpoints name no aliases (and no param) in their 404, unlike
    its generate and tokenizer endpoints; empty and too long inputs as its renderer."""
    got, err = await post(sim, path, body)
    assert (got, err) == (status, {"error": {**error, "code": status}})
