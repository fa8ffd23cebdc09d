"""Fixtures: a simulator served on a real ephemeral port, and an HTTP client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from authz.sim import make_app
from authz.sim.app import SIMULATOR_KEY, Simulator

MODELS = ("tiny-llama", "other-model")


@dataclass
class Sim:
    """A running simulator: its base URL, an HTTP session and its in-process state."""

    url: str
    port: int
    http: aiohttp.ClientSession
    state: Simulator


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    """Start ``app`` like run_sim does, on 127.0.0.1 and a free port."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port: int = runner.addresses[0][1]
    return runner, port


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    app = make_app(MODELS)
    runner, port = await serve(app)
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        yield Sim(url, port, http, app[SIMULATOR_KEY])
    await runner.cleanup()
