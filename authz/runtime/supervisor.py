"""`tokenbooth up`: Envoy + tokenbooth services + (without --upstream) the simulator.

Every child runs in its own session and dies with the supervisor; Ctrl-C or
SIGTERM stops them all, and so does any one of them exiting.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from authz.envoy_config.binary import envoy_path
from authz.envoy_config.bootstrap import render_yaml
from authz.runtime.defaults import read_demo_key, write_default_config
from authz.runtime.overrides import Overrides
from authz.runtime.procs import PortAllocator, http_ok, spawn, stop, wait_until
from authz.runtime.settings import Settings
from policy.config import Config
from policy.keys import fingerprint


class _Stop(Exception):
    pass


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _self(*args: str) -> list[str]:
    return [sys.executable, "-m", "authz.cli", *args]


def run_up(config_path: Path, listen: str | None, upstream: str | None, create: bool,
           settings: Settings) -> int:
    """Start the simulator (without `upstream`), the services and Envoy; run until a
    signal or until one of them exits. Children inherit this process's environment."""
    fresh_secret = None
    if not config_path.exists():
        if not create:
            raise FileNotFoundError(f"{config_path}: no such config file")
        fresh_secret = write_default_config(config_path)
        print(f"wrote a default config to {config_path}", flush=True)
    cfg = settings.load_config(config_path)
    run_dir = cfg.data_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if upstream is None:
            upstream = _start_sim(cfg, PortAllocator(), procs)
        eff = Overrides(listen, upstream).apply(cfg)
        _start_services(eff, config_path, listen, upstream, procs)
        _start_envoy(eff, run_dir / "envoy.yaml", procs)
        _banner(eff, config_path, fresh_secret, upstream)
        while all(p.poll() is None for p in procs):
            time.sleep(0.2)
        dead = next(p for p in procs if p.returncode is not None)
        print(f"tokenbooth: error: a child process (pid {dead.pid}) exited with status "
              f"{dead.returncode}; stopping the rest", file=sys.stderr)
        return 1
    except _Stop:
        print("\nstopping…", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop(procs)


def _start_sim(cfg: Config, ports: PortAllocator, procs: list[subprocess.Popen[bytes]]) -> str:
    """The simulator serving every upstream model of the config; returns its URL."""
    port = ports.free_port()
    url = f"http://127.0.0.1:{port}"
    sim_args = ["sim", "--listen", f"127.0.0.1:{port}"]
    for m in sorted({m.upstream_model for m in cfg.models.values()}):
        sim_args += ["--model", m]
    procs.append(spawn(_self(*sim_args)))
    wait_until(lambda: http_ok(f"{url}/health"), "simulator", alive=procs)
    return url


def _start_services(eff: Config, config_path: Path, listen: str | None, upstream: str,
                    procs: list[subprocess.Popen[bytes]]) -> None:
    serve_args = ["serve", "--config", str(config_path), "--upstream", upstream]
    if listen:
        serve_args += ["--listen", listen]
    procs.append(spawn(_self(*serve_args)))
    side = f"http://{eff.services.http_listen}"
    wait_until(lambda: http_ok(f"{side}/readyz"), "tokenbooth services", alive=procs)


def _start_envoy(eff: Config, envoy_yaml: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    envoy_yaml.write_text(render_yaml(eff))
    procs.append(
        spawn([str(envoy_path()), "-c", str(envoy_yaml), "--log-level", "warn",
               "--use-dynamic-base-id"])
    )
    admin = f"http://{eff.envoy.admin_listen}"
    wait_until(lambda: http_ok(f"{admin}/ready"), "envoy", timeout=60, alive=procs)


def _banner(cfg: Config, config_path: Path, secret: str | None, upstream: str) -> None:
    scheme = "https" if cfg.tls else "http"
    base = f"{scheme}://{cfg.listen}"
    secret = secret or read_demo_key(config_path)
    known = {k.sha256 for k in cfg.keys if k.status == "active"}
    alias = sorted(cfg.models)[0]
    print(f"\ntokenbooth is up on {base}  (upstream: {upstream})", flush=True)
    if secret and fingerprint(secret) in known:
        print(f"  demo API key: {secret}")
        print("  try:")
        print(
            f"    curl -s {base}/v1/chat/completions -H 'Authorization: Bearer {secret}' "
            "-H 'Content-Type: application/json' "
            f"-d '{{\"model\":\"{alias}\",\"messages\":[{{\"role\":\"user\","
            "\"content\":\"Hello!\"}]}'"
        )
    else:
        print(f"  (no demo key: add a key to {config_path})")
    print(f"  config: {config_path}   metrics: http://{cfg.services.http_listen}/metrics")
    print("  Ctrl-C stops everything.", flush=True)
