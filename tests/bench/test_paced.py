"""The paced-stream section of `make bench` and its lever variants keep running, and count
tokens from the streams' own usage (the figures themselves are never pass/fail)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from authz.runtime.procs import stop
from bench import gateways, levers, paced
from bench.gateways import render_static, write_policy


def _sse(*objs: object) -> bytes:
    return b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs)


def test_tokens_come_from_the_streams_own_usage() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7,
                                      "total_tokens": 10}}
    assert paced.completion_tokens(_sse(chunk, usage) + b"data: [DONE]\n\n") == 7
    # No usage, or a stream that never ended: not a good stream.
    assert paced.completion_tokens(_sse(chunk) + b"data: [DONE]\n\n") is None
    assert paced.completion_tokens(_sse(chunk, usage)) is None


def test_the_plan_covers_every_cell() -> None:
    plan = paced.cells([2, 20], [64, 512], [1, 64])
    assert len(plan) == 8 and len(set(plan)) == 8
    body = json.loads(paced.stream_body(512))
    assert body["max_tokens"] == 512 and body["stream_options"] == {"include_usage": True}


def _ext_proc_filters(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in levers._filters(bootstrap)
            if "ext_proc" in str(f["typed_config"].get("@type", ""))]


def test_lever_variants_change_only_the_response_path(tmp_path: Path) -> None:
    base = render_static(write_policy(tmp_path, "http://127.0.0.1:1"))
    names = [f["name"] for f in levers._filters(base)]

    dx = levers.duplex(render_static(write_policy(tmp_path, "http://127.0.0.1:1")))
    (main,) = _ext_proc_filters(dx)
    mode = main["typed_config"]["processing_mode"]
    assert mode["response_body_mode"] == "FULL_DUPLEX_STREAMED"
    assert mode["request_body_mode"] == "BUFFERED"
    assert [f["name"] for f in levers._filters(dx)] == names

    ob = levers.observe(render_static(write_policy(tmp_path, "http://127.0.0.1:1")))
    main, watcher = _ext_proc_filters(ob)
    assert main["typed_config"]["processing_mode"]["response_body_mode"] == "NONE"
    assert watcher["typed_config"]["observability_mode"] is True
    assert watcher["typed_config"]["processing_mode"]["request_body_mode"] == "NONE"

    lu = levers.lua(render_static(write_policy(tmp_path, "http://127.0.0.1:1")))
    (main,) = _ext_proc_filters(lu)
    assert main["typed_config"]["processing_mode"]["response_body_mode"] == "NONE"
    assert levers.LUA in [f["name"] for f in levers._filters(lu)]


@pytest.mark.timeout(300)
def test_lever_variants_stream_through_real_envoy(tmp_path: Path) -> None:
    """Each variant's bootstrap is accepted by the real Envoy and streams whole responses
    (every token counted from usage, the usage chunk and [DONE] delivered)."""
    r = subprocess.run(
        [sys.executable, "-m", "bench.run", "--paced-only", "--paced-configs",
         ",".join(levers.VARIANTS), "--paced-tpot", "1", "--paced-tokens", "16",
         "--paced-streams", "2", "--paced-min-s", "0.2", "--paced-idle-s", "0.5",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    got = json.loads((tmp_path / "latest.json").read_text())["paced"]
    assert {m["config"] for m in got} == set(levers.VARIANTS)
    for m in got:
        assert m["failed"] == 0 and m["completed_streams"] >= 2, m
        assert m["streamed_tokens"] == 16 * m["completed_streams"], m


@pytest.mark.timeout(120)
def test_envoy_side_meter_counts_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """F-lua's meter (the floor of metering in Envoy) is not a stand-in: through the real
    Envoy, with chunks split wherever the reads fall, it reads the usage event's counts
    and counts one content event per token."""
    logged = levers._LUA_METER.replace(
        "  local md = h:streamInfo()",
        '  h:logWarn("METER " .. content .. " " .. prompt .. " " .. completion)\n'
        "  local md = h:streamInfo()")
    monkeypatch.setattr(levers, "_LUA_METER", logged)
    url, sim = gateways.start_sim(tmp_path)
    gw = levers.starter("F-lua", tmp_path, url)()
    try:
        for tokens, tpot in ((8, 2), (37, 0), (300, 0)):
            tally = asyncio.run(paced.drive(gw, paced.Cell(tpot, tokens, 1), 0.0))
            assert (tally.streams, tally.tokens, tally.failed) == (1, tokens, 0)
    finally:
        gw.stop()
        stop([sim])
    log = (tmp_path / "F-lua" / "envoy-F-lua.log").read_text()
    meters = [line.rsplit("METER ", 1)[1] for line in log.splitlines() if "METER " in line]
    prompt = meters[0].split()[1]
    assert meters == [f"{n} {prompt} {n}" for n in (8, 37, 300)]
