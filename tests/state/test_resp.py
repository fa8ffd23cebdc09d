"""The lean pipelined Redis client, against real redis-server processes."""
from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from redis.exceptions import ResponseError

from authz.state.resp import NotSent, RespClient
from tests.helpers import free_port
from tests.redis_server import RedisServer

SCRIPT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


async def test_concurrent_calls_pipeline_on_one_connection(own_redis: RedisServer) -> None:
    c = RespClient(own_redis.url, timeout_s=2)
    try:
        got = await asyncio.gather(*(c.execute("INCR", "n") for _ in range(500)))
        assert sorted(got) == list(range(1, 501))  # every reply matched to its own call
        assert await c.execute("SET", "k", b"\x00\xffbytes") == b"OK"
        assert await c.execute("GET", "k") == b"\x00\xffbytes"
        assert (await c.execute("CLIENT", "LIST")).count(b"\n") == 1  # one connection
    finally:
        await c.aclose()


async def test_scripts_load_themselves_again_after_a_flush(own_redis: RedisServer) -> None:
    c = RespClient(own_redis.url, timeout_s=2)
    try:
        assert await c.evalsha(SCRIPT, ["s"], ["2"]) == 2
        await c.execute("SCRIPT", "FLUSH")  # as after a Redis restart
        assert await c.evalsha(SCRIPT, ["s"], ["3"]) == 5
        with pytest.raises(ResponseError):
            await c.evalsha("return redis.call('NOPE')", [], [])
        assert await c.execute("PING") == b"PONG"  # the connection stays in step
    finally:
        await c.aclose()


async def test_outage_fails_fast_then_reconnects(own_redis: RedisServer) -> None:
    c = RespClient(own_redis.url, timeout_s=0.5)
    try:
        assert await c.execute("PING") == b"PONG"
        own_redis.stop()
        with pytest.raises(OSError):
            await c.execute("PING")
        own_redis.start()
        assert await c.execute("PING") == b"PONG"
    finally:
        await c.aclose()


async def test_a_server_that_never_answers_times_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        c = RespClient(f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
        t0 = time.monotonic()
        calls = [c.execute("PING") for _ in range(3)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, TimeoutError) for r in results), results
        assert time.monotonic() - t0 < 2
        await c.aclose()


def _redis_with_password(tmp_path: Path, password: str) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which("redis-server")
    assert exe is not None
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--dir", str(tmp_path), "--requirepass", password],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        assert time.monotonic() < deadline
        time.sleep(0.02)


async def test_password_and_database_from_the_url(tmp_path: Path) -> None:
    proc, port = _redis_with_password(tmp_path, "p@ss word")
    try:
        good = RespClient(f"redis://:p%40ss%20word@127.0.0.1:{port}/3", timeout_s=2)
        assert await good.execute("SET", "x", "1") == b"OK"
        assert b" db=3 " in await good.execute("CLIENT", "INFO")
        await good.aclose()
        bad = RespClient(f"redis://:wrong@127.0.0.1:{port}/0", timeout_s=2)
        with pytest.raises(NotSent, match="WRONGPASS"):  # refused: nothing it sends runs
            await bad.execute("PING")
        await bad.aclose()
    finally:
        proc.terminate()
        proc.wait(10)
