"""A real HTTP server speaking the user-org-service's key-validation protocol, for tests.

It counts calls per secret and can be told to answer valid/revoked/expired/not found per
secret, to delay, to fail with a status, to send a raw body, or be stopped and restarted
on the same port.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from aiohttp import web

from tests.helpers import free_port

PATH = "/v1/auth/validate-api-key"


class ValidationServer:
    def __init__(self) -> None:
        self.answers: dict[str, dict[str, Any]] = {}
        self.calls: Counter[str] = Counter()
        self.delay_s = 0.0
        self.fail_status: int | None = None
        self.raw: bytes | None = None  # a 200 body sent as is
        self.port = free_port()  # kept for restarts
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    def valid(self, secret: str, **fields: Any) -> None:
        answer: dict[str, Any] = {
            "valid": True,
            "apiKeyId": "key_1",
            "organizationId": "org-1",
            "principalId": "user-1",
            "principalType": "user",
            "scopes": ["inference:read", "inference:write"],
            "status": "active",
            "modelAccessMode": "auto_grant",
            "grantedModels": [],
        }
        answer.update(fields)
        self.answers[secret] = answer

    def revoked(self, secret: str) -> None:
        self.answers[secret] = {"valid": False, "message": "API key is revoked"}

    def expired(self, secret: str) -> None:
        self.answers[secret] = {"valid": False, "message": "API key is expired"}

    def forget(self, secret: str) -> None:
        self.answers.pop(secret, None)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(PATH, self._handle)
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=0.2, handler_cancellation=True
        )
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            payload = await request.json()
        except ValueError:
            return web.json_response({"error": "invalid request payload"}, status=400)
        secret = payload.get("apiKeySecret") if isinstance(payload, dict) else None
        if not isinstance(secret, str) or not secret:
            return web.json_response({"error": "apiKeySecret is required"}, status=400)
        self.calls[secret] += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_status is not None:
            return web.json_response({"error": "internal error"}, status=self.fail_status)
        if self.raw is not None:
            return web.Response(body=self.raw, content_type="application/json")
        answer = self.answers.get(secret, {"valid": False, "message": "API key not found"})
        return web.json_response(answer)
