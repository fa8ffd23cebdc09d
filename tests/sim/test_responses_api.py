"""The simulator's Responses API: vLLM's objects and typed stream events, exact usage."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest

from authz.sim import make_app
from authz.sim.app import SIMULATOR_KEY
from authz.sim.responses_api import messages, template_fields
from authz.sim.tokens import output_text, prompt_tokens_chat

from .conftest import Sim, serve

# "Hello, world!" as one user message: 4 tokens + 3 per message + 3 for the reply.
PROMPT = 10


async def post(sim: Sim, body: Any, **headers: str) -> tuple[int, Any]:
    async with sim.http.post(sim.url + "/v1/responses", json=body, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def events(sim: Sim, body: Any, **headers: str) -> list[tuple[str, dict[str, Any]]]:
    async with sim.http.post(sim.url + "/v1/responses", json={**body, "stream": True},
                             headers=headers) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        text = await r.text()
    out = []
    for block in text.split("\n\n")[:-1]:
        name, data = block.split("\n")
        out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


async def test_json_response_has_vllm_shape_and_usage(sim: Sim) -> None:
    status, body = await post(sim, {"model": "tiny-llama", "input": "Hello, world!",
                                    "max_output_tokens": 5})
    assert status == 200
    assert body["object"] == "response" and body["id"].startswith("resp_")
    assert (body["status"], body["incomplete_details"]) == (
        "incomplete", {"reason": "max_output_tokens"})
    [item] = body["output"]
    assert (item["type"], item["role"], item["status"]) == ("message", "assistant",
                                                            "completed")
    assert item["content"] == [{"annotations": [], "text": output_text(5),
                                "type": "output_text", "logprobs": None}]
    usage = body["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (
        PROMPT, 5, PROMPT + 5)
    assert usage["output_tokens_details"]["reasoning_tokens"] == 0
    metrics = sim.state.models["tiny-llama"]
    assert (metrics.prompt_tokens._value.get(), metrics.generation_tokens._value.get()) == (
        PROMPT, 5)


async def test_stream_sends_typed_events_in_vllm_order(sim: Sim) -> None:
    got = await events(sim, {"model": "tiny-llama", "input": "Hello, world!",
                             "max_output_tokens": 3})
    names = [n for n, _ in got]
    assert names == ["response.created", "response.in_progress",
                     "response.output_item.added", "response.content_part.added",
                     *["response.output_text.delta"] * 3, "response.output_text.done",
                     "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert [d["sequence_number"] for _, d in got] == list(range(len(got)))
    assert all(d["type"] == n for n, d in got)
    assert "".join(d["delta"] for n, d in got if n.endswith(".delta")) == output_text(3)
    final = got[-1][1]["response"]
    assert final["usage"]["input_tokens"] == PROMPT and final["usage"]["output_tokens"] == 3
    assert got[0][1]["response"]["usage"] is None


async def test_a_cut_stream_ends_without_completed(sim: Sim) -> None:
    async with sim.http.post(sim.url + "/v1/responses", headers={"x-sim-cut-after": "2"},
                             json={"model": "tiny-llama", "input": "hi", "stream": True,
                                   "max_output_tokens": 9}) as r:
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async for data in r.content.iter_any():
                received += data
    text = received.decode()
    assert text.count("response.output_text.delta\n") == 2
    assert "response.completed" not in text


async def test_no_limit_generates_what_the_context_leaves(sim: Sim) -> None:
    _, body = await post(sim, {"model": "tiny-llama", "input": "Hello, world!"})
    assert body["usage"]["output_tokens"] == sim.state.max_model_len - PROMPT


def test_items_render_as_vllm_chat_messages() -> None:
    body = {"instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "2+2?"}]},
        {"type": "function_call", "call_id": "c1", "name": "add", "namespace": "m",
         "arguments": '{"a": 2}'},
        {"type": "function_call_output", "call_id": "c1", "output": "4"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "sum"}]},
    ], "tools": [{"type": "function", "name": "add", "parameters": {}}],
        "tool_choice": "auto", "reasoning": {"effort": "low"}}
    assert messages(body) == [
        {"role": "system", "content": "Be brief."},
        body["input"][0],  # type: ignore[index]
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "m__add", "arguments": '{"a": 2}'}}]},
        {"role": "tool", "content": "4", "tool_call_id": "c1"},
        {"role": "assistant", "reasoning": "sum"},
    ]
    fields = template_fields(body)
    assert fields["tools"] == [{"type": "function", "function": {
        "name": "add", "description": None, "parameters": {}}}]
    assert (fields["tool_choice"], fields["reasoning_effort"]) == ("auto", "low")


async def test_prompt_counts_the_rendered_chat(sim: Sim) -> None:
    body = {"model": "tiny-llama", "instructions": "Be brief.", "max_output_tokens": 1,
            "input": [{"type": "function_call_output", "call_id": "c", "output": "4"}]}
    _, got = await post(sim, body)
    assert got["usage"]["input_tokens"] == prompt_tokens_chat(messages(body),
                                                              template_fields(body))


@pytest.mark.parametrize(("body", "status"), [
    ({"model": "nope", "input": "x"}, 404),
    ({"model": "tiny-llama"}, 400),
    ({"model": "tiny-llama", "input": [{"type": "item_reference", "id": "x"}]}, 400),
    ({"model": "tiny-llama", "input": "x", "previous_response_id": "resp_1"}, 404),
    ({"model": "tiny-llama", "input": "x", "max_output_tokens": 10**6}, 400),
])
async def test_errors(sim: Sim, body: dict[str, Any], status: int) -> None:
    got, err = await post(sim, body)
    assert got == status and list(err) == ["error"] and err["error"]["code"] == status


async def test_openai_sdk_reads_responses_and_their_streams(sim: Sim) -> None:
    async with openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="x",
                                  max_retries=0) as client:
        resp = await client.responses.create(model="tiny-llama", input="Hello, world!",
                                             max_output_tokens=4)
        assert resp.output_text == output_text(4)
        assert resp.usage is not None and resp.usage.input_tokens == PROMPT
        stream = await client.responses.create(model="tiny-llama", input="Hello, world!",
                                               max_output_tokens=4, stream=True)
        got = [e async for e in stream]
    assert got[-1].type == "response.completed"
    assert got[-1].response.usage is not None
    assert got[-1].response.usage.output_tokens == 4
    assert "".join(e.delta for e in got if e.type == "response.output_text.delta") == (
        output_text(4))


async def test_openai_sdk_reads_embeddings(sim: Sim) -> None:
    async with openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="x",
                                  max_retries=0) as client:
        # The SDK asks for base64 and decodes it itself.
        emb = await client.embeddings.create(model="tiny-llama", input=["a b", "c"])
    assert [len(d.embedding) for d in emb.data] == [16, 16]
    assert emb.usage.prompt_tokens == 3 and emb.usage.total_tokens == 3


@pytest.mark.parametrize(("body", "error"), [
    ({"input": []}, {"message": "Cannot apply chat template to an empty conversation. "
                                "Provide at least one message.", "param": None}),
    ({"input": "x", "temperature": -1},
     {"message": "temperature must be non-negative, got -1.0. (parameter=temperature, "
                 "value=-1.0)", "param": "temperature"}),
    ({"input": "x", "max_output_tokens": 0},
     {"message": "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
      "param": "max_tokens"}),
])
async def test_vllms_400s(sim: Sim, body: dict[str, Any], error: dict[str, Any]) -> None:
    """vLLM 0.32 refuses an empty conversation, a negative temperature and no output."""
    got, err = await post(sim, {"model": "tiny-llama", **body})
    assert (got, err) == (400, {"error": {"message": error["message"],
                                          "type": "BadRequestError",
                                          "param": error["param"], "code": 400}})
    # Instructions alone make a conversation.
    got, _ = await post(sim, {"model": "tiny-llama", "input": [], "instructions": "Hi.",
                              "max_output_tokens": 1})
    assert got == 200


async def test_a_prompt_filling_the_context_leaves_no_output() -> None:
    """vLLM 0.32 clips max_output_tokens to what the prompt leaves; a prompt of exactly
    the context length is its Responses server's own 400 (probed: 512 of 512)."""
    body = {"model": "m", "input": "x"}
    context = prompt_tokens_chat(messages(body), template_fields(body))
    app = make_app(["m"], max_model_len=context)
    runner, port = await serve(app)
    try:
        async with aiohttp.ClientSession() as http:
            sim = Sim(f"http://127.0.0.1:{port}", port, http, app[SIMULATOR_KEY])
            got, err = await post(sim, body)
            assert (got, err) == (400, {"error": {
                "message": f"The engine prompt length {context} exceeds the max_model_len "
                           f"{context}. Please reduce prompt.",
                "type": "invalid_request_error", "param": "input", "code": 400}})
    finally:
        await runner.cleanup()
