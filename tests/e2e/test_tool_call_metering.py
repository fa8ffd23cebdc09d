"""Three ways generated tokens went unmetered, through the whole gateway, with each stream
meter (ext_proc's Python meter and Envoy's Lua meter) fed the same events:

- a chat stream whose output is tool calls, cut before its usage chunk, is estimated
  from the tool calls' name and argument events (it was charged 0 completion tokens);
- a real vLLM stream whose tokens end inside UTF-8 characters (their chunks' text is
  empty), cut before its usage chunk, counts those chunks too (it was charged half);
- a backend that compresses what it may (ordinary content negotiation) gets
  `accept-encoding: identity` whatever the client sent, so its answers arrive readable
  and are metered exactly (a gzipped answer's usage was unreadable: an estimate).
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from policy.stream_pace import ABORT_STEPS
from tests.e2e.conftest import Gateway, run_gateway
from tests.e2e.fake_backend import ThreadedBackend
from tests.e2e.test_gateway import records_for
from tests.helpers import SECRET
from tests.policy.test_stream_usage_tool_calls import USAGE, responses_tool_call, tool_call_stream
from tests.policy.test_vllm_streams import STREAMS, usage_event

pytestmark = pytest.mark.e2e
UTF8_STREAM = STREAMS["vllm_completion_utf8_stream"]
UTF8_USAGE_EVENT, UTF8_USAGE = usage_event(UTF8_STREAM)
# The recording up to its usage chunk, event by event.
UTF8_EVENTS = [e + b"\n\n" for e in
               UTF8_STREAM[:UTF8_STREAM.index(UTF8_USAGE_EVENT)].split(b"\n\n") if e]
JSON_USAGE = {"prompt_tokens": 5, "completion_tokens": 40, "total_tokens": 45}


class ToolCallUpstream(ThreadedBackend):
    """A vLLM-shaped backend: /v1/chat/completions streams `tool_call_stream()` (without
    its usage chunk and [DONE], connection dropped, when the request has `x-cut`),
    /v1/responses a function call cut before its end, /v1/completions a JSON answer (with
    `stream`, the recorded vLLM stream with empty-text tokens, cut before its usage).
    Every answer is compressed when the request's Accept-Encoding allows it (aiohttp's
    negotiation), and the Accept-Encoding each request arrived with is kept by its
    x-request-id."""

    def __init__(self) -> None:
        self.accept_encoding: dict[str, str | None] = {}
        super().__init__()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/completions", self._completions)

    def _seen(self, request: web.Request) -> None:
        self.accept_encoding[request.headers.get("x-request-id", "")] = \
            request.headers.get("accept-encoding")

    async def _stream(self, request: web.Request, events: list[bytes],
                      cut: bool) -> web.StreamResponse:
        self._seen(request)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        resp.enable_compression()
        await resp.prepare(request)
        for ev in events:
            await resp.write(ev)
            await asyncio.sleep(0.002)
        if cut:
            await asyncio.sleep(0.05)  # let the last event out before the drop
            if request.transport is not None:
                request.transport.close()
            return resp
        await resp.write_eof()
        return resp

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        events, tail, _ = tool_call_stream()
        cut = "x-cut" in request.headers
        return await self._stream(request, events if cut else [*events, *tail], cut)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, responses_tool_call(name=True), cut=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        if (await request.json()).get("stream"):
            return await self._stream(request, UTF8_EVENTS, cut=True)
        self._seen(request)
        n = JSON_USAGE["completion_tokens"]
        resp = web.json_response({
            "id": "cmpl-x", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": " tok" * n, "logprobs": None,
                         "finish_reason": "length", "stop_reason": None}],
            "usage": JSON_USAGE})
        resp.enable_compression()
        return resp


@pytest.fixture(scope="module")
def upstream() -> Iterator[ToolCallUpstream]:
    up = ToolCallUpstream()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture(scope="module", params=["ext_proc", "envoy"])
def gw(request: pytest.FixtureRequest, upstream: ToolCallUpstream,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway to the backend above, streams metered by ext_proc or by Envoy."""
    with run_gateway(tmp_path_factory.mktemp(f"gw-tools-{request.param}"),
                     upstream=f"http://127.0.0.1:{upstream.port}",
                     envoy={"stream_metering": request.param}) as g:
        yield g


def _post(gw: Gateway, path: str, body: dict[str, Any],
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        f"{gw.base_url}{path}", data=json.dumps(body).encode(),
        headers={"authorization": f"Bearer {SECRET}", "content-type": "application/json",
                 **(headers or {})})
    with urllib.request.urlopen(req, timeout=30) as r:
        got = b""
        try:
            while part := r.read1(65536):
                got += part
        except (http.client.HTTPException, OSError):
            pass  # a stream cut by the backend
        return r.status, dict(r.headers.items()), got


CHAT = {"model": "demo", "messages": [{"role": "user", "content": "weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
                                                    "parameters": {"type": "object"}}}],
        "max_tokens": 64, "stream": True}


def test_a_tool_call_stream_cut_before_its_usage_is_charged_what_it_could_generate(
        gw: Gateway) -> None:
    """A tool parser holds back the call it is parsing (real vLLM, cut mid-way with
    `tool_choice: required`: 143 of 580 generated tokens shown): a cut stream of a body
    with tools is charged its completion bound, not its calls' chunks."""
    events, _, from_calls = tool_call_stream()
    status, headers, got = _post(gw, "/v1/chat/completions", CHAT, {"x-cut": "1"})
    assert status == 200
    assert got == b"".join(events)  # everything generated reached the client
    [rec] = records_for(gw, headers["x-request-id"])
    assert (rec["completion_tokens"], rec["estimated"]) == (CHAT["max_tokens"], True), rec
    assert from_calls < CHAT["max_tokens"]


def test_a_whole_tool_call_stream_is_exact(gw: Gateway) -> None:
    events, tail, _ = tool_call_stream()
    status, headers, got = _post(gw, "/v1/chat/completions", CHAT)
    assert status == 200
    assert got == b"".join([*events, tail[1]])  # the usage chunk the gateway asked for: hidden
    [rec] = records_for(gw, headers["x-request-id"])
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"]) == (
        USAGE["prompt_tokens"], USAGE["completion_tokens"], False), rec


def test_a_cut_vllm_stream_counts_its_empty_text_tokens(gw: Gateway) -> None:
    assert sum(b'"text":""' in e for e in UTF8_EVENTS) >= 10  # what this test is about
    body = {"model": "demo", "prompt": "hi", "max_tokens": 24, "stream": True}
    status, headers, got = _post(gw, "/v1/completions", body)
    assert status == 200
    assert got == b"".join(UTF8_EVENTS)
    [rec] = records_for(gw, headers["x-request-id"])
    # One chunk per token: vLLM's count, which the cut stream never sent.
    assert (rec["completion_tokens"], rec["estimated"]) == (
        UTF8_USAGE["completion_tokens"], True), rec


def test_a_responses_function_call_cut_before_its_end_is_estimated(gw: Gateway) -> None:
    body = {"model": "demo", "input": "weather in Paris?", "max_output_tokens": 64,
            "stream": True}
    status, headers, got = _post(gw, "/v1/responses", body)
    assert status == 200
    assert got == b"".join(responses_tool_call(name=True))
    [rec] = records_for(gw, headers["x-request-id"])
    # The text delta, the call's opening event (its name), three argument deltas; and the
    # 50 ms before the drop at the stream's pace (too short a flow to measure one: the
    # whole stream's, silence included, so at most twice what was seen).
    assert rec["estimated"] and 5 <= rec["completion_tokens"] <= 3 * 5 + ABORT_STEPS, rec


@pytest.mark.parametrize("accept", ["gzip", "deflate", "gzip, deflate, br", "identity"])
def test_the_backend_never_compresses_and_usage_is_exact(
        gw: Gateway, upstream: ToolCallUpstream, accept: str) -> None:
    extra = {"accept-encoding": accept}
    body = {"model": "demo", "prompt": "hi", "max_tokens": 64}
    status, headers, got = _post(gw, "/v1/completions", body, extra)
    assert status == 200
    assert "content-encoding" not in {k.lower() for k in headers}
    assert json.loads(got)["usage"] == JSON_USAGE
    rid = headers["x-request-id"]
    assert upstream.accept_encoding[rid] == "identity"
    [rec] = records_for(gw, rid)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"]) == (5, 40, False)
    # A stream, metered by either meter, the same.
    status, headers, got = _post(gw, "/v1/chat/completions", CHAT, extra)
    assert status == 200 and got.startswith(b"data: ")
    rid = headers["x-request-id"]
    assert upstream.accept_encoding[rid] == "identity"
    [rec] = records_for(gw, rid)
    assert (rec["completion_tokens"], rec["estimated"]) == (USAGE["completion_tokens"], False)


def test_the_backend_compresses_when_allowed(upstream: ToolCallUpstream) -> None:
    """The test above means something: asked directly with gzip allowed, the backend
    compresses."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{upstream.port}/v1/completions", data=b"{}",
        headers={"accept-encoding": "gzip", "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["content-encoding"] == "gzip"
        assert json.loads(gzip.decompress(r.read()))["usage"] == JSON_USAGE
