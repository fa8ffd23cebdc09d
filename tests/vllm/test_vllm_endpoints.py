"""The endpoint table against a real vLLM: the Responses API on the chat model, and
embeddings, score / rerank and tokenize on the same model served for pooling. Each
record equals vLLM's own usage and stays within the hold.

After tests/vllm/test_vllm.py (file order): its audit must see only gateway traffic.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from policy.config import load_config
from policy.endpoints import lookup
from policy.request import parse_request
from policy.stream_usage import ResponsesStreamMeter
from policy.usage import Usage
from tests.e2e.conftest import Gateway
from tests.e2e.test_endpoints import post
from tests.e2e.test_gateway import records_for
from tests.helpers import SECRET
from tests.vllm.conftest import EMBED_MODEL, MODEL, VllmServer
from tests.vllm.test_vllm import EXACT, FIXTURES, RECORD, raw_stream

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

RESPONSE: dict[str, Any] = {
    "instructions": "Be brief.",
    "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "What is 2+2?"}]},
        {"type": "function_call", "call_id": "c1", "name": "add",
         "arguments": '{"a": 2, "b": 2}'},
        {"type": "function_call_output", "call_id": "c1", "output": "4"},
        {"role": "user", "content": "Thanks!"},
    ],
    "tools": [{"type": "function", "name": "add", "description": "Add numbers",
               "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}],
}


def hold(gw: Gateway, path: str, body: dict[str, Any]) -> tuple[int, int]:
    """(prompt, completion) bounds the gateway holds for `body` at `path`."""
    endpoint = lookup("POST", path)
    assert endpoint is not None
    req = parse_request(json.dumps(body).encode(), endpoint, load_config(gw.config_path))
    return req.prompt_bound, req.completion_bound


def record_usage(gw: Gateway, rid: str, endpoint: str) -> tuple[int, int]:
    [rec] = records_for(gw, rid)
    assert (rec["endpoint"], rec["estimated"], rec["status"]) == (endpoint, False, 200)
    return rec["prompt_tokens"], rec["completion_tokens"]


def vllm_response_usage(vllm: VllmServer, body: dict[str, Any]) -> tuple[int, int]:
    usage = json.loads(vllm.post("/v1/responses", {**body, "model": MODEL,
                                                   "stream": False}))["usage"]
    return usage["input_tokens"], usage["output_tokens"]


def test_responses_json_and_stream_records_equal_vllm_usage(
        vllm_gateway: Gateway, vllm_server: VllmServer) -> None:
    raw = vllm_gateway.client().responses.with_raw_response.create(
        model="demo", max_output_tokens=8, extra_body=EXACT, **RESPONSE)
    resp = raw.parse()
    assert resp.usage is not None and resp.usage.output_tokens == 8
    want = vllm_response_usage(vllm_server, {**RESPONSE, "max_output_tokens": 8, **EXACT})
    got = record_usage(vllm_gateway, raw.headers["x-request-id"], "responses")
    assert got == want == (resp.usage.input_tokens, 8)
    bound = hold(vllm_gateway, "/v1/responses", {"model": "demo", **RESPONSE})
    assert got[0] <= bound[0] and bound[1] == 256  # the cap, written upstream
    body = {"model": "demo", **RESPONSE, "max_output_tokens": 6, "stream": True, **EXACT}
    stream, rid = raw_stream(f"{vllm_gateway.base_url}/v1/responses", body, SECRET)
    assert stream.count(b"event: response.completed\n") == 1  # passed to the client
    assert record_usage(vllm_gateway, rid, "responses") == (want[0], 6)


def test_a_real_responses_stream_meters_exactly_at_every_split(
        vllm_server: VllmServer) -> None:
    body = {**RESPONSE, "model": MODEL, "max_output_tokens": 8, "stream": True, **EXACT}
    stream, _ = raw_stream(f"{vllm_server.url}/v1/responses", body)
    want = vllm_response_usage(vllm_server, {**body, "stream": False})
    for i in range(len(stream) + 1):
        meter = ResponsesStreamMeter()
        assert meter.feed(stream[:i]) is None and meter.feed(stream[i:]) is None
        assert meter.finish() is None
        assert meter.usage == Usage(*want) and meter.done, i
    fixture = FIXTURES / "vllm_responses.sse"
    if RECORD:
        fixture.write_bytes(stream)
    # The recording still has the shape vLLM sends today: the same events, same fields.
    assert _shape(fixture.read_bytes()) == _shape(stream)


def _shape(stream: bytes) -> set[tuple[str, tuple[str, ...]]]:
    out = set()
    for block in stream.split(b"\n\n")[:-1]:
        name, data = block.split(b"\n", 1)
        out.add((name.decode(), tuple(sorted(json.loads(data.removeprefix(b"data: "))))))
    return out


# -- the pooling model ------------------------------------------------------------------

def test_embeddings_record_equals_vllm_usage(vllm_embed_gateway: Gateway,
                                             vllm_embed_server: VllmServer) -> None:
    inputs: list[Any] = ["Hello, world!", "def main(): return 0", "ünïcödé"]
    create = vllm_embed_gateway.client().embeddings.with_raw_response.create
    # The SDK's default (base64, decoded by the SDK), then floats.
    for raw in (create(model="demo", input=inputs),
                create(model="demo", input=inputs, encoding_format="float")):
        emb = raw.parse()
        assert len(emb.data) == 3 and len(emb.data[0].embedding) == 256
        direct = json.loads(vllm_embed_server.post("/v1/embeddings", {
            "model": EMBED_MODEL, "input": inputs}))["usage"]["prompt_tokens"]
        got = record_usage(vllm_embed_gateway, raw.headers["x-request-id"], "embeddings")
        assert got == (direct, 0) == (emb.usage.prompt_tokens, 0)
        assert direct <= hold(vllm_embed_gateway, "/v1/embeddings",
                              {"model": "demo", "input": inputs})[0]
    ids = vllm_embed_gateway.client().embeddings.create(model="demo", input=[[5, 6, 7]])
    assert ids.usage.prompt_tokens == 3


CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello, wörld!"}]


@pytest.mark.parametrize("body", [
    {"messages": CONVERSATION},
    {"input": CONVERSATION},
    {"messages": [CONVERSATION, CONVERSATION[1:]]},
    # Messages vLLM's checks refuse (a `name` of 5): it embeds the `input` beside them
    # instead (pooling tester: held at the messages' bound, billed 64 times it).
    {"messages": [{"role": "user", "content": "hi", "name": 5}], "input": [[7] * 40] * 16},
])
def test_chat_style_embeddings_record_equals_vllm_usage(
        vllm_embed_gateway: Gateway, vllm_embed_server: VllmServer,
        body: dict[str, Any]) -> None:
    """Real-vLLM tester: `messages` was refused here and served by vLLM. Each form vLLM
    0.32 takes (a conversation or a batch, in `messages` or in `input`) is served, its
    record vLLM's usage, within its hold."""
    status, got, headers = post(vllm_embed_gateway, "/v1/embeddings", {"model": "demo", **body})
    assert status == 200, got
    direct = json.loads(vllm_embed_server.post("/v1/embeddings", {"model": EMBED_MODEL,
                                                                  **body}))
    want = direct["usage"]["prompt_tokens"]
    assert (got["usage"]["prompt_tokens"], len(got["data"])) == (want, len(direct["data"]))
    assert record_usage(vllm_embed_gateway, headers["x-request-id"], "embeddings") == (want, 0)
    assert want <= hold(vllm_embed_gateway, "/v1/embeddings", {"model": "demo", **body})[0]


@pytest.mark.parametrize(("path", "body"), [
    ("/rerank", {"query": "blue sky", "documents": ["the sky is blue", "cats", "sky"]}),
    ("/v1/rerank", {"query": "q", "documents": ["a b c"], "top_n": 1}),
    ("/v1/score", {"queries": "a b", "documents": ["a", "c d e"]}),
    ("/score", {"queries": ["x", "y"], "documents": ["z", "w"]}),
])
def test_rerank_and_score_records_equal_vllm_usage(
        vllm_embed_gateway: Gateway, vllm_embed_server: VllmServer, path: str,
        body: dict[str, Any]) -> None:
    status, got, headers = post(vllm_embed_gateway, path, {"model": "demo", **body})
    assert status == 200, got
    direct = json.loads(vllm_embed_server.post(path, {"model": EMBED_MODEL, **body}))
    want = direct["usage"]["prompt_tokens"]
    assert got["usage"]["prompt_tokens"] == want
    name = "rerank" if "rerank" in path else "score"
    assert record_usage(vllm_embed_gateway, headers["x-request-id"], name) == (want, 0)
    assert want <= hold(vllm_embed_gateway, path, {"model": "demo", **body})[0]


def test_tokenize_is_a_request_with_no_tokens(vllm_embed_gateway: Gateway,
                                              vllm_embed_server: VllmServer) -> None:
    status, got, headers = post(vllm_embed_gateway, "/tokenize",
                                {"model": "demo", "prompt": "Hello, world!"})
    direct = json.loads(vllm_embed_server.post("/tokenize", {"model": EMBED_MODEL,
                                                             "prompt": "Hello, world!"}))
    assert status == 200 and got["tokens"] == direct["tokens"]
    assert record_usage(vllm_embed_gateway, headers["x-request-id"], "tokenize") == (0, 0)
