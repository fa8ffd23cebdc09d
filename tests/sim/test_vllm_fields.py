"""The fields that change usage, as vLLM honours them: n, best_of, batched prompts, the
prompt-bearing chat fields, and no hidden output cap."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from authz.sim import make_app
from authz.sim.app import SIMULATOR_KEY
from authz.sim.tokens import count_tokens, output_text, prompt_tokens_chat, tojson

from .conftest import Sim, serve
from .test_sim import CHAT, CHAT_PROMPT_TOKENS, COMPLETIONS, MESSAGES, parse, post, stream_events


async def test_chat_n_choices_and_summed_usage(sim: Sim) -> None:
    _, body = await post(sim, CHAT, {"model": "tiny-llama", "messages": MESSAGES,
                                     "max_tokens": 3, "n": 4})
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert {c["message"]["content"] for c in body["choices"]} == {output_text(3)}
    assert body["usage"] == {"prompt_tokens": CHAT_PROMPT_TOKENS,
                             "total_tokens": CHAT_PROMPT_TOKENS + 12, "completion_tokens": 12}


async def test_completions_batch_times_n(sim: Sim) -> None:
    body = {"model": "tiny-llama", "prompt": ["a b", "c d e", "f"], "max_tokens": 2, "n": 2}
    _, got = await post(sim, COMPLETIONS, body)
    # One choice per prompt x n, in prompt order; prompt tokens summed once per prompt.
    assert [c["index"] for c in got["choices"]] == list(range(6))
    assert got["usage"] == {"prompt_tokens": 6, "total_tokens": 6 + 12,
                            "completion_tokens": 12}
    _, got = await post(sim, COMPLETIONS, {"model": "tiny-llama", "prompt": [[1, 2], [3]],
                                           "max_tokens": 1, "suffix": "x y"})
    assert got["usage"]["prompt_tokens"] == 3 + 2 + 2


async def test_best_of_generates_more_than_it_returns(sim: Sim) -> None:
    body = {"model": "tiny-llama", "prompt": "x", "max_tokens": 3, "n": 2, "best_of": 5}
    _, got = await post(sim, COMPLETIONS, body)
    assert len(got["choices"]) == 2
    assert got["usage"]["completion_tokens"] == 15  # every generated sequence
    labels = {"model_name": "tiny-llama"}
    registry = sim.state.metrics.registry
    assert registry.get_sample_value("vllm:generation_tokens_total", labels) == 15


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"n": 0}, "n must be at least 1"),
        ({"n": "2"}, "valid integer"),
        ({"n": 3, "best_of": 2}, "best_of must be greater than or equal to n"),
        ({"best_of": 2, "stream": True}, "best_of must equal n when streaming"),
        ({"suffix": 5}, "valid string"),
    ],
)
async def test_n_and_best_of_errors(sim: Sim, extra: dict[str, Any], needle: str) -> None:
    status, got = await post(sim, COMPLETIONS, {"model": "tiny-llama", "prompt": "x", **extra})
    assert status == 400 and needle in got["message"]


async def test_chat_stream_with_n_choices(sim: Sim) -> None:
    events = await stream_events(sim, CHAT, {
        "model": "tiny-llama", "messages": MESSAGES, "max_tokens": 2, "n": 3, "stream": True,
        "stream_options": {"include_usage": True}})
    chunks = parse(events)
    roles, tokens, usage = chunks[:3], chunks[3:-1], chunks[-1]
    assert [c["choices"][0]["index"] for c in roles] == [0, 1, 2]
    assert all(c["choices"][0]["delta"]["role"] == "assistant" for c in roles)
    assert [c["choices"][0]["index"] for c in tokens] == [0, 1, 2, 0, 1, 2]
    for i in range(3):
        mine = [c["choices"][0] for c in tokens if c["choices"][0]["index"] == i]
        assert "".join(c["delta"]["content"] for c in mine) == output_text(2)
        assert [c["finish_reason"] for c in mine] == [None, "length"]
    assert usage["usage"]["completion_tokens"] == 6
    assert usage["usage"]["prompt_tokens"] == CHAT_PROMPT_TOKENS


async def test_completions_stream_batch_indexes_choices(sim: Sim) -> None:
    events = await stream_events(sim, COMPLETIONS, {
        "model": "tiny-llama", "prompt": ["a", "b"], "max_tokens": 1, "n": 2, "stream": True,
        "stream_options": {"include_usage": True}})
    chunks = parse(events)
    assert [c["choices"][0]["index"] for c in chunks[:-1]] == [0, 1, 2, 3]
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "total_tokens": 6,
                                   "completion_tokens": 4}


async def test_tools_and_tool_calls_count_into_the_prompt(sim: Sim) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages: list[dict[str, Any]] = [
        *MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    body = {"model": "tiny-llama", "messages": messages, "tools": tools, "max_tokens": 1}
    _, got = await post(sim, CHAT, body)
    expected = prompt_tokens_chat(messages, body)
    assert got["usage"]["prompt_tokens"] == expected
    assert expected > CHAT_PROMPT_TOKENS + count_tokens(tojson(tools))


@asynccontextmanager
async def running(app: web.Application) -> AsyncIterator[Sim]:
    runner, port = await serve(app)
    try:
        async with aiohttp.ClientSession() as http:
            yield Sim(f"http://127.0.0.1:{port}", port, http, app[SIMULATOR_KEY])
    finally:
        await runner.cleanup()


async def test_no_max_tokens_means_the_context_for_chat_and_16_for_completions() -> None:
    async with running(make_app(["m"], max_model_len=40)) as sim:
        _, got = await post(sim, CHAT, {"model": "m", "messages": MESSAGES})
        assert got["usage"]["completion_tokens"] == 40 - CHAT_PROMPT_TOKENS
        _, got = await post(sim, COMPLETIONS, {"model": "m", "prompt": "x"})
        assert got["usage"]["completion_tokens"] == 16
        status, got = await post(sim, CHAT, {"model": "m", "messages": [
            {"role": "user", "content": "w " * 50}]})
        assert status == 400 and "maximum context length" in got["message"]
    # A server default (vLLM's generation config) applies to chat only.
    async with running(make_app(["m"], default_max_tokens=5)) as sim:
        _, got = await post(sim, CHAT, {"model": "m", "messages": MESSAGES})
        assert got["usage"]["completion_tokens"] == 5
        _, got = await post(sim, COMPLETIONS, {"model": "m", "prompt": "x"})
        assert got["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
async def test_continuous_usage_counts_each_choice_apart(sim: Sim, path: str) -> None:
    """vLLM 0.32's continuous_usage_stats (only beside include_usage): every chunk carries
    the usage of its own choice so far (its prompt's tokens, its own tokens; chat adds
    completion_tokens_details), never the request's; the usage-only chunk stays last."""
    both = {"include_usage": True, "continuous_usage_stats": True}
    prompt: dict[str, Any] = ({"messages": MESSAGES} if path == CHAT
                              else {"prompt": ["a b", "c d e"]})
    body = {"model": "tiny-llama", **prompt, "max_tokens": 2, "n": 2, "stream": True}
    chunks = parse(await stream_events(sim, path, {**body, "stream_options": both}))
    prompts = [CHAT_PROMPT_TOKENS] * 2 if path == CHAT else [2, 2, 3, 3]
    *choice_chunks, last = chunks
    assert choice_chunks and all(c["choices"] for c in choice_chunks)
    seen: dict[int, int] = {}
    for c in choice_chunks:
        i = c["choices"][0]["index"]
        done = seen[i] = seen.get(i, -1 if "role" in c["choices"][0].get("delta", {}) else 0) + 1
        want: dict[str, Any] = {"prompt_tokens": prompts[i], "total_tokens": prompts[i] + done,
                                "completion_tokens": done}
        if path == CHAT:
            want["completion_tokens_details"] = None
        assert c["usage"] == want
    assert seen == dict.fromkeys(range(len(prompts)), 2)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 2 * len(prompts)
    # Without include_usage vLLM ignores it.
    only = parse(await stream_events(sim, path, {**body, "stream_options": {
        "continuous_usage_stats": True}}))
    assert all("usage" not in c for c in only)
