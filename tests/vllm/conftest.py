"""Real-vLLM tier: one CPU vLLM server per session (random weights), behind Envoy + tokenbooth.

vLLM lives in its own venv (`make vllm-venv` builds `.venv-vllm`; TOKENBOOTH_VLLM_PYTHON
points elsewhere). Without it these tests are skipped, unless TOKENBOOTH_REQUIRE_VLLM=1
(set by `make test`), which turns the absence into a failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from authz.runtime.procs import http_ok, spawn, stop, wait_until
from tests.e2e.conftest import Gateway, run_gateway
from tests.helpers import free_port, policy_dict

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama"
EMBED_MODEL = "tiny-embed"
LONG_TOKENS = 480
# vLLM's own token counters; their sums over all label sets are compared with the records.
COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")


def vllm_python() -> Path | None:
    env = os.environ.get("TOKENBOOTH_VLLM_PYTHON")
    path = Path(env) if env else ROOT / ".venv-vllm" / "bin" / "python"
    return path if path.exists() else None


@dataclass
class VllmServer:
    url: str
    log: Path

    def counters(self) -> dict[str, float]:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as r:
            text = r.read().decode()
        return {name: _metric_sum(text, name) for name in COUNTERS}

    def post(self, path: str, body: dict[str, Any]) -> bytes:
        """A request straight to vLLM, bypassing the gateway: vLLM's own answer."""
        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            data: bytes = r.read()
        return data


def _metric_sum(text: str, name: str) -> float:
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", re.MULTILINE)
    return sum(float(m.group(1)) for m in pattern.finditer(text))


def _require_python() -> Path:
    python = vllm_python()
    if python is None:
        msg = "no vLLM venv: run `make vllm-venv` (or set TOKENBOOTH_VLLM_PYTHON)"
        if os.environ.get("TOKENBOOTH_REQUIRE_VLLM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return python


@dataclass
class Booting:
    """A vLLM server spawned and not yet known to answer."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def ready(self) -> VllmServer:
        try:
            wait_until(lambda: http_ok(f"{self.url}/health"), "vLLM", timeout=420,
                       alive=[self.proc])
        except Exception:
            print(self.log.read_text(errors="replace")[-4000:])
            raise
        return VllmServer(self.url, self.log)


def spawn_vllm(root: Path, served: list[str], *flags: str) -> Booting:
    """A vLLM server of the tiny model made in `root`, serving it as `served`, started."""
    python = _require_python()
    model = root / "model"
    subprocess.run([str(python), str(Path(__file__).with_name("make_model.py")), str(model)],
                   check=True, timeout=120)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING"}
    log = root / "vllm.log"
    with log.open("wb") as out:
        proc = spawn([str(python), "-m", "vllm.entrypoints.openai.api_server",
                      "--model", str(model), "--served-model-name", *served, *flags,
                      "--load-format", "dummy", "--max-model-len", "512",
                      "--dtype", "bfloat16", "--enforce-eager", "--max-num-seqs", "8",
                      "--host", "127.0.0.1", "--port", str(port)],
                     env=env, stdout=out, stderr=subprocess.STDOUT)
    return Booting(proc, f"http://127.0.0.1:{port}", log)


@pytest.fixture(scope="session")
def vllm_boot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Booting]]:
    """Both servers of the tier spawned at once, the first time a test needs either:
    each start is about a minute, much of it one thread (imports, the dummy load), so
    on two cores they overlap (CI time: they started one after the other)."""
    booting = {"generate": spawn_vllm(tmp_path_factory.mktemp("vllm"),
                                      [MODEL, "tiny-llama-2"])}
    try:
        # The same tiny Llama as an embedding model (vLLM 0.32's pooling runner,
        # last-token pooling): embeddings, and score / rerank as a bi-encoder.
        booting["embed"] = spawn_vllm(tmp_path_factory.mktemp("vllm-embed"), [EMBED_MODEL],
                                      "--runner", "pooling", "--convert", "embed")
        yield booting
    finally:
        stop([b.proc for b in booting.values()])


@pytest.fixture(scope="session")
def vllm_server(vllm_boot: dict[str, Booting]) -> VllmServer:
    return vllm_boot["generate"].ready()


@pytest.fixture(scope="session")
def vllm_embed_server(vllm_boot: dict[str, Booting]) -> VllmServer:
    return vllm_boot["embed"].ready()


@pytest.fixture(scope="session")
def vllm_embed_gateway(vllm_embed_server: VllmServer,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Envoy + tokenbooth serve in front of the embedding server: `demo` and `other`
    serve EMBED_MODEL; `demo` knows the context length (the bound's cap)."""
    models: Any = policy_dict(vllm_embed_server.url)["models"]
    for alias in ("demo", "other"):
        models[alias]["upstream_model"] = EMBED_MODEL
    models["demo"]["max_model_len"] = 512
    with run_gateway(tmp_path_factory.mktemp("gateway-vllm-embed"),
                     upstream=vllm_embed_server.url, models=models) as gw:
        yield gw


@pytest.fixture(scope="session")
def vllm_gateway(vllm_server: VllmServer,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Envoy + tokenbooth serve, every alias routed to the real vLLM; `long` allows
    generations near the model's 512-token context (slow enough to be cut mid-way)."""
    models: Any = policy_dict(vllm_server.url)["models"]
    models["long"] = {**models["demo"], "max_tokens": LONG_TOKENS}
    with run_gateway(tmp_path_factory.mktemp("gateway-vllm"), upstream=vllm_server.url,
                     models=models) as gw:
        yield gw
