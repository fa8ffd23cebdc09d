"""Benchmarks are not pass/fail, but they must keep running: a tiny smoke run of each."""

from __future__ import annotations

import subprocess
import sys


def test_check_path_bench_runs() -> None:
    r = subprocess.run([sys.executable, "-m", "bench.check_path", "--n", "30"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "redis, uncached (1 GET)" in r.stdout
    assert r.stdout.count("|") > 20


def test_limit_path_bench_runs() -> None:
    r = subprocess.run([sys.executable, "-m", "bench.limit_path", "--n", "30"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "redis (one Lua round trip each)" in r.stdout
