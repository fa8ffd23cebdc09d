"""authz/services/prompt_counter.py against a real HTTP server: the backend's count, or
None whenever it cannot give one (an error, a timeout, an answer that is not a count)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from authz.services.prompt_counter import PromptCounter, backend_headers
from policy.config import load_config
from tests.helpers import free_port, write_policy

SEEN: list[dict[str, Any]] = []


async def _tokenize(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    SEEN.append({"body": body, "authorization": request.headers.get("authorization")})
    how = body.get("prompt", "")
    if how == "fail":
        return web.json_response({"object": "error"}, status=500)
    if how == "slow":
        await asyncio.sleep(1.0)
    if how == "garbage":
        return web.Response(text="not json")
    return web.json_response({"count": len(how.split()), "tokens": [], "max_model_len": 99})


@pytest.fixture
async def backend() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/tokenize", _tokenize)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_the_count_or_none(backend: str) -> None:
    counter = PromptCounter(timeout_s=0.3)
    try:
        auth = {"authorization": "Bearer k"}
        assert await counter.count(backend, {"prompt": "three small words"}, auth) == 3
        assert SEEN[-1] == {"body": {"prompt": "three small words"}, "authorization": "Bearer k"}
        for prompt in ("fail", "slow", "garbage"):
            assert await counter.count(backend, {"prompt": prompt}, {}) is None
        port = free_port()  # nothing listens there
        assert await counter.count(f"http://127.0.0.1:{port}", {"prompt": "x"}, {}) is None
    finally:
        await counter.close()


def test_backend_headers_carry_the_key_envoy_sends(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    text = path.read_text().replace(
        "- url: http://127.0.0.1:8000",
        f"- url: http://127.0.0.1:8000\n      api_key_file: {key_file}", 1)
    path.write_text(text)
    cfg = load_config(path)
    url = "http://127.0.0.1:8000"
    assert backend_headers(cfg, url, {}) == {"authorization": "Bearer from-a-file"}
    assert backend_headers(cfg, "http://elsewhere:1", {}) == {}  # no key named for it
    key_file.unlink()
    assert backend_headers(cfg, url, {}) is None  # named, not readable
    path.write_text(text.replace(f"api_key_file: {key_file}", "api_key_env: TB_TEST_KEY"))
    cfg = load_config(path)
    assert backend_headers(cfg, url, {}) is None
    assert backend_headers(cfg, url, {"TB_TEST_KEY": "from-env"}) == {
        "authorization": "Bearer from-env"}
