"""Answers of megabytes through the real Envoy: a JSON answer (with logprobs, or a large
`n`) and one streamed event (a completions stream's first chunk with `echo`) larger than
the gRPC messages between Envoy and the services were allowed to be (1 MiB above the
request body limit). With `stream_metering: envoy` the JSON answer came to ext_proc as
one message (Envoy buffered it while the response headers' answer was on its way):
refused, and its record said 499, the whole hold. A streamed event the services send
back whole (the usage chunk the client did not ask for cut from it) was refused on its
way back: the client got the event's start cut off, then the usage chunk it never asked
for. Now both pass whole and are metered exactly (authz/runtime/server.py,
`grpc_message_limit`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.e2e.conftest import Gateway, run_gateway
from tests.e2e.fake_backend import ThreadedBackend
from tests.e2e.test_gateway import records_for
from tests.helpers import SECRET

pytestmark = pytest.mark.e2e
BIG = 3 << 20  # bytes of text in one answer
USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


def _event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def stream_events() -> list[bytes]:
    base = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    role = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}]}
    text = {**base, "choices": [{"index": 0, "delta": {"content": "x" * BIG},
                                 "logprobs": None, "finish_reason": None}]}
    end = {**base, "choices": [{"index": 0, "delta": {"content": "y"},
                                "logprobs": None, "finish_reason": "length"}]}
    usage = {**base, "choices": [], "usage": USAGE}
    return [_event(role), _event(text), *[_event(end)] * 3, _event(usage), b"data: [DONE]\n\n"]


class LargeAnswers(ThreadedBackend):
    """Chat completions answered with BIG bytes of text, as JSON or as one event."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if not (await request.json()).get("stream"):
            return web.json_response({
                "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "finish_reason": "length",
                             "message": {"role": "assistant", "content": "x" * BIG}}],
                "usage": USAGE})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for ev in stream_events():
            await resp.write(ev)
        await resp.write_eof()
        return resp


@pytest.fixture(scope="module")
def backend() -> Iterator[LargeAnswers]:
    b = LargeAnswers()
    yield b
    b.stop()


@pytest.fixture(scope="module", params=["ext_proc", "envoy"])
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
       backend: LargeAnswers) -> Iterator[Gateway]:
    root: Path = tmp_path_factory.mktemp(f"large-{request.param}")
    with run_gateway(root, upstream=f"http://127.0.0.1:{backend.port}",
                     envoy={"stream_metering": request.param}) as g:
        yield g


def _post(gw: Gateway, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{gw.base_url}/v1/chat/completions", timeout=60,
                      headers={"authorization": f"Bearer {SECRET}"},
                      json={"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 5, **body})


def test_a_json_answer_of_megabytes_is_whole_and_exact(gw: Gateway) -> None:
    r = _post(gw, {})
    assert r.status_code == 200
    assert len(r.json()["choices"][0]["message"]["content"]) == BIG
    [rec] = records_for(gw, r.headers["x-request-id"])
    assert (rec["status"], rec["prompt_tokens"], rec["completion_tokens"],
            rec["estimated"]) == (200, 7, 5, False), rec


@pytest.mark.parametrize("wants_usage", [False, True])
def test_an_event_of_megabytes_passes_whole_and_the_usage_chunk_as_asked(
        gw: Gateway, wants_usage: bool) -> None:
    events = stream_events()
    expected = b"".join(events if wants_usage else [*events[:-2], events[-1]])
    r = _post(gw, {"stream": True, **({"stream_options": {"include_usage": True}}
                                      if wants_usage else {})})
    assert r.status_code == 200
    assert r.content == expected
    [rec] = records_for(gw, r.headers["x-request-id"])
    assert (rec["status"], rec["prompt_tokens"], rec["completion_tokens"],
            rec["estimated"]) == (200, 7, 5, False), rec
