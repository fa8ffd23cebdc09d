"""A backend's small answer that is not a stream reaches ext_proc whole, in one message
(an upstream Lua filter on its cluster holds it until its end): through the real Envoy,
it costs one message fewer than its bytes and then an empty end. Every answer here goes
through two gateways on the same backend, one holding answers whole (as rendered) and one
letting them through as they come (`whole_answer_bytes: 0`, as before): for a success, a
backend's error, an answer past the size held whole and one without content-length, the
client gets the same status and bytes, and the record the same usage and cost. An answer
the backend cuts short never began for the router: the client gets the 502 of a backend
that failed before answering (it got a cut body before), recorded as such."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web

from authz.state.usage.records import USAGE_FILE
from policy.config import WHOLE_ANSWER_BYTES
from tests.e2e.conftest import Gateway, run_gateway
from tests.e2e.fake_backend import ThreadedBackend
from tests.e2e.test_gateway import records_for
from tests.helpers import SECRET

pytestmark = pytest.mark.e2e
CHAT: dict[str, Any] = {"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 7}
USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}


def answer(content: str) -> bytes:
    return json.dumps({
        "id": "c-1", "object": "chat.completion", "created": 1, "model": "tiny-llama",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": USAGE}).encode()


SMALL = answer("hi there")
# Past what is held whole: it flows in chunks, its usage still read at its end.
BIG = answer("x" * (WHOLE_ANSWER_BYTES + 4096))
ERROR = json.dumps({"object": "error", "message": "bad things", "type": "BadRequestError",
                    "param": None, "code": 400}).encode()


class Answers(ThreadedBackend):
    """Answers each chat request as its `x-answer` header says."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        how = request.headers["x-answer"]
        json_type = {"content-type": "application/json"}
        if how == "small":
            return web.Response(body=SMALL, headers=json_type)
        if how == "big":
            return web.Response(body=BIG, headers=json_type)
        if how == "error":
            return web.Response(status=400, body=ERROR, headers=json_type)
        resp = web.StreamResponse(headers=json_type)
        if how == "chunked":  # no content-length: not held whole
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(SMALL[:20])
            await resp.write(SMALL[20:])
            await resp.write_eof()
            return resp
        assert how == "cut"  # promises the whole answer, sends half of it, hangs up
        resp.content_length = len(SMALL)
        await resp.prepare(request)
        await resp.write(SMALL[: len(SMALL) // 2])
        assert request.transport is not None
        request.transport.close()
        return resp


@pytest.fixture(scope="module")
def backend() -> Iterator[Answers]:
    server = Answers()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory, backend: Answers) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("whole"),
                     upstream=f"http://127.0.0.1:{backend.port}") as g:
        yield g


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory, backend: Answers) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("split"),
                     upstream=f"http://127.0.0.1:{backend.port}",
                     envoy={"whole_answer_bytes": 0}) as g:
        yield g


def messages_sent(gw: Gateway) -> int:
    """ext_proc messages Envoy has sent so far."""
    admin = yaml.safe_load(gw.config_path.read_text())["envoy"]["admin_listen"]
    url = f"http://{admin}/stats?filter=ext_proc.stream_msgs_sent"
    with urllib.request.urlopen(url, timeout=5) as r:
        return sum(int(line.rsplit(":", 1)[1]) for line in r.read().decode().splitlines()
                   if line.strip())


def send(gw: Gateway, how: str) -> tuple[int, bytes, dict[str, Any], int]:
    """Status, body, record and ext_proc messages of one request answered `how`."""
    before = messages_sent(gw)
    try:
        r = httpx.post(f"{gw.base_url}/v1/chat/completions", json=CHAT, timeout=30,
                       headers={"authorization": f"Bearer {SECRET}", "x-answer": how})
        status, body, rid = r.status_code, r.content, r.headers["x-request-id"]
    except httpx.RemoteProtocolError:  # the cut answer: the client sees it cut too
        status, body, rid = -1, b"", last_request_id(gw)
    [rec] = records_for(gw, rid)
    time.sleep(0.1)  # Envoy counts the last message as it is sent
    return status, body, rec, messages_sent(gw) - before


def last_request_id(gw: Gateway) -> str:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = (gw.data_dir / USAGE_FILE).read_text().splitlines()
        if lines:
            rid: str = json.loads(lines[-1])["request_id"]
            return rid
        time.sleep(0.05)
    raise AssertionError("no record")


_SAME = ("status", "prompt_tokens", "completion_tokens", "estimated", "cost_usd", "model",
         "upstream_model", "stream")


@pytest.mark.parametrize("how", ["small", "error", "big", "chunked"])
def test_holding_an_answer_whole_changes_nothing_seen(whole: Gateway, split: Gateway,
                                                      how: str) -> None:
    got, before = send(whole, how), send(split, how)
    assert got[:2] == before[:2], (got[:2], before[:2])
    assert {k: got[2].get(k) for k in _SAME} == {k: before[2].get(k) for k in _SAME}
    if how == "error":
        assert got[0] == 400 and json.loads(got[1])["error"]["message"] == "bad things"
    else:
        assert got[0] == 200 and json.loads(got[1])["usage"] == USAGE
        assert (got[2]["completion_tokens"], got[2]["estimated"]) == (3, False)
    if how in ("small", "error"):  # held whole: one message fewer
        assert (got[3], before[3]) == (2, 3)
    else:  # as it comes (a chunked answer's pieces may arrive in one read or two)
        assert got[3] >= 3 and before[3] >= 3


def test_an_answer_cut_short_is_a_backend_that_failed_before_answering(
        whole: Gateway, split: Gateway) -> None:
    """Held whole, a cut answer never began: the client gets the contract's 502 (not a
    cut body its SDK cannot parse), and the record says 502. Charged its whole hold as
    before, when the client got half an answer: the backend had generated it."""
    status, body, rec, _ = send(whole, "cut")
    assert status == 502 and json.loads(body)["error"]["code"] == "upstream_error"
    status, _, before, _ = send(split, "cut")
    assert status == -1  # the client saw the body cut
    assert (rec["status"], before["status"]) == (502, 499)
    assert rec["backend"] and rec["estimated"] and before["estimated"]
    assert rec["completion_tokens"] == before["completion_tokens"] == CHAT["max_tokens"]
    assert rec["cost_usd"] == before["cost_usd"]
