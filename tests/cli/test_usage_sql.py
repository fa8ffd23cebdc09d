"""`tokenbooth usage` with usage.sink: SQL aggregates over the PostgreSQL archive merged
with the stream's unexported tail, against the same report computed in Python over
every record (policy/usage_report.py, the reference). Real redis-server, PostgreSQL."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from authz.state.usage.exporter import Exporter
from authz.state.usage.trim import EXPORT_GROUP, TrimPolicy
from policy.usage import LOST
from policy.usage_report import Selection, UsageReport, parse_group_by
from tests.helpers import write_policy
from tests.redis_server import RedisServer
from tests.state.usage.gen import add, record, reference

STREAM = "tb:{usage}"
N = 20_000


def usage(config: Path, *args: str) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "authz.cli", "usage", "--config", str(config),
                        "--json", *args], capture_output=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr.decode()
    out = orjson.loads(r.stdout)
    assert isinstance(out, dict)
    return out


def expected(records: list[dict[str, Any]], sel: Selection, group_by: str) -> dict[str, Any]:
    report = UsageReport(sel, parse_group_by(group_by))
    for r in reference(records).values():
        report.feed(r)
    report.finish()
    groups = [dict(zip(report.group_by, g, strict=True)) | t.as_dict()
              for g, t in report.groups()]
    return {"group_by": list(report.group_by), "groups": groups,
            "totals": report.totals.as_dict()}


@pytest.fixture
async def filled(own_redis: RedisServer, pg_db: str, tmp_path: Path,
                 ) -> tuple[Path, list[dict[str, Any]]]:
    """N records exported (some `lost`), then a tail in the stream: new records, real
    records superseding archived `lost` ones, and redeliveries of archived ones."""
    client = aioredis.Redis.from_url(own_redis.url)
    archived = [record(i, LOST if i % 97 == 0 else 200) for i in range(N)]
    await add(client, STREAM, iter(archived), seen_ttl_s=0)
    ex = Exporter(own_redis.url, pg_db, stream=STREAM, trim_policy=TrimPolicy(
        groups=(EXPORT_GROUP,)))
    await ex.run(asyncio.Event(), until_idle=True)
    await ex.aclose()
    tail = [record(i) for i in range(N, N + 500)] + [record(i) for i in range(0, 2000, 97)]
    tail += [record(i) for i in range(1, 300, 7)] + [record(N + 1, LOST)]
    await add(client, STREAM, iter(tail), seen_ttl_s=0)
    await client.aclose()
    config = write_policy(tmp_path, "http://127.0.0.1:8000", state=own_redis.url,
                          usage={"sink": pg_db})
    return config, archived + tail


@pytest.mark.parametrize("group_by", ["org", "org,day", "key,model", "hour"])
async def test_sql_groups_match_the_python_reference(
        filled: tuple[Path, list[dict[str, Any]]], group_by: str) -> None:
    config, records = filled
    got = await asyncio.to_thread(usage, config, "--group-by", group_by)
    assert got == expected(records, Selection(), group_by)
    assert got["totals"]["requests"] == N + 500


async def test_sql_selection_and_records(filled: tuple[Path, list[dict[str, Any]]]) -> None:
    config, records = filled
    got = await asyncio.to_thread(usage, config, "--group-by", "model", "--org", "org-3",
                                  "--since", "2026-03-03T00:00:00Z")
    from datetime import UTC, datetime
    sel = Selection(org="org-3", since=datetime(2026, 3, 3, tzinfo=UTC))
    assert got == expected(records, sel, "model")
    listed = await asyncio.to_thread(usage, config, "--key", "key-007")
    want = {r["request_id"]: r for r in reference(records).values() if r["key_id"] == "key-007"}
    assert {r["request_id"]: r for r in listed["records"]} == want
    assert len(listed["records"]) == len(want)
    assert listed["totals"] == expected(records, Selection(key="key-007"), "org")["totals"]


def test_json_records_leave_nothing_on_stdout_when_the_store_fails() -> None:
    """The ledger cannot be read (PostgreSQL down): the error goes to stderr and stdout
    holds no half-written JSON document; records that do come are one valid document."""
    import io

    from authz.cli.usage import _records_json

    def failing() -> Any:
        raise OSError("connection refused")
        yield  # a generator

    out = io.StringIO()
    with pytest.raises(OSError):
        _records_json(UsageReport(Selection(), ()), failing(), out)
    assert out.getvalue() == ""
    for n in (0, 2):
        out = io.StringIO()
        recs = [record(i) for i in range(n)]
        _records_json(UsageReport(Selection(), ()), iter(recs), out)
        doc = orjson.loads(out.getvalue())
        assert [r["request_id"] for r in doc["records"]] == [r["request_id"] for r in recs]
