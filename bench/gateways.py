"""The configurations under test, started through tokenbooth's own commands.

- A: bare Envoy — the bootstrap `tokenbooth envoy render` produces, with ext_authz,
  ext_proc (and the body-limit buffer in front of them) taken out and the route pointing
  straight at the backend cluster: the same listener, HCM and router.
- F: the rendered bootstrap unchanged, served by the no-op servicers of `bench.noop`.
- B: the rendered bootstrap and `tokenbooth serve`, state embedded (`memory`) or in Redis.
- C: LiteLLM's proxy (see `bench.litellm`).

Every gateway reaches the same `tokenbooth sim` upstream. Each one reports the process
trees whose CPU is charged to it and a function that reads its cumulative counters.
"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from authz.envoy_config.binary import envoy_path
from authz.envoy_config.xds_resources import with_static_models
from authz.runtime.procs import PortAllocator, http_ok, spawn, stop, wait_until
from policy.config import load_config
from policy.keys import fingerprint
from policy.routing import model_cluster_name

ALIAS = "demo"
UPSTREAM_MODEL = "tiny-llama"
SECRET = "sk-tb-bench-0123456789abcdefghijklmnopqrstuvwxyz"
# Generous limits, so nothing is denied, but every limit is configured and checked.
KEY_LIMITS: dict[str, Any] = {
    "rpm": 10**9, "tpm": 10**12, "max_concurrent": 100_000,
    "budget_usd": "1000000", "budget_period": "total",
}
_PY = [sys.executable, "-m", "authz.cli"]
Counters = Callable[[], dict[str, float]]

_PORTS = PortAllocator()  # one allocator: ports picked together never repeat


@dataclass
class Gateway:
    name: str
    url: str  # the chat completions URL clients call
    headers: list[str]
    procs: list[subprocess.Popen[bytes]]
    cpu_groups: dict[str, list[int]]  # "envoy" / "python" → root pids of process trees
    counters: Counters = field(default=lambda: {})

    def stop(self) -> None:
        stop(self.procs)


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # local URL
        body: bytes = r.read()
    return body


def start_sim(logs: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """The upstream: `tokenbooth sim`, zero time to first token and per output token."""
    port = _PORTS.free_port()
    url = f"http://127.0.0.1:{port}"
    with (logs / "sim.log").open("wb") as log:
        proc = spawn([*_PY, "sim", "--listen", f"127.0.0.1:{port}", "--model", UPSTREAM_MODEL,
                      "--model", ALIAS, "--ttft-ms", "0", "--tpot-ms", "0"],
                     stdout=log, stderr=subprocess.STDOUT)
    wait_until(lambda: http_ok(f"{url}/health"), "sim", alive=[proc])
    return url, proc


def write_policy(directory: Path, sim_url: str, state: str = "memory",
                 model: dict[str, Any] | None = None,
                 envoy: dict[str, Any] | None = None) -> Path:
    """A tokenbooth config on free ports: one alias on the sim (with `model`'s settings
    added), one key with limits."""
    directory.mkdir(parents=True, exist_ok=True)
    policy = {
        "listen": f"127.0.0.1:{_PORTS.free_port()}",
        "state": state,
        "data_dir": str(directory / "data"),
        "services": {"grpc_listen": f"127.0.0.1:{_PORTS.free_port()}",
                     "http_listen": f"127.0.0.1:{_PORTS.free_port()}"},
        "envoy": {"admin_listen": f"127.0.0.1:{_PORTS.free_port()}", **(envoy or {})},
        "models": {ALIAS: {
            "upstream_model": UPSTREAM_MODEL,
            "backends": [{"url": sim_url}],
            "price_per_1k_tokens": {"input": "0.50", "output": "1.50"},
            "max_tokens": 1024,
            **(model or {}),
        }},
        "keys": [{"id": "bench", "org": "bench-org", "sha256": fingerprint(SECRET),
                  **KEY_LIMITS}],
    }
    path = directory / "tokenbooth.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def render(config: Path) -> dict[str, Any]:
    """The bootstrap exactly as `tokenbooth envoy render` prints it."""
    out = subprocess.run([*_PY, "envoy", "render", "--config", str(config)],
                         capture_output=True, check=True).stdout
    data: dict[str, Any] = yaml.safe_load(out)
    return data


def render_static(config: Path) -> dict[str, Any]:
    """The bootstrap with the model clusters static: for an Envoy without tokenbooth's
    services, whose ADS would otherwise give it its clusters."""
    return with_static_models(render(config), load_config(config))


def bare(bootstrap: dict[str, Any]) -> dict[str, Any]:
    """A from the rendered bootstrap: only the router filter; the routes that take their
    cluster from a header (which the services would set) name the backend's instead."""
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    conf = hcm["typed_config"]
    conf["http_filters"] = [f for f in conf["http_filters"]
                            if f["name"] == "envoy.filters.http.router"]
    rewired = 0
    for vhost in conf["route_config"]["virtual_hosts"]:
        for route in vhost["routes"]:
            route.pop("typed_per_filter_config", None)  # for filters that are gone
            # No ext_proc, so no metadata for a route to wait for.
            route.get("match", {}).pop("dynamic_metadata", None)
            action = route.get("route", {})
            if "cluster_header" in action:
                del action["cluster_header"]
                action["cluster"] = model_cluster_name(ALIAS)
                rewired += 1
    if not rewired:
        raise RuntimeError("bench: no route with cluster_header in the rendered bootstrap")
    return bootstrap


def _admin(bootstrap: dict[str, Any]) -> str:
    sock = bootstrap["admin"]["address"]["socket_address"]
    return f"http://{sock['address']}:{sock['port_value']}"


def _listener(bootstrap: dict[str, Any]) -> str:
    sock = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]
    return f"http://{sock['address']}:{sock['port_value']}"


def backend_healthy(admin: str) -> bool:
    try:
        text = get(f"{admin}/clusters", timeout=2).decode()
    except OSError:
        return False
    return any(line.startswith("model_") and "health_flags::healthy" in line
               for line in text.splitlines())


def start_envoy(bootstrap: dict[str, Any], workdir: Path, name: str,
                others: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    path = workdir / f"envoy-{name}.yaml"
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    with (workdir / f"envoy-{name}.log").open("wb") as log:
        # The access log goes to stdout: discarded, but formatted, in every configuration.
        proc = spawn([str(envoy_path()), "-c", str(path), "--log-level", "warn",
                      "--use-dynamic-base-id"], stdout=subprocess.DEVNULL, stderr=log)
    admin = _admin(bootstrap)
    alive = [*others, proc]
    wait_until(lambda: http_ok(f"{admin}/ready"), f"envoy ({name})", timeout=60, alive=alive)
    wait_until(lambda: backend_healthy(admin), f"backend health ({name})", timeout=30,
               alive=alive)
    return proc


_ENVOY_STAT = re.compile(rb"^http\.ingress\.(ext_proc\.stream_msgs_sent|ext_authz\.ok|"
                         rb"ext_proc\.streams_started): (\d+)$", re.M)


def envoy_counters(admin: str) -> dict[str, float]:
    """Messages Envoy sent to the services, from its own stats."""
    text = get(f"{admin}/stats?filter=^http\\.ingress\\.ext_")
    out = {f"envoy.{m.group(1).decode()}": float(m.group(2)) for m in _ENVOY_STAT.finditer(text)}
    return out


def start_bare(run_dir: Path, sim_url: str) -> Gateway:
    workdir = run_dir / "A"
    bootstrap = bare(render_static(write_policy(workdir, sim_url)))
    envoy = start_envoy(bootstrap, workdir, "A", [])
    return Gateway("A", f"{_listener(bootstrap)}/v1/chat/completions",
                   [f"Authorization: Bearer {SECRET}"], [envoy], {"envoy": [envoy.pid]})


Patch = Callable[[dict[str, Any]], dict[str, Any]]


def start_noop(run_dir: Path, sim_url: str, name: str = "F", patch: Patch | None = None,
               noop_args: Sequence[str] = (), envoy: dict[str, Any] | None = None) -> Gateway:
    """F; `patch` changes the bootstrap and `noop_args` the servicers (bench/levers.py).
    Unpatched, F hands streams over to Envoy's meter where tokenbooth would."""
    workdir = run_dir / name
    config = write_policy(workdir, sim_url, envoy=envoy)
    bootstrap = render_static(config)
    if patch is not None:
        bootstrap = patch(bootstrap)
    elif load_config(config).envoy.meters_streams:
        noop_args = [*noop_args, "--envoy-meters"]
    policy = yaml.safe_load(config.read_text())
    side = f"http://{policy['services']['http_listen']}"
    with (workdir / "noop.log").open("wb") as log:
        noop = spawn([sys.executable, "-m", "bench.noop",
                      "--grpc", policy["services"]["grpc_listen"],
                      "--side", policy["services"]["http_listen"],
                      "--cluster", model_cluster_name(ALIAS), *noop_args],
                     stdout=log, stderr=subprocess.STDOUT)
    procs = [noop]
    try:
        wait_until(lambda: http_ok(f"{side}/readyz"), "no-op servicers", alive=procs)
        procs.append(start_envoy(bootstrap, workdir, name, procs))
    except BaseException:
        stop(procs)
        raise
    admin = _admin(bootstrap)

    def counters() -> dict[str, float]:
        counts = orjson.loads(get(f"{side}/counts"))
        return {**envoy_counters(admin), **{f"grpc.{k}": float(v) for k, v in counts.items()}}

    return Gateway(name, f"{_listener(bootstrap)}/v1/chat/completions",
                   [f"Authorization: Bearer {SECRET}"], procs,
                   {"envoy": [procs[1].pid], "python": [noop.pid]}, counters)


_DECISIONS = re.compile(rb'^tokenbooth_decision_seconds_count\{service="(ext_authz|ext_proc)"\} '
                        rb"([0-9.e+]+)$", re.M)


def tokenbooth_counters(side: str) -> dict[str, float]:
    """Messages tokenbooth answered, by service (its decision-time histogram's counts)."""
    text = get(f"{side}/metrics")
    return {f"grpc.{m.group(1).decode()}": float(m.group(2)) for m in _DECISIONS.finditer(text)}


def start_tokenbooth(run_dir: Path, sim_url: str, state: str, name: str,
                     model: dict[str, Any] | None = None,
                     envoy: dict[str, Any] | None = None) -> Gateway:
    workdir = run_dir / name
    config = write_policy(workdir, sim_url, state, model, envoy)
    bootstrap = render(config)
    policy = yaml.safe_load(config.read_text())
    side = f"http://{policy['services']['http_listen']}"
    with (workdir / "serve.log").open("wb") as log:
        serve = spawn([*_PY, "serve", "--config", str(config), "--log-level", "warning"],
                      stdout=log, stderr=subprocess.STDOUT)
    procs = [serve]
    try:
        wait_until(lambda: http_ok(f"{side}/readyz"), "tokenbooth serve", alive=procs)
        procs.append(start_envoy(bootstrap, workdir, name, procs))
    except BaseException:
        stop(procs)
        raise
    admin = _admin(bootstrap)

    def counters() -> dict[str, float]:
        return {**envoy_counters(admin), **tokenbooth_counters(side)}

    return Gateway(name, f"{_listener(bootstrap)}/v1/chat/completions",
                   [f"Authorization: Bearer {SECRET}"], procs,
                   {"envoy": [procs[1].pid], "python": [serve.pid]}, counters)
