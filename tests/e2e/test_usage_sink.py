"""Usage records at volume, end to end: real Envoy, `tokenbooth serve` with a Redis state
and a PostgreSQL sink, `tokenbooth usage export` as its own process, the openai SDK as
the client. Every request becomes one row; the stream empties once exported; `tokenbooth
usage` answers from PostgreSQL."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis

from authz.runtime.procs import spawn, stop
from authz.state.usage.records import USAGE_STREAM
from tests.e2e.conftest import run_gateway
from tests.postgres_harness import PostgresServer
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e
MESSAGES: list[Any] = [{"role": "user", "content": "Count the records, please."}]


async def _new_db(dsn: str, name: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return dsn.rsplit("/", 1)[0] + "/" + name


async def _rows(dsn: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [dict(r) for r in await conn.fetch(
            "SELECT request_id, cost_usd, stream, status FROM usage_records")]
    except asyncpg.UndefinedTableError:
        return []
    finally:
        await conn.close()


def _wait(cond: Any, what: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_requests_land_in_postgres_once_and_redis_empties(
        postgres: PostgresServer, tmp_path: Path) -> None:
    dsn = asyncio.run(_new_db(postgres.dsn, "e2e_usage_sink"))
    server = RedisServer(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    server.start()
    root = tmp_path / "gw"
    root.mkdir()
    try:
        with run_gateway(root, state=server.url,
                         usage={"sink": dsn, "trim_every_s": 0.1}) as gw:
            with (gw.logs / "export.log").open("wb") as log:
                exporter = spawn([sys.executable, "-m", "authz.cli", "usage", "export",
                                  "--config", str(gw.config_path)],
                                 stdout=log, stderr=subprocess.STDOUT)
            try:
                client = gw.client()
                ids = [client.chat.completions.with_raw_response.create(
                    model="demo", messages=MESSAGES, max_tokens=5).headers["x-request-id"]
                    for _ in range(12)]
                stream = client.chat.completions.with_raw_response.create(
                    model="demo", messages=MESSAGES, max_tokens=8, stream=True)
                ids.append(stream.headers["x-request-id"])
                for _ in stream.parse():
                    pass
                _wait(lambda: len(asyncio.run(_rows(dsn))) >= len(ids), "the rows")
                with redis.Redis.from_url(server.url) as r:
                    _wait(lambda: r.xlen(USAGE_STREAM) == 0, "the trim")
                rows = asyncio.run(_rows(dsn))
                assert sorted(x["request_id"] for x in rows) == sorted(ids)
                assert [x["stream"] for x in rows].count(True) == 1
                report = subprocess.run(
                    [sys.executable, "-m", "authz.cli", "usage", "--config",
                     str(gw.config_path), "--group-by", "model", "--json"],
                    capture_output=True, timeout=60, check=True)
                out = orjson.loads(report.stdout)
                assert out["totals"]["requests"] == len(ids)
                assert Decimal(out["totals"]["cost_usd"]) == sum(
                    (x["cost_usd"] for x in rows), Decimal(0)) > 0
                assert [g["model"] for g in out["groups"]] == ["demo"]
            finally:
                stop([exporter])
    finally:
        server.stop()


def test_an_exporter_that_exits_leaves_up_serving(postgres: PostgresServer,
                                                  tmp_path: Path) -> None:
    """`up` stopped every process, Envoy's included, when its exporter exited (a rolled-
    back tokenbooth meeting a newer usage schema): the gateway went down for a problem
    of the archive. The exporter's exit is an error line; requests go on (their records
    wait in the stream) and `up` starts it again later."""
    from tests.e2e.test_up import chat_until_served, free_ports_config, read_banner, start_up

    dsn = asyncio.run(_new_db(postgres.dsn, "e2e_up_exporter"))

    async def newer_schema() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("CREATE TABLE tokenbooth_schema (component text PRIMARY KEY, "
                               "version integer NOT NULL)")
            await conn.execute("INSERT INTO tokenbooth_schema VALUES ('usage', 99)")
        finally:
            await conn.close()

    asyncio.run(newer_schema())
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    data = free_ports_config(toy={"upstream_model": "tiny-llama", "backends": []})
    data |= {"state": server.url, "usage": {"sink": dsn}}
    _, up, client = start_up(tmp_path, data)
    lines: list[str] = []
    reader: threading.Thread | None = None
    try:
        read_banner(up)
        assert up.stdout is not None
        out = up.stdout
        reader = threading.Thread(target=lambda: lines.extend(out), daemon=True)
        reader.start()
        _wait(lambda: any("usage exporter" in ln for ln in lines), "the exporter's exit")
        [said] = [ln for ln in lines if "usage exporter" in ln]
        assert said.startswith("tokenbooth: error: the usage exporter") and \
            "requests go on" in said, said
        assert chat_until_served(client, "toy").model == "tiny-llama"
        assert up.poll() is None
        r = redis.Redis.from_url(server.url)
        _wait(lambda: r.xlen(USAGE_STREAM) >= 1, "the record")  # waits for an exporter
        r.close()
    finally:
        client.close()
        up.send_signal(signal.SIGINT)
        rc = up.wait(30)
        server.stop()
        if reader is not None:
            reader.join(10)
        assert up.stdout is not None
        up.stdout.close()
    assert rc == 0, lines
    assert not any("Traceback" in ln for ln in lines), lines
