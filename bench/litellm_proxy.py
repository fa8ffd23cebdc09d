"""Configuration C: LiteLLM's proxy doing the same job, from its own venv.

`make bench-litellm-venv` creates `bench/.venv-litellm` with `litellm[proxy]`; it is
never installed into tokenbooth's `.venv`. The proxy gets:

- the sim as an OpenAI-compatible model under the alias `demo` (the same prices);
- a master key, and the bench key through a `custom_auth` hook (`bench/litellm_auth.py`)
  that returns the key with its RPM, TPM and budget — LiteLLM's virtual keys
  (`/key/generate`) need PostgreSQL through Prisma, whose engine binaries LiteLLM
  downloads at start-up from a host this machine cannot reach;
- `custom_auth_run_common_checks`, so LiteLLM enforces that key's limits and budget as
  for a virtual key, with its counters and spend in Redis (`coordination_redis`);
- as many uvicorn workers as cores (`--num_workers`), as LiteLLM's docs advise.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from authz.runtime.procs import PortAllocator, http_ok, spawn, stop, wait_until
from bench.gateways import ALIAS, KEY_LIMITS, SECRET, UPSTREAM_MODEL, Gateway

VENV = Path(__file__).resolve().parent / ".venv-litellm"
MASTER_KEY = "sk-bench-litellm-master-0123456789"

_PORTS = PortAllocator()  # one allocator: ports picked together never repeat


def available() -> bool:
    return (VENV / "bin" / "litellm").exists()


def version() -> str:
    out = subprocess.run([str(VENV / "bin" / "python"), "-c",
                          "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def write_config(workdir: Path, sim_url: str, redis_url: str) -> Path:
    redis = urlsplit(redis_url)
    config = {
        "model_list": [{
            "model_name": ALIAS,
            "litellm_params": {
                "model": f"openai/{UPSTREAM_MODEL}",
                "api_base": f"{sim_url}/v1",
                "api_key": "none",
                # tokenbooth's prices: 0.50 / 1.50 USD per 1k tokens.
                "input_cost_per_token": 0.0005,
                "output_cost_per_token": 0.0015,
            },
        }],
        "general_settings": {
            "master_key": MASTER_KEY,
            "custom_auth": "litellm_auth.user_api_key_auth",
            "custom_auth_run_common_checks": True,
            "coordination_redis": {"host": redis.hostname, "port": redis.port},
        },
    }
    shutil.copy(Path(__file__).with_name("litellm_auth.py"), workdir / "litellm_auth.py")
    path = workdir / "litellm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_litellm(run_dir: Path, sim_url: str, redis_url: str, workers: int) -> Gateway:
    workdir = run_dir / "C"
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir, sim_url, redis_url)
    port = _PORTS.free_port()
    env = {
        **os.environ,  # spawn(env=...) is the whole environment
        "BENCH_KEY_SHA256": hashlib.sha256(SECRET.encode()).hexdigest(),
        "BENCH_KEY_RPM": str(KEY_LIMITS["rpm"]),
        "BENCH_KEY_TPM": str(KEY_LIMITS["tpm"]),
        "BENCH_KEY_BUDGET_USD": str(KEY_LIMITS["budget_usd"]),
        # The cost map ships in the wheel; do not fetch it, send no telemetry.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "PYTHONPATH": str(workdir),
    }
    with (workdir / "litellm.log").open("wb") as log:
        proc = spawn([str(VENV / "bin" / "litellm"), "--config", str(config), "--host",
                      "127.0.0.1", "--port", str(port), "--num_workers", str(workers)],
                     env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{url}/health/liveliness"), "litellm proxy", timeout=120,
                   alive=[proc])
    except BaseException:
        stop([proc])
        raise
    return Gateway("C", f"{url}/v1/chat/completions", [f"Authorization: Bearer {SECRET}"],
                   [proc], {"python": [proc.pid]})
