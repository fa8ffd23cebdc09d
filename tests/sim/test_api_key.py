"""`tokenbooth sim --api-key`: vLLM's --api-key, so a gateway's backend credential can be
tested end to end (tests/e2e/test_backend_credentials.py)."""

from __future__ import annotations

import aiohttp

from authz.cli.main import parser
from authz.sim import make_app
from tests.sim.conftest import MODELS, serve

KEY = "sim-key-0123456789"
CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2}


async def test_v1_paths_want_the_key_and_the_rest_stay_open() -> None:
    runner, port = await serve(make_app(MODELS, api_key=KEY))
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                            {"X-API-Key": KEY}):
                async with http.post(f"{url}/v1/chat/completions", json=CHAT,
                                     headers=headers) as r:
                    assert (r.status, await r.json()) == (401, {"error": "Unauthorized"})
            async with http.post(f"{url}/v1/chat/completions", json=CHAT,
                                 headers={"Authorization": f"Bearer {KEY}"}) as r:
                assert r.status == 200
                assert (await r.json())["usage"]["completion_tokens"] == 2
            # Liveness and metrics are open, as vLLM's are.
            for path in ("/health", "/metrics"):
                async with http.get(f"{url}{path}") as r:
                    assert r.status == 200
    finally:
        await runner.cleanup()


def test_cli_option() -> None:
    args = parser().parse_args(["sim", "--api-key", KEY])
    assert args.api_key == KEY
    assert parser().parse_args(["sim"]).api_key is None
