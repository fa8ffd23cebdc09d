"""End-to-end tier: real Envoy + `tokenbooth serve` + `tokenbooth sim`, on free ports.

One gateway per test session. Tests drive it with the official `openai` SDK
and look at what the simulator (the upstream) received.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from authz.envoy_config.binary import envoy_path
from authz.envoy_config.bootstrap import render_dict, render_yaml
from authz.runtime.procs import http_ok, spawn, stop, wait_until
from policy.config import load_config
from tests.helpers import SECRET, free_port, write_policy
from tests.redis_server import RedisServer


@dataclass
class Gateway:
    base_url: str
    sim_url: str
    side_url: str
    config_path: Path
    data_dir: Path
    logs: Path
    _clients: dict[str, openai.OpenAI] = field(default_factory=dict)

    def client(self, key: str = SECRET) -> openai.OpenAI:
        """One SDK client per key for the session (closed at the end)."""
        if key not in self._clients:
            self._clients[key] = openai.OpenAI(
                base_url=f"{self.base_url}/v1", api_key=key, max_retries=0)
        return self._clients[key]

    def close(self) -> None:
        for c in self._clients.values():
            c.close()

    def upstream_requests(self) -> list[dict[str, Any]]:
        """What the simulator received from clients through Envoy, in order: Envoy's own
        health checks of `/health` left out (one may land at any moment)."""
        with urllib.request.urlopen(f"{self.sim_url}/_sim/requests", timeout=5) as r:
            data: list[dict[str, Any]] = json.loads(r.read())
        return [r for r in data if r["path"] != "/health"]

    def clear_upstream(self) -> None:
        req = urllib.request.Request(f"{self.sim_url}/_sim/requests", method="DELETE")
        with urllib.request.urlopen(req, timeout=5):
            pass


@contextlib.contextmanager
def run_gateway(root: Path, extra_backends: list[dict[str, Any]] | None = None,
                sim_weight: int = 1, upstream: str | None = None,
                envoy: dict[str, Any] | None = None,
                demo: dict[str, Any] | None = None,
                edit_bootstrap: Callable[[dict[str, Any]], None] | None = None,
                more_models: dict[str, Any] | None = None,
                **policy: Any) -> Iterator[Gateway]:
    """Envoy + `tokenbooth serve` + `tokenbooth sim` on free ports, stopped on exit.
    `extra_backends` join the sim as weighted backends of the `demo` alias; with
    `upstream` (a running vLLM, say) no sim is started and every alias routes there.
    `envoy`: settings of the config's `envoy:` section (route_timeout_s, say) beside
    the admin port chosen here. `demo`: settings added to the `demo` model.
    `edit_bootstrap`: changes the rendered bootstrap (as data) before Envoy reads it.
    `more_models`: aliases added beside `demo` and `other`."""
    logs = root / "logs"
    logs.mkdir()
    sim_port = free_port()
    sim_url = upstream or f"http://127.0.0.1:{sim_port}"
    listen = f"127.0.0.1:{free_port()}"
    path = write_policy(
        root, sim_url, listen=listen,
        services={"grpc_listen": f"127.0.0.1:{free_port()}",
                  "http_listen": f"127.0.0.1:{free_port()}"},
        envoy={**(envoy or {}), "admin_listen": f"127.0.0.1:{free_port()}"},
        **policy,
    )
    if extra_backends or demo or more_models:
        data = yaml.safe_load(path.read_text())
        data["models"].update(more_models or {})
        if extra_backends:
            data["models"]["demo"]["backends"] = [{"url": sim_url, "weight": sim_weight},
                                                  *extra_backends]
        data["models"]["demo"].update(demo or {})
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = load_config(path)
    if edit_bootstrap is None:
        (root / "envoy.yaml").write_text(render_yaml(cfg))
    else:
        bootstrap = render_dict(cfg)
        edit_bootstrap(bootstrap)
        (root / "envoy.yaml").write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    py = [sys.executable, "-m", "authz.cli"]
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, argv: list[str]) -> None:
        # The child keeps its own copy of the log's descriptor.
        with (logs / f"{name}.log").open("wb") as log:
            procs.append(spawn(argv, stdout=log, stderr=subprocess.STDOUT))

    try:
        if upstream is None:
            start("sim", [*py, "sim", "--listen", f"127.0.0.1:{sim_port}", "--model",
                          "tiny-llama", "--model", "tiny-llama-2"])
        start("serve", [*py, "serve", "--config", str(path)])
        start("envoy", [str(envoy_path()), "-c", str(root / "envoy.yaml"),
                        "--log-level", "warn", "--use-dynamic-base-id"])
        side = f"http://{cfg.services.http_listen}"
        try:
            wait_until(lambda: http_ok(f"{sim_url}/health"), "sim", alive=procs)
            wait_until(lambda: http_ok(f"{side}/readyz"), "serve", alive=procs)
            wait_until(lambda: http_ok(f"http://{cfg.envoy.admin_listen}/ready"), "envoy",
                       timeout=60, alive=procs)
            # The backend cluster turns healthy after its first active health check.
            wait_until(lambda: _backend_healthy(f"http://{cfg.envoy.admin_listen}"),
                       "backend health", timeout=30, alive=procs)
        except (RuntimeError, TimeoutError) as e:
            # A CI log shows only the test's output: say what the processes said.
            raise RuntimeError(f"{e}\n{log_tails(logs)}") from e
        gw = Gateway(f"http://{listen}", sim_url, side, path, cfg.data_dir, logs)
        try:
            yield gw
        finally:
            gw.close()
    finally:
        stop(procs)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The embedded state backend."""
    with run_gateway(tmp_path_factory.mktemp("gateway")) as gw:
        yield gw


@pytest.fixture(scope="session")
def redis_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The Redis state backend, with a redis-server of its own."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        with run_gateway(tmp_path_factory.mktemp("gateway-redis"), state=server.url) as gw:
            yield gw
    finally:
        server.stop()


def log_tails(logs: Path, lines: int = 30) -> str:
    """The last lines of every log under `logs`, each under its file's name."""
    out = []
    for f in sorted(logs.glob("*.log")):
        tail = f.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {f.name} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(out)


def _backend_healthy(admin: str) -> bool:
    try:
        with urllib.request.urlopen(f"{admin}/clusters", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return False
    return any(line.startswith("model_") and "health_flags::healthy" in line
               for line in text.splitlines())
