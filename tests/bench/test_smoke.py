"""Benchmarks are not pass/fail, but they must keep running: a tiny smoke run of each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import litellm_proxy


def test_check_path_bench_runs() -> None:
    r = subprocess.run([sys.executable, "-m", "bench.check_path", "--n", "30"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "redis, uncached (1 GET)" in r.stdout
    assert r.stdout.count("|") > 20


def test_decision_path_bench_records_every_request() -> None:
    r = subprocess.run([sys.executable, "-m", "bench.decision_path", "--n", "40"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "40 requests:" in r.stdout
    assert "44 records" in r.stdout  # 40 measured + 4 warm-up, one record each


def test_grpc_path_bench_records_every_request() -> None:
    r = subprocess.run([sys.executable, "-m", "bench.grpc_path", "--concurrency", "2",
                        "--duration", "0.5", "--reps", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| 2 |" in r.stdout
    assert "B recorded" in r.stdout


def test_limit_path_bench_runs() -> None:
    r = subprocess.run([sys.executable, "-m", "bench.limit_path", "--n", "30"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "redis (one Lua round trip each)" in r.stdout


@pytest.mark.timeout(300)
def test_end_to_end_bench_runs(tmp_path: Path) -> None:
    """`make bench` in miniature: A, F and B-memory (C too where its venv exists), one
    concurrency, half a second, one repetition; every request must have succeeded."""
    r = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    result = json.loads((tmp_path / "latest.json").read_text())
    rows = result["summary"]
    configs = {row["config"] for row in rows}
    assert {"A", "F", "B-memory"} <= configs
    if not litellm_proxy.available():
        assert "skipping C (LiteLLM)" in r.stdout
    for row in rows:
        assert row["failed"] == 0 and row["rps"] > 0, row
        if row["config"] in ("F", "B-memory"):
            # At least the Check and one ext_proc message (the pattern itself may change),
            # and the servicers' count agrees with Envoy's, but for the messages of the
            # requests in flight when the two counters were read (a loaded machine
            # completes few requests in the smoke's half second).
            assert row["msgs"]["total"] >= 2, row
            in_flight = 2 * 6 * row["connections"] / max(row["completed"], 1)
            assert abs(row["msgs"]["total"] - row["envoy_msgs"]) < 0.5 + in_flight, row
    markdown = (tmp_path / "latest.md").read_text()
    assert "| B-memory | 4 |" in markdown
    assert "#### B against A, F and C" in markdown
    # The paced-stream section: every cell of A, F and B streamed its tokens, each counted
    # from the stream's own usage, and F and B sent ext_proc messages for them.
    paced = result["paced"]
    assert {(m["config"], m["streams"]) for m in paced} == {
        (c, s) for c in ("A", "F", "B-memory", "B-interval8", "F-envoy", "B-envoy",
                         "B-envoy-interval8")
        for s in (1, 4)}
    for m in paced:
        assert m["failed"] == 0 and m["completed_streams"] >= m["streams"], m
        assert m["streamed_tokens"] == 16 * m["completed_streams"], m
        if m["config"] != "A":
            assert m["ext_proc_msgs_per_token"], m
    # vLLM's stream_interval 8: 16 tokens come in 3 chunks (1 + 8 + 7), not 16.
    msgs = {m["config"]: m["ext_proc_msgs_per_token"] for m in paced if m["streams"] == 1}
    assert msgs["B-interval8"] < msgs["B-memory"] / 2, msgs
    # Metered in Envoy: no ext_proc message per chunk (the request body and the response
    # headers per stream, 2 for 16 tokens).
    assert msgs["B-envoy"] <= 2 / 16 + 0.01, msgs
    assert msgs["F-envoy"] <= 2 / 16 + 0.01, msgs  # its floor hands streams over too
    assert "#### Paced streams: gateway CPU per streamed token" in markdown
