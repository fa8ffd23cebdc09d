"""A fake backend for e2e tests: an aiohttp app on a free port, run in a thread of its
own, with the health route Envoy's active health check asks for. Subclasses add their
routes in `routes`."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from tests.helpers import free_port


class ThreadedBackend:
    # How long its /health takes to answer (a backend slowed by load).
    health_delay_s = 0.0

    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def routes(self, app: web.Application) -> None:
        """Add the backend's own routes."""

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/health", self._health)
        self.routes(app)
        self._runner = runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _health(self, _: web.Request) -> web.Response:
        if self.health_delay_s:
            await asyncio.sleep(self.health_delay_s)
        return web.Response(text="ok")
