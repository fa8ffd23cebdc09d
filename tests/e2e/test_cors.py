"""CORS through the real Envoy: `envoy.cors_allow_origins` lets browsers on those origins
call the API (Envoy answers their preflights, without a key), and every answer to them,
denials included, says so. A backend's own CORS headers (vLLM allows every origin by
default) never reach a client: the gateway's setting decides."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from tests.e2e.conftest import Gateway, run_gateway
from tests.e2e.fake_backend import ThreadedBackend
from tests.helpers import SECRET

pytestmark = pytest.mark.e2e
APP = "https://app.example.com"
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


class PermissiveBackend(ThreadedBackend):
    """Answers chat completions as vLLM does with its default `--allowed-origins *`."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)

    async def _chat(self, request: web.Request) -> web.Response:
        body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                "model": "tiny-llama",
                "choices": [{"index": 0, "finish_reason": "length",
                             "message": {"role": "assistant", "content": "hi there"}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
        return web.json_response(body, headers={
            "access-control-allow-origin": "*", "access-control-allow-credentials": "true",
            "access-control-expose-headers": "*"})


@pytest.fixture(scope="module")
def backend() -> Iterator[PermissiveBackend]:
    b = PermissiveBackend()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def cors_gateway(tmp_path_factory: pytest.TempPathFactory,
                 backend: PermissiveBackend) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("cors"), upstream=f"http://127.0.0.1:{backend.port}",
                     envoy={"cors_allow_origins": [APP]}) as gw:
        yield gw


def preflight(gw: Gateway, origin: str, path: str = "/v1/chat/completions",
              method: str = "POST") -> httpx.Response:
    return httpx.options(f"{gw.base_url}{path}", headers={
        "origin": origin, "access-control-request-method": method,
        "access-control-request-headers": "authorization, content-type, x-stainless-os"})


def test_preflight_from_an_allowed_origin_is_answered_without_a_key(
        cors_gateway: Gateway) -> None:
    r = preflight(cors_gateway, APP)
    assert r.status_code == 200
    h = r.headers
    assert h["access-control-allow-origin"] == APP
    assert "POST" in h["access-control-allow-methods"]
    # The SDKs' own headers by the wildcard; authorization, which no wildcard covers, by name.
    assert h["access-control-allow-headers"] == "authorization, *"
    assert "access-control-allow-credentials" not in h


def test_preflight_from_another_origin_needs_a_key(cors_gateway: Gateway) -> None:
    r = preflight(cors_gateway, "https://evil.example.com")
    assert r.status_code == 401
    assert "access-control-allow-origin" not in r.headers


def test_answers_and_denials_carry_the_gateways_cors_headers_not_the_backends(
        cors_gateway: Gateway) -> None:
    ok = httpx.post(f"{cors_gateway.base_url}/v1/chat/completions", json=CHAT,
                    headers={"origin": APP, "authorization": f"Bearer {SECRET}"})
    assert ok.status_code == 200, ok.text
    assert ok.headers.get_list("access-control-allow-origin") == [APP]
    assert "access-control-allow-credentials" not in ok.headers
    assert ok.headers["access-control-expose-headers"] == "*"  # x-request-id, rate limits
    # It depends on the request's Origin: caches must not reuse it across origins.
    assert "Origin" in ok.headers.get_list("vary"), ok.headers
    denied = httpx.post(f"{cors_gateway.base_url}/v1/chat/completions", json=CHAT,
                        headers={"origin": APP})
    assert denied.status_code == 401
    assert denied.headers["access-control-allow-origin"] == APP
    assert "Origin" in denied.headers.get_list("vary"), denied.headers
    assert json.loads(denied.content)["error"]["code"] == "invalid_api_key"
    # Another origin: the backend's `*` does not reach it either.
    other = httpx.post(f"{cors_gateway.base_url}/v1/chat/completions", json=CHAT,
                       headers={"origin": "https://evil.example.com",
                                "authorization": f"Bearer {SECRET}"})
    assert other.status_code == 200
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/demo"])
def test_the_models_endpoints_answer_browsers_too(cors_gateway: Gateway, path: str) -> None:
    """GET /v1/models (openai-node's models.list() in a browser): its preflight is
    answered without a key and every answer carries the origin (the route answered by
    Envoy itself had no CORS policy: a 401 preflight, answers without the header)."""
    r = preflight(cors_gateway, APP, path, "GET")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP
    ok = httpx.get(f"{cors_gateway.base_url}{path}",
                   headers={"origin": APP, "authorization": f"Bearer {SECRET}"})
    assert ok.status_code == 200, ok.text
    assert ok.headers.get_list("access-control-allow-origin") == [APP]
    assert ok.json()["object"] in ("list", "model")
    for headers, status in (({}, 401), ({"authorization": f"Bearer {SECRET}x"}, 401)):
        denied = httpx.get(f"{cors_gateway.base_url}{path}", headers={"origin": APP, **headers})
        assert denied.status_code == status
        assert denied.headers["access-control-allow-origin"] == APP
    missing = httpx.get(f"{cors_gateway.base_url}/v1/models/nope",
                        headers={"origin": APP, "authorization": f"Bearer {SECRET}"})
    assert missing.status_code == 404
    assert missing.headers["access-control-allow-origin"] == APP
    assert preflight(cors_gateway, "https://evil.example.com", path, "GET").status_code == 401


def test_without_the_setting_there_is_no_cors(tmp_path: Path, backend: PermissiveBackend) -> None:
    with run_gateway(tmp_path, upstream=f"http://127.0.0.1:{backend.port}") as gw:
        assert preflight(gw, APP).status_code == 401
        ok = httpx.post(f"{gw.base_url}/v1/chat/completions", json=CHAT,
                        headers={"origin": APP, "authorization": f"Bearer {SECRET}"})
        assert ok.status_code == 200
        assert not [k for k in ok.headers if k.startswith("access-control-")]


def test_any_origin_is_a_bootstrap_envoy_accepts(tmp_path: Path,
                                                 backend: PermissiveBackend) -> None:
    """Ops tester: `cors_allow_origins: ["*"]`, as documented, rendered an empty prefix
    matcher that Envoy refused, so `up` exited at once."""
    with run_gateway(tmp_path, upstream=f"http://127.0.0.1:{backend.port}",
                     envoy={"cors_allow_origins": ["*"]}) as gw:
        r = preflight(gw, "https://anywhere.example")
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "https://anywhere.example"
