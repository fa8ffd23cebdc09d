"""A chunk that holds the steps vLLM merged while its reader paused, then a cut at once,
through the real Envoy with either meter. The client received that chunk's text, so the
record may never charge less than it carries (review: Envoy's meter counted the chunk as
one token, and a stream whose client read slowly and left paid 28 for ~136 it received).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from policy.stream_pace import ABORT_STEPS
from tests.e2e.conftest import Gateway, run_gateway
from tests.e2e.fake_backend import ThreadedBackend
from tests.e2e.test_gateway import records_for
from tests.helpers import SECRET

pytestmark = pytest.mark.e2e

WORD = "word "  # 5 ASCII characters: ~1.25 tokens as the meters reckon text
MERGED_WORDS = 100  # 500 characters: 125 tokens by the text rule


class Merging(ThreadedBackend):
    """Ten one-token chunks 50 ms apart, a 0.5 s pause, one chunk holding the steps
    merged meanwhile, one more token, then nothing (the client leaves)."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        async def send(text: str) -> None:
            chunk = {"id": "c", "object": "chat.completion.chunk", "model": "tiny-llama",
                     "choices": [{"index": 0, "delta": {"content": text},
                                  "logprobs": None, "finish_reason": None}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        if request.headers.get("x-first-merged"):  # the first chunk holds the steps
            await asyncio.sleep(0.5)
        else:
            for _ in range(10):
                await send(WORD)
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
        await send(WORD * MERGED_WORDS)
        await send("end")
        try:  # generating on, unread: the client leaves meanwhile (the write then fails)
            for _ in range(300):
                await asyncio.sleep(0.1)
                await resp.write(b": still here\n\n")
        except (ConnectionError, RuntimeError):
            pass
        return resp


@pytest.fixture(scope="module")
def backend() -> Iterator[Merging]:
    b = Merging()
    yield b
    b.stop()


def _gateway(tmp: Any, backend: Merging, meter: str) -> Any:
    return run_gateway(tmp, upstream=f"http://127.0.0.1:{backend.port}",
                       demo={"max_tokens": 1000}, envoy={"stream_metering": meter})


@pytest.fixture(scope="module")
def gw_ext_proc(tmp_path_factory: pytest.TempPathFactory,
                backend: Merging) -> Iterator[Gateway]:
    with _gateway(tmp_path_factory.mktemp("merged-ext"), backend, "ext_proc") as g:
        yield g


@pytest.fixture(scope="module")
def gw_envoy(tmp_path_factory: pytest.TempPathFactory, backend: Merging) -> Iterator[Gateway]:
    with _gateway(tmp_path_factory.mktemp("merged-envoy"), backend, "envoy") as g:
        yield g


def read_then_leave(gw: Gateway, events: int = 12, first_merged: bool = False) -> str:
    """Read the stream until its `events`-th event, then close at once; the request id."""
    host, port = gw.base_url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 1000, "stream": True}).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
              b"Authorization: Bearer " + SECRET.encode() + b"\r\n"
              b"Content-Type: application/json\r\n"
              + (b"x-first-merged: 1\r\n" if first_merged else b"")
              + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got, deadline = b"", time.monotonic() + 20
    while got.count(b'"content"') < events or not got.rstrip().endswith(b"}"):
        assert time.monotonic() < deadline, got[-300:]
        piece = s.recv(65536)
        assert piece, got[-300:]
        got += piece
    s.close()
    head = got.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("HTTP/1.1 200"), head
    return next(line.split(":", 1)[1].strip() for line in head.split("\r\n")
                if line.lower().startswith("x-request-id:"))


@pytest.mark.parametrize("meter", ["ext_proc", "envoy"])
def test_a_merged_chunk_the_client_received_is_charged(
        request: pytest.FixtureRequest, meter: str) -> None:
    gw: Gateway = request.getfixturevalue(f"gw_{meter}")
    rid = read_then_leave(gw)
    deadline = time.monotonic() + 15
    while not (recs := records_for(gw, rid)) and time.monotonic() < deadline:
        pass
    [rec] = recs
    received = 10 + MERGED_WORDS * len(WORD) // 4 + 1  # the chunks' tokens by text
    assert (rec["status"], rec["estimated"]) == (499, True)
    assert received <= rec["completion_tokens"] <= 1000
    if meter == "envoy":  # the chunks, the merged text past one chunk, the abort's steps
        # (and the few milliseconds between the last text and the cut, at its pace)
        least = 12 + (MERGED_WORDS * len(WORD) // 4 - 1) + ABORT_STEPS
        assert least <= rec["completion_tokens"] <= least + 8


@pytest.mark.parametrize("meter", ["ext_proc", "envoy"])
def test_a_first_chunk_holding_merged_steps_is_charged(
        request: pytest.FixtureRequest, meter: str) -> None:
    """Retest tester: Envoy's meter read a stream's first chunk only to measure the
    others by: one holding 125 tokens' text, the client leaving after it, paid 17."""
    gw: Gateway = request.getfixturevalue(f"gw_{meter}")
    rid = read_then_leave(gw, events=2, first_merged=True)
    deadline = time.monotonic() + 15
    while not (recs := records_for(gw, rid)) and time.monotonic() < deadline:
        pass
    [rec] = recs
    assert rec["status"] == 499
    assert MERGED_WORDS * len(WORD) // 4 + 1 <= rec["completion_tokens"] <= 1000
