"""A lone backend whose /health is slow under load stays up (resource tester: one
tenant's large prompts queued the backend's /health past the 1 s health-check timeout,
Envoy marked its only backend down, and every org got 503 for the alias)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest
from aiohttp import web

from authz.envoy_config.clusters import BACKEND_HC_INTERVAL_S
from authz.runtime.procs import wait_until
from tests.e2e.conftest import run_gateway
from tests.e2e.fake_backend import ThreadedBackend
from tests.helpers import SECRET

pytestmark = pytest.mark.e2e

ANSWER = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "slow",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}).encode()


class SlowHealth(ThreadedBackend):
    """Answers chat at once; its /health takes 1.6 s (a loaded vLLM's can)."""

    health_delay_s = 1.6

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)

    async def _chat(self, _: web.Request) -> web.Response:
        return web.Response(body=ANSWER, content_type="application/json")


def test_a_slow_health_check_does_not_take_a_lone_backend_down(tmp_path: Path) -> None:
    backend = SlowHealth()
    try:
        models = {"slow": {"upstream_model": "slow",
                           "backends": [{"url": f"http://127.0.0.1:{backend.port}"}]}}
        with run_gateway(tmp_path, more_models=models) as gw:
            client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=SECRET,
                                   max_retries=0)

            def answers() -> bool:
                try:
                    client.chat.completions.create(
                        model="slow", messages=[{"role": "user", "content": "hi"}],
                        max_tokens=1)
                except openai.APIStatusError:
                    return False
                return True

            wait_until(answers, "the slow-health backend", timeout=20)
            # Two more health checks, each slower than the old 1 s timeout: still up.
            time.sleep(2 * BACKEND_HC_INTERVAL_S + 1)
            assert answers()
    finally:
        backend.stop()
