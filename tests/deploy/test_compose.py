"""deploy/compose.yaml without a Docker engine: it parses, its services, ports and mounted
files agree with each other and with the tokenbooth config it mounts, and the commented
GPU vLLM service is valid compose YAML."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.cli.main import main as tokenbooth
from authz.envoy_config.binary import LOG_FORMAT
from policy.config import Config, load_config, parse_hostport
from tests.deploy.tools import DEPLOY, ROOT

COMPOSE = DEPLOY / "compose.yaml"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def services() -> dict[str, dict[str, Any]]:
    svcs: dict[str, dict[str, Any]] = compose()["services"]
    return svcs


def bind_mounts(svc: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of every bind mount (relative to the compose file)."""
    out = []
    for spec in svc.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith((".", "/")):
            out.append(((COMPOSE.parent / source).resolve(), target))
    return out


def host_path(svc: dict[str, Any], container_path: str) -> Path:
    for source, target in bind_mounts(svc):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / container_path[len(target):].lstrip("/")
    raise AssertionError(f"{container_path} is not bind-mounted")


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def config() -> tuple[Path, Config]:
    svc = services()["tokenbooth"]
    path = host_path(svc, flag(svc["command"], "--config"))
    return path, load_config(path, env={})


def commented_vllm() -> dict[str, Any]:
    """The GPU vLLM service that the file carries commented out, uncommented."""
    text = COMPOSE.read_text()
    block = re.search(r"^  # vllm:\n((?:  #.*\n)+)", text, re.M)
    assert block, "no commented vllm service"
    lines = ["vllm:"] + [ln[4:] for ln in block.group(1).splitlines()
                         if ln.startswith("  #   ") or ln == "  #"]
    data: dict[str, Any] = yaml.safe_load("\n".join(lines))["vllm"]
    return data


def test_parses_with_the_expected_services() -> None:
    assert set(services()) == {"envoy", "tokenbooth", "redis", "vllm"}
    assert set(compose()["volumes"]) == {"redis", "spool"}


def test_depends_on_and_named_volumes_exist() -> None:
    svcs = services()
    for name, svc in svcs.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in svcs, (name, dep)
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in svcs[dep], (name, dep)
        for spec in svc.get("volumes", []):
            source = spec.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose()["volumes"], (name, source)


def test_mounted_files_and_build_context_exist() -> None:
    for name, svc in services().items():
        for source, _ in bind_mounts(svc):
            assert source.exists(), (name, source)
    build = services()["envoy"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT and (context / build["dockerfile"]).is_file()


def test_one_image_for_envoy_services_and_simulator() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    svcs = services()
    images = {svcs[n]["image"] for n in ("envoy", "tokenbooth", "vllm")}
    assert images == {f"tokenbooth:{version}"}
    assert svcs["envoy"]["entrypoint"] == ["envoy"]
    assert svcs["tokenbooth"]["command"][0] == "serve"
    assert svcs["vllm"]["command"][0] == "sim"
    for name in ("envoy", "tokenbooth", "vllm"):
        assert svcs[name]["read_only"] is True and svcs[name]["cap_drop"] == ["ALL"]


def test_config_passes_check_config(capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = config()
    assert tokenbooth(["check-config", str(path)]) == 0
    assert "ok" in capsys.readouterr().out
    env = services()["tokenbooth"]["environment"]
    assert host_path(services()["tokenbooth"], env["TOKENBOOTH_CONFIG"]) == path


def test_envoy_bootstrap_is_rendered_from_the_config(
        capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = config()
    envoy = services()["envoy"]
    bootstrap = host_path(envoy, flag(envoy["command"], "--config-path"))
    assert tokenbooth(["envoy", "render", "--config", str(path)]) == 0
    assert bootstrap.read_text() == capsys.readouterr().out, (
        f"{bootstrap.relative_to(ROOT)} is stale: run `make deploy-render`")


def test_addresses_are_compose_services() -> None:
    _, cfg = config()
    svcs = services()
    # Envoy's listener is what the host publishes.
    published = [p.rsplit(":", 1)[1] for p in svcs["envoy"]["ports"]]
    assert published == [str(parse_hostport(cfg.listen)[1])]
    # The services, as Envoy reaches them.
    assert cfg.envoy.services_address is not None
    host, port = parse_hostport(cfg.envoy.services_address)
    assert host == "tokenbooth" and port == parse_hostport(cfg.services.grpc_listen)[1]
    # The backend: the `vllm` service, on the port the simulator listens on.
    (model,) = cfg.models.values()
    (backend,) = model.backends
    sim = svcs["vllm"]["command"]
    assert (backend.host, backend.port) == ("vllm", parse_hostport(flag(sim, "--listen"))[1])
    assert model.upstream_model in sim
    # State: the `redis` service.
    assert cfg.state == "redis://redis:6379/0"
    # The health check asks the side port the config opens.
    check = " ".join(svcs["tokenbooth"]["healthcheck"]["test"])
    assert f"127.0.0.1:{parse_hostport(cfg.services.http_listen)[1]}/readyz" in check
    # data_dir is a named volume: the spool survives a restart.
    assert f"spool:{cfg.data_dir}" in svcs["tokenbooth"]["volumes"]


def test_commented_gpu_vllm_service() -> None:
    vllm = commented_vllm()
    (device,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert not vllm["image"].endswith(":latest") and ":" in vllm["image"]
    _, cfg = config()
    (backend,) = next(iter(cfg.models.values())).backends
    args = vllm["command"]
    assert shlex.join(args[-4:]) == f"--host 0.0.0.0 --port {backend.port}"
    assert vllm["volumes"][0].split(":")[0] == "hf-cache"
    assert "# hf-cache: {}" in COMPOSE.read_text()


def test_redis_loses_no_acknowledged_write() -> None:
    cmd = services()["redis"]["command"]
    opts = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert opts == {"--appendonly": "yes", "--appendfsync": "always"}


def test_envoy_logs_json_lines_as_the_services_do() -> None:
    """Envoy's own lines were plain text among the services' JSON (newcomer tester)."""
    assert flag(services()["envoy"]["command"], "--log-format") == LOG_FORMAT
