"""The HTTP side port: /healthz (alive), /readyz (config and state loaded), /metrics.

/readyz names the answering process (`PID_HEADER`), so `tokenbooth up` can tell its own
child from another instance that holds the port."""

from __future__ import annotations

import os
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from authz.runtime.metrics import Metrics

PID_HEADER = "x-tokenbooth-pid"


def make_side_app(metrics: Metrics, ready: Callable[[], bool]) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        pid = {PID_HEADER: str(os.getpid())}
        if ready():
            return web.Response(text="ready\n", headers=pid)
        return web.Response(status=503, text="not ready\n", headers=pid)

    async def metrics_handler(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    return app
