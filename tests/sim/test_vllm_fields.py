"""The fields that change usage, as vLLM 0.32 honours them: n, best_of (ignored), batched
prompts, the prompt-bearing chat fields, no hidden output cap, and a max_tokens clipped to
what the context leaves (each pinned against real vLLM 0.32 by tests/vllm)."""

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


@pytest.mark.parametrize("extra", [{"n": 2, "best_of": 5}, {"n": 3, "best_of": 2},
                                   {"n": 2, "best_of": 4, "stream": True,
                                    "stream_options": {"include_usage": True}}])
async def test_best_of_is_ignored(sim: Sim, extra: dict[str, Any]) -> None:
    """vLLM 0.32 ignores best_of: n sequences generated and counted, streaming or not, and
    best_of below n is no error (the V0 engine generated best_of and refused it when
    streaming)."""
    body = {"model": "tiny-llama", "prompt": "x", "max_tokens": 3, **extra}
    if extra.get("stream"):
        chunks = parse(await stream_events(sim, COMPLETIONS, body))
        assert {c["choices"][0]["index"] for c in chunks if c["choices"]} == {0, 1}
        usage = chunks[-1]["usage"]
    else:
        status, got = await post(sim, COMPLETIONS, body)
        assert status == 200 and len(got["choices"]) == extra["n"]
        usage = got["usage"]
    assert usage["completion_tokens"] == 3 * extra["n"]
    labels = {"model_name": "tiny-llama"}
    registry = sim.state.metrics.registry
    assert registry.get_sample_value("vllm:generation_tokens_total", labels) == 3 * extra["n"]


@pytest.mark.parametrize(
    ("extra", "param", "needle"),
    [
        ({"n": 0}, None, "n must be at least 1, got 0."),
        ({"n": "two"}, "body.n", "valid integer"),
        ({"best_of": 2.5}, "body.best_of", "valid integer"),
        ({"n": 2, "temperature": 0}, None, "n must be 1 when using greedy sampling, got 2."),
        ({"n": 2, "temperature": 0.0, "stream": True}, None,
         "n must be 1 when using greedy sampling, got 2."),
        ({"suffix": 5}, "body.suffix", "valid string"),
    ],
)
async def test_n_and_best_of_errors(sim: Sim, extra: dict[str, Any], param: str | None,
                                    needle: str) -> None:
    for path, prompt in ((COMPLETIONS, {"prompt": "x"}), (CHAT, {"messages": MESSAGES})):
        if path == CHAT and "suffix" in extra:
            continue
        status, got = await post(sim, path, {"model": "tiny-llama", **prompt, **extra})
        assert status == 400 and got["error"]["param"] == param
        assert needle in got["error"]["message"]


async def test_n_above_one_samples_at_any_temperature_above_greedy(sim: Sim) -> None:
    """vLLM's greedy threshold is 1e-5: n > 1 just above it, or n = 1 at 0, is fine."""
    for extra in ({"n": 2, "temperature": 1e-4}, {"n": 1, "temperature": 0},
                  {"n": 2, "best_of": 3, "temperature": 0.7}):
        status, got = await post(sim, COMPLETIONS, {"model": "tiny-llama", "prompt": "x",
                                                    "max_tokens": 1, **extra})
        assert status == 200 and len(got["choices"]) == extra["n"]


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
        assert status == 400 and got["error"]["param"] == "input_tokens"
        assert "maximum context length is 40 tokens" in got["error"]["message"]
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


async def post_raw(sim: Sim, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """The status and the JSON body, or a stream's `data:` payloads."""
    async with sim.http.post(sim.url + path, json=body) as resp:
        if resp.status != 200 or not body.get("stream"):
            return resp.status, await resp.json()
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        text = await resp.text()
    return 200, [e.removeprefix("data: ") for e in text[:-2].split("\n\n")]


async def _usage(sim: Sim, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """A request's status and usage, from its JSON or its stream's usage chunk; with the
    finish reasons and token counts of its choices."""
    status, got = await post_raw(sim, path, body)
    if status != 200:
        return status, got
    if not body.get("stream"):
        texts = [c["message"]["content"] if path == CHAT else c["text"]
                 for c in got["choices"]]
        return status, (got["usage"], [c["finish_reason"] for c in got["choices"]],
                        [count_tokens(t) for t in texts])
    chunks = parse(got)
    finish: dict[int, str] = {}
    tokens: dict[int, int] = {}
    for c in chunks:
        for ch in c["choices"]:
            text = ch["delta"].get("content") if path == CHAT else ch["text"]
            tokens[ch["index"]] = tokens.get(ch["index"], 0) + count_tokens(text or "")
            if ch["finish_reason"]:
                finish[ch["index"]] = ch["finish_reason"]
    return 200, (chunks[-1]["usage"], [finish[i] for i in sorted(finish)],
                 [tokens[i] for i in sorted(tokens)])


@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_past_the_context_is_clipped(stream: bool) -> None:
    """vLLM 0.32: max_tokens up to the context length is clipped to what each prompt
    leaves (200, finish_reason "length", usage of what was generated), chat or
    completions, streamed or not; above the context length it is a 400 naming the field;
    a prompt longer than the context is a 400 naming input_tokens, and one that fills it
    leaves max_tokens 0, a 400."""
    extra: dict[str, Any] = ({"stream": True, "stream_options": {"include_usage": True}}
                             if stream else {})
    ctx = 40
    async with running(make_app(["m"], max_model_len=ctx)) as sim:
        chat = {"model": "m", "messages": MESSAGES, **extra}
        for field in ("max_tokens", "max_completion_tokens"):
            status, got = await _usage(sim, CHAT, {**chat, field: ctx})
            left = ctx - CHAT_PROMPT_TOKENS
            assert status == 200 and got == ({"prompt_tokens": CHAT_PROMPT_TOKENS,
                                              "total_tokens": ctx, "completion_tokens": left},
                                             ["length"], [left])
            status, got = await _usage(sim, CHAT, {**chat, field: ctx + 1})
            assert status == 400 and got["error"]["param"] == field
            assert got["error"]["message"] == (
                f"{field}={ctx + 1} cannot be greater than max_model_len={ctx}. Please "
                f"request fewer output tokens. (parameter={field}, value={ctx + 1})")
        # A batch: each prompt clipped apart (2 and 5 prompt tokens here).
        body = {"model": "m", "prompt": ["a b", "c d e f g"], "max_tokens": 36, "n": 2, **extra}
        status, got = await _usage(sim, COMPLETIONS, body)
        assert status == 200 and got == ({"prompt_tokens": 7, "total_tokens": 7 + 2 * (36 + 35),
                                          "completion_tokens": 2 * (36 + 35)},
                                         ["length"] * 4, [36, 36, 35, 35])
        for prompt, param in (([1] * ctx, "max_tokens"), ([1] * (ctx + 1), "input_tokens")):
            status, got = await _usage(sim, COMPLETIONS, {"model": "m", "prompt": prompt,
                                                          **extra})
            assert status == 400 and got["error"]["param"] == param
        assert registry_tokens(sim) == 2 * (ctx - CHAT_PROMPT_TOKENS) + 2 * (36 + 35)


def registry_tokens(sim: Sim) -> float | None:
    return sim.state.metrics.registry.get_sample_value("vllm:generation_tokens_total",
                                                       {"model_name": "m"})


@pytest.mark.parametrize(("path", "extra", "param", "message"), [
    (CHAT, {"messages": []}, None,
     "Cannot apply chat template to an empty conversation. Provide at least one message."),
    (COMPLETIONS, {"prompt": ""}, "prompt",
     "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)"),
    (COMPLETIONS, {"prompt": []}, None, "You must pass at least one prompt"),
    (COMPLETIONS, {"prompt": [[]]}, None, "The decoder prompt cannot be empty"),
    (COMPLETIONS, {"prompt": ["a", ""]}, None, "The decoder prompt cannot be empty"),
    (COMPLETIONS, {"prompt": "a", "temperature": -1}, "temperature",
     "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)"),
])
async def test_empty_input_and_bad_sampling_are_vllms_400s(
        sim: Sim, path: str, extra: dict[str, Any], param: str | None, message: str) -> None:
    """vLLM 0.32's answers to nothing to generate from, and to a negative temperature."""
    status, got = await post(sim, path, {"model": "tiny-llama", **extra})
    assert status == 400 and got == {"error": {"message": message, "type": "BadRequestError",
                                               "param": param, "code": 400}}


async def test_fields_are_read_in_pydantics_lax_mode(sim: Sim) -> None:
    """vLLM's request models coerce: "2" and 2.0 are 2, true is 1, "true"/"yes" are True,
    "0" is a temperature of 0. A fractional count or an unreadable string is a 400."""
    body = {"model": "tiny-llama", "prompt": "x", "max_tokens": 2.0, "n": "2",
            "stream": "true", "stream_options": {"include_usage": "yes"}}
    chunks = parse(await stream_events(sim, COMPLETIONS, body))
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    status, got = await post(sim, COMPLETIONS, {**body, "stream": False, "max_tokens": True,
                                                "stream_options": None})
    assert status == 200 and got["usage"]["completion_tokens"] == 2
    status, got = await post(sim, COMPLETIONS, {**body, "temperature": "0"})
    assert status == 400 and "greedy sampling" in got["error"]["message"]
    for field, value, kind in (("max_tokens", 2.5, "int_from_float"),
                               ("n", "two", "int_parsing"), ("stream", "maybe", "bool_parsing"),
                               ("temperature", "hot", "float_parsing")):
        status, got = await post(sim, COMPLETIONS, {**body, field: value})
        assert status == 400 and got["error"]["param"] == f"body.{field}"
        assert f"'type': '{kind}'" in got["error"]["message"]
