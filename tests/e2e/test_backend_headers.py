"""What a backend's answer may not say for the gateway, through the real Envoy: its own
`x-tokenbooth-*` headers, rate-limit headers of any name (the gateway's six are its own),
a retry verdict (`x-should-retry`, which the OpenAI SDKs obey over the status: a
backend's `true` made them resend its 400s, each admitted and recorded), Envoy's own
`x-envoy-*` and cookies."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from aiohttp import web

from policy.limits import RATE_HEADER_NAMES
from tests.e2e.conftest import Gateway, run_gateway
from tests.e2e.fake_backend import ThreadedBackend
from tests.e2e.test_gateway import records_for
from tests.helpers import METERED_SECRET

pytestmark = pytest.mark.e2e
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BACKEND_SAYS = {
    "x-tokenbooth-debug": "internal-host-42", "x-tokenbooth-org": "someone-else",
    "x-ratelimit-remaining-requests-day": "7", "x-ratelimit-limit-requests": "999999",
    "x-should-retry": "true", "retry-after": "1", "x-backend-own": "kept",
    # The same names spelled with underscores (a CGI/WSGI reader's dashes).
    "x_tokenbooth_org": "evil", "x_should_retry": "true", "x_ratelimit_limit_tokens": "9",
    # vLLM's ORCA load report: the backend's load, the operator's to see.
    "endpoint-load-metrics": "TEXT named_metrics.kv_cache_utilization=0.4",
    # Envoy's own headers, for the Envoys in front (`overloaded` makes them back off), and
    # a cookie for the gateway's origin.
    "x-envoy-overloaded": "true", "x-envoy-decorator-operation": "evil",
    "x_envoy_ratelimited": "true", "set-cookie": "session=backend; Path=/",
    # What would make a client or a cache act for the gateway's origin: unpin HSTS, move
    # to another host, prompt for a login, keep a completion in a shared cache.
    "strict-transport-security": "max-age=0", "alt-svc": 'h3=":443"; ma=86400',
    "refresh": "0;url=http://evil.example/", "location": "http://evil.example/",
    "content-location": "http://evil.example/", "www-authenticate": 'Basic realm="x"',
    "cache-control": "public, max-age=31536000", "expires": "Thu, 01 Dec 2099 16:00:00 GMT",
    "clear-site-data": '"*"',
}
BACKEND_ONLY = ("strict-transport-security", "alt-svc", "refresh", "location",
                "content-location", "www-authenticate", "cache-control", "expires",
                "clear-site-data")


class Talkative(ThreadedBackend):
    """Answers chat completions with headers only the gateway may set; the status the
    request's `x-answer` names (a 400 with vLLM's error body)."""

    refused = 0  # 400s answered

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)

    async def _chat(self, request: web.Request) -> web.Response:
        status = int(request.headers.get("x-answer", "200"))
        self.refused += status == 400
        if status != 200:
            return web.json_response({"object": "error", "message": "bad request",
                                      "type": "BadRequestError", "code": status},
                                     status=status, headers=BACKEND_SAYS)
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1,
            "model": "tiny-llama",
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": "hi there"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}},
            headers=BACKEND_SAYS)


@pytest.fixture(scope="module")
def backend() -> Iterator[Talkative]:
    b = Talkative()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def talkative(tmp_path_factory: pytest.TempPathFactory, backend: Talkative) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("talkative"),
                     upstream=f"http://127.0.0.1:{backend.port}") as gw:
        yield gw


def test_a_success_keeps_only_the_gateways_own(talkative: Gateway) -> None:
    r = httpx.post(f"{talkative.base_url}/v1/chat/completions", json=CHAT,
                   headers={"authorization": f"Bearer {METERED_SECRET}"})
    assert r.status_code == 200, r.text
    h = r.headers
    assert not [k for k in h if k.replace("_", "-").startswith("x-tokenbooth-")], h
    assert "x-should-retry" not in h and "x_should_retry" not in h
    assert "x_ratelimit_limit_tokens" not in h
    assert "endpoint-load-metrics" not in h
    assert "x-ratelimit-remaining-requests-day" not in h
    assert not [k for k in h if k.replace("_", "-").startswith("x-envoy-")
                and k != "x-envoy-upstream-service-time"], h
    assert "x-envoy-upstream-service-time" in h  # the router's own, not the backend's
    assert "set-cookie" not in h
    assert not set(BACKEND_ONLY) & set(h), h
    # The gateway's own for this key's limit (tokens per minute), never the backend's:
    # it has no request limit, so no request headers at all.
    assert h["x-ratelimit-limit-tokens"] == "1000"
    assert not {n for n in RATE_HEADER_NAMES if n.endswith("-requests")} & set(h)
    assert h["x-backend-own"] == "kept"  # anything else is the backend's business


def test_a_backends_retry_verdict_does_not_make_the_sdk_resend_its_400(
        talkative: Gateway, backend: Talkative) -> None:
    before = backend.refused
    client = talkative.client().with_options(max_retries=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=CHAT["messages"],  # type: ignore[arg-type]
                                       max_tokens=2, extra_headers={"x-answer": "400"})
    assert "x-should-retry" not in e.value.response.headers
    assert "set-cookie" not in e.value.response.headers
    assert "x-envoy-overloaded" not in e.value.response.headers
    assert not set(BACKEND_ONLY) & set(e.value.response.headers)
    rid = e.value.response.headers["x-request-id"]
    assert [r["status"] for r in records_for(talkative, rid)] == [400]
    assert backend.refused - before == 1  # one attempt, not three
