"""Fixtures of the state tier: a limit store of each kind, on a Redis of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis

from authz.state.limits.memory import MemoryLimitStore
from authz.state.limits.redis_limits import RedisLimitStore
from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def limits_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("limits-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    s: Any
    if request.param == "memory":
        s = MemoryLimitStore()
    else:
        server: RedisServer = request.getfixturevalue("limits_redis")
        with redis.Redis.from_url(server.url) as r:
            r.flushdb()
        s = RedisLimitStore(server.url, timeout_s=1.0)
    await s.start()
    yield s
    await s.close()
