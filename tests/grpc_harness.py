"""Hermetic tier: the real grpc.aio server on a free port, driven with real Envoy protobuf."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from authz.runtime.overrides import Overrides
from authz.runtime.server import Services
from authz.runtime.snapshot import Runtime
from authz.state.limits.base import LimitStore
from authz.state.limits.memory import MemoryLimitStore
from authz.state.limits.redis_limits import RedisLimitStore
from tests.helpers import write_policy
from tests.redis_server import RedisServer


@dataclass
class Running:
    services: Services
    channel: grpc.aio.Channel
    config_path: Path
    data_dir: Path


@contextlib.asynccontextmanager
async def serve_policy(tmp_path: Path, **policy: Any) -> AsyncIterator[Running]:
    """The services on free ports for a test policy (see tests/helpers.py), and a channel."""
    path = write_policy(
        tmp_path, "http://127.0.0.1:8000",
        services={"grpc_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0"}, **policy,
    )
    services = Services(Runtime.from_file(path, Overrides()), grace_s=1.0)
    await services.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{services.grpc_port}")
    try:
        yield Running(services, channel, path, tmp_path / "data")
    finally:
        await channel.close()
        await services.stop()


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    async with serve_policy(tmp_path) as r:
        yield r


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for this test alone, which the test may stop and restart."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
async def two_limit_stores(request: pytest.FixtureRequest) -> AsyncIterator[list[LimitStore]]:
    """Two replicas sharing one limit store (memory: one object, as a single process
    would; Redis: two clients of the test's own redis-server)."""
    if request.param == "memory":
        mem = MemoryLimitStore()
        yield [mem, mem]
        return
    url = request.getfixturevalue("own_redis").url
    stores: list[LimitStore] = [RedisLimitStore(url, timeout_s=2.0) for _ in range(2)]
    yield stores
    for s in stores:
        await s.close()
