"""The long form of tests/runtime/test_memory_flat.py: a real gateway (Envoy, `tokenbooth
serve` with Redis state, the simulator) under constant streaming load for
TOKENBOOTH_SOAK_S seconds (e.g. 600); serve's resident memory, measured after a warm-up
and at the end, grows less than 5 MB (per 10 minutes of load). Skipped unless that
variable is set: it takes as long as it says.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from authz.runtime.memdebug import rss_bytes
from tests.e2e.conftest import run_gateway
from tests.helpers import SECRET
from tests.redis_server import RedisServer

SOAK_S = float(os.environ.get("TOKENBOOTH_SOAK_S", "0"))
CONNECTIONS = 50
BOUND_MB_PER_10_MIN = 5.0

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(SOAK_S <= 0, reason="set TOKENBOOTH_SOAK_S=600 to run the soak"),
    pytest.mark.timeout(SOAK_S + 300),
]


def pid_of(config: Path) -> int:
    """The `tokenbooth serve` process of this config."""
    want = f"serve\0--config\0{config}"
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if want in cmdline:
                return int(proc.name)
    raise AssertionError(f"no serve process for {config}")


def rss_of(pid: int) -> int:
    resident = Path(f"/proc/{pid}/statm").read_text().split()[1]
    return int(resident) * os.sysconf("SC_PAGE_SIZE")


def test_serve_memory_is_flat_under_constant_load(tmp_path: Path) -> None:
    assert rss_bytes() > 0  # Linux: /proc is there to read
    (tmp_path / "redis").mkdir()
    (tmp_path / "gw").mkdir()
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        with run_gateway(tmp_path / "gw", state=redis.url) as gw:
            pid = pid_of(gw.config_path)
            body = tmp_path / "body.json"
            body.write_text(json.dumps({"model": "demo", "stream": True, "max_tokens": 16,
                                        "messages": [{"role": "user", "content": "hi"}]}))
            warmup = min(60.0, SOAK_S / 5)
            load = subprocess.Popen(
                [sys.executable, "-m", "bench.loadgen", "--url",
                 f"{gw.base_url}/v1/chat/completions", "--body-file", str(body),
                 "--header", f"Authorization: Bearer {SECRET}",
                 "--connections", str(CONNECTIONS), "--warmup", str(warmup),
                 "--duration", str(SOAK_S)],
                stdout=subprocess.PIPE, text=True)
            assert load.stdout is not None
            assert load.stdout.readline().strip() == "START"  # the warm-up is over
            start = rss_of(pid)
            samples = [start]
            while load.poll() is None:
                time.sleep(min(30.0, SOAK_S / 10))
                samples.append(rss_of(pid))
            end = rss_of(pid)
            with load.stdout:
                result = json.loads(load.stdout.read().splitlines()[-1])
    finally:
        redis.stop()
    # Under constant load every request is served (a rare 503 of a starved CPU aside).
    assert result["completed"] > 0 and result["ok"] >= 0.99 * result["completed"], result
    grown_mb = (end - start) / 1e6
    bound = BOUND_MB_PER_10_MIN * max(1.0, SOAK_S / 600)
    trace = " ".join(f"{s / 1e6:.1f}" for s in samples)
    print(f"serve RSS {start / 1e6:.1f} -> {end / 1e6:.1f} MB over {result['completed']} "
          f"requests in {SOAK_S:.0f} s (samples: {trace})")
    assert grown_mb < bound, f"RSS grew {grown_mb:.1f} MB (bound {bound} MB): {trace}"
