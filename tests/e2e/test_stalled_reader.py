"""A client that stops reading a stream, then leaves, through the real Envoy, in front of
a backend that generates as vLLM does: on, at its own pace, whether or not anyone reads
(vLLM merges the steps it could not send into its next chunk). Envoy stops reading the
backend once the client's side is full, so the chunks the gateway saw carry a fraction
of what was generated (real vLLM: 2,169 of 7,168 tokens). Such a cut is charged the
pause at the stream's pace (policy/stream_pace.py): never less than the backend made. A
client that read until it left is charged what it read."""

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
MAX_TOKENS = 3000
# Each token's logprobs entry, padded as 20 top_logprobs make it: 8 KB a token, so the
# stream (24 MB) is past every buffer between the backend and the client.
ENTRY = {"token": "x", "logprob": -1.0, "bytes": [120],
         "top_logprobs": [{"token": "y" * 380, "logprob": -2.0}] * 20}
STEP_S = 0.002


class Eager(ThreadedBackend):
    """Chat streams generated at STEP_S a token however fast they are read: tokens made
    while the last write waited are merged into the next chunk, as vLLM's collector does.
    `generated`: tokens made per request (x-test-id), up to its abort."""

    def __init__(self) -> None:
        self.generated: dict[str, int] = {}
        super().__init__()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        rid, limit = request.headers["x-test-id"], int(body["max_tokens"])
        step_s = float(request.headers.get("x-test-step-s", STEP_S))
        self.generated[rid] = 0
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        async def generate() -> None:
            while self.generated[rid] < limit:
                await asyncio.sleep(step_s)
                self.generated[rid] += 1

        gen = asyncio.create_task(generate())
        sent = 0
        try:
            while sent < limit:
                made = self.generated[rid]
                if made == sent:
                    await asyncio.sleep(step_s / 2)
                    continue
                chunk = {"choices": [{"index": 0, "delta": {"content": "x" * (made - sent)},
                                      "logprobs": {"content": [ENTRY] * (made - sent)}}]}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                sent = made
            usage = {"prompt_tokens": 5, "completion_tokens": limit, "total_tokens": limit + 5}
            await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode()
                             + b"\n\ndata: [DONE]\n\n")
        finally:
            gen.cancel()  # the client left: vLLM aborts the request
        return resp


@pytest.fixture(scope="module")
def backend() -> Iterator[Eager]:
    b = Eager()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, backend: Eager) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("stalled"),
                     upstream=f"http://127.0.0.1:{backend.port}",
                     demo={"max_tokens": MAX_TOKENS}) as g:
        yield g


def stream_and_leave(gw: Gateway, test_id: str, read_bytes: int, pause_s: float,
                     step_s: float = STEP_S) -> tuple[str, int]:
    """Ask for a stream over a socket with a small receive buffer; read `read_bytes` as
    they come, then wait `pause_s` without reading, and close. The request id and the
    bytes read."""
    host, port = gw.base_url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": MAX_TOKENS, "stream": True, "logprobs": True,
                       "top_logprobs": 20}).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
              b"Authorization: Bearer " + SECRET.encode() + b"\r\n"
              b"Content-Type: application/json\r\nx-test-id: " + test_id.encode() + b"\r\n"
              b"x-test-step-s: " + str(step_s).encode() + b"\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while len(got) < read_bytes:
        piece = s.recv(65536)
        assert piece, got[:300]
        got += piece
    time.sleep(pause_s)
    s.close()
    head = got.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("HTTP/1.1 200"), head
    rid = next(line.split(":", 1)[1].strip() for line in head.split("\r\n")
               if line.lower().startswith("x-request-id:"))
    return rid, len(got)


def record(gw: Gateway, rid: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while not (recs := records_for(gw, rid)) and time.monotonic() < deadline:
        pass
    [rec] = recs
    return rec


@pytest.mark.parametrize("meter", ["ext_proc", "envoy"])
def test_a_reader_that_pauses_then_leaves_is_charged_what_the_backend_made(
        request: pytest.FixtureRequest, backend: Eager, meter: str) -> None:
    """Metered in Envoy (`stream_metering: envoy`), the same client paid a fraction of
    what was generated (streams tester): Envoy's report carried no time but the first
    text's, so the silence before the cut went uncharged. Its last text's time and the
    stream's end come in the report now, and the silence is charged at its pace."""
    gw: Gateway = request.getfixturevalue("gw" if meter == "ext_proc" else "gw_envoy")
    rid, got = stream_and_leave(gw, f"stall-{meter}", read_bytes=50_000, pause_s=3.5)
    rec = record(gw, rid)
    made = backend.generated[f"stall-{meter}"]
    # The backend made far more than the client read (or the gateway saw): 467 of 3,000
    # were charged before the pause counted.
    assert made > 20 * got // len(json.dumps(ENTRY))
    assert (rec["status"], rec["estimated"]) == (499, True)
    assert made <= rec["completion_tokens"] <= MAX_TOKENS


def test_a_reader_that_reads_until_it_leaves_is_charged_what_it_read(
        gw: Gateway, backend: Eager) -> None:
    """At a pace the gateway keeps up with, no chunk merges steps and none pauses."""
    rid, got = stream_and_leave(gw, "steady", read_bytes=400_000, pause_s=0, step_s=0.02)
    rec = record(gw, rid)
    assert (rec["status"], rec["estimated"]) == (499, True)
    tokens = got // len(json.dumps(ENTRY))
    # (vLLM steps on until its abort lands, where this backend stops at once.)
    assert tokens // 2 <= rec["completion_tokens"] <= \
        backend.generated["steady"] + ABORT_STEPS
    assert backend.generated["steady"] < MAX_TOKENS


@pytest.fixture(scope="module")
def gw_envoy(tmp_path_factory: pytest.TempPathFactory, backend: Eager) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("stalled-envoy"),
                     upstream=f"http://127.0.0.1:{backend.port}",
                     demo={"max_tokens": MAX_TOKENS},
                     envoy={"stream_metering": "envoy"}) as g:
        yield g

