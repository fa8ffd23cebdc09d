"""What OpenAI SDK clients do on the wire past the happy path, through the real Envoy,
`tokenbooth serve`, the simulator and a fake backend: their retries of the gateway's own
timeouts, the error bodies they leave unread, and what each attempt leaves in the records.

The Node SDK's behaviour is reproduced with the Python SDK or raw HTTP (no Node in the
suite): both retry 408, 409, 429 and >= 500 unless the answer says `x-should-retry:
false`; before a retry the Node SDK cancels the answer's body unread.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from authz.runtime.procs import wait_until
from authz.state.usage.records import USAGE_FILE, read_records
from policy.config import load_config
from tests.e2e.conftest import Gateway, run_gateway
from tests.e2e.fake_backend import ThreadedBackend
from tests.e2e.test_backend_credentials import model, sim_process
from tests.e2e.test_client_libraries import counted
from tests.e2e.test_gateway import MESSAGES, records_for
from tests.helpers import SECRET

pytestmark = pytest.mark.e2e
ROUTE_S = 1  # the route timeout: a non-streaming answer must be whole within it
HEADERS = {"authorization": f"Bearer {SECRET}", "content-type": "application/json"}


class HeldError(ThreadedBackend):
    """Answers every chat with a 500 whose headers and first body bytes go at once and
    whose rest waits for `release` (bounded): a client that drops the body after the
    status has the status before the gateway has the whole body."""

    def __init__(self) -> None:
        self.release = threading.Event()
        super().__init__()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=500, headers={"content-type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"error": {"message": "engine ')
        for _ in range(600):  # at most 30 s
            if self.release.is_set():
                break
            await asyncio.sleep(0.05)
        try:
            await resp.write(b'failed", "type": "InternalServerError", "code": 500}}')
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # Envoy closed the connection when the client left
        return resp


@pytest.fixture(scope="module")
def backend() -> Iterator[HeldError]:
    server = HeldError()
    try:
        yield server
    finally:
        server.release.set()
        server.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, backend: HeldError) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("gw-sdk-wire")
    with sim_process(root / "sim.log") as url:
        models = {"demo": model("tiny-llama", [{"url": url}]),
                  "held": model("tiny-llama", [{"url": f"http://127.0.0.1:{backend.port}"}])}
        gw_root = root / "gw"
        gw_root.mkdir()
        with run_gateway(gw_root, upstream=url, models=models,
                         envoy={"route_timeout_s": ROUTE_S}) as g:
            yield g


def ext_proc_answers(gw: Gateway) -> int:
    """ext_proc answers Envoy has received, all requests together."""
    admin = load_config(gw.config_path).envoy.admin_listen
    url = f"http://{admin}/stats?filter=^http.ingress.ext_proc.stream_msgs_received$"
    with urllib.request.urlopen(url, timeout=5) as r:
        m = re.search(rb": (\d+)", r.read())
    return int(m.group(1)) if m else 0


def records(gw: Gateway) -> list[dict[str, Any]]:
    return list(read_records(gw.data_dir / USAGE_FILE))


def test_sdk_makes_one_attempt_at_the_route_timeout(gw: Gateway) -> None:
    """The backend had the request and did not answer within the route timeout: a retry
    would wait as long again and be charged its hold again, so Envoy's 504 says
    `x-should-retry: false` and the SDK (default retries) makes one attempt, one record."""
    before = len(records(gw))
    client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=SECRET, max_retries=2)
    with client, counted(gw) as n, pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(  # 25 tokens at 200 ms: 5 s, past the 1 s timeout
            model="demo", messages=MESSAGES, max_tokens=25,
            extra_headers={"x-sim-tpot-ms": "200"})
    assert (e.value.status_code, e.value.code) == (504, "upstream_error")
    # It says which limit and what helps.
    assert f"within {ROUTE_S} s" in e.value.message and '"stream": true' in e.value.message
    assert e.value.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in e.value.response.headers
    assert n == [1]
    [rec] = records_for(gw, e.value.response.headers["x-request-id"])
    # The backend was generating an answer written only once whole: its hold, once.
    assert (rec["status"], rec["estimated"], rec["completion_tokens"]) == (504, True, 25)
    assert rec["prompt_tokens"] > 0
    assert len(records(gw)) == before + 1


def test_an_error_body_left_unread_keeps_the_backends_status(
        gw: Gateway, backend: HeldError) -> None:
    """The Node SDK cancels the body of an answer it will retry (a 502, a 429) as soon as
    it has the status. The backend's error answer generated nothing and said so: its
    record keeps the backend's status (500) at no cost, not the 499 of a client that left
    mid-answer."""
    backend.release.clear()
    body = {"model": "held", "messages": MESSAGES, "max_tokens": 5}
    answered = ext_proc_answers(gw)
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", f"{gw.base_url}/v1/chat/completions", content=json.dumps(body),
            headers=HEADERS) as r:
        assert r.status_code == 502  # the backend's 500, as the client sees it
        rid = r.headers["x-request-id"]
        # The status reaches the client before its first body bytes reach ext_proc: the
        # client leaves once ext_proc has answered them (the request body, then that
        # chunk). Leaving earlier is a 499 (ext_proc never saw the answer's status).
        wait_until(lambda: ext_proc_answers(gw) >= answered + 2, "ext_proc's answers")
    # The connection is closed with the body unread; the backend may finish now.
    backend.release.set()
    [rec] = records_for(gw, rid)
    assert (rec["status"], rec["prompt_tokens"], rec["completion_tokens"],
            rec["cost_usd"], rec["estimated"]) == (500, 0, 0, "0", False), rec


def test_sdk_makes_one_attempt_when_the_backend_fails_after_it_had_the_request(
        gw: Gateway) -> None:
    """Clients tester: a backend that closed the connection before answering is charged
    each attempt's whole hold, and the 502 said nothing, so the SDK made three attempts
    and paid three holds for one call that delivered nothing. The 502 now says
    `x-should-retry: false`: one attempt, one record."""
    before = len(records(gw))
    client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=SECRET, max_retries=2)
    with client, counted(gw) as n, pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=5,
                                       extra_headers={"x-sim-cut-after": "0"})
    assert (e.value.status_code, e.value.code) == (502, "upstream_error")
    assert "failed before answering" in e.value.message
    assert e.value.response.headers["x-should-retry"] == "false"
    assert n == [1]
    [rec] = records_for(gw, e.value.response.headers["x-request-id"])
    assert (rec["status"], rec["estimated"], rec["completion_tokens"]) == (502, True, 5)
    assert len(records(gw)) == before + 1
