"""deploy/k8s: the tokenbooth config in each pattern's ConfigMap passes `tokenbooth
check-config`, Envoy's bootstrap is rendered from it (fresh, and valid to the real
Envoy), and the config's addresses, ports, paths and timeouts agree with the manifests."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from authz.cli.main import main as tokenbooth
from authz.envoy_config.binary import LOG_FORMAT
from authz.envoy_config.bootstrap import render_dict
from authz.envoy_config.xds_resources import model_cluster_dicts
from authz.runtime.settings import ADMIN_TOKEN_ENV
from policy.config import REDIS_PASSWORD_ENV, Config, load_config, parse_hostport
from policy.routing import model_cluster_name
from tests.deploy.kube import Build, Doc, Pod, container_port
from tests.deploy.tools import K8S
from tests.envoy_config.test_bootstrap import envoy_validate
from tests.tls import make_test_ca

PATTERNS = ("ingress", "sidecar")
SERVICES_GRACE_S = 10  # `tokenbooth serve` lets in-flight streams finish this long


def configmap(b: Build, prefix: str) -> Doc:
    """A generated ConfigMap (its name may carry kustomize's hash suffix)."""
    (cm,) = [d for d in b.of_kind("ConfigMap") if d["metadata"]["name"] == prefix
             or d["metadata"]["name"].startswith(prefix + "-")]
    return cm


def mounted_file(pod: Pod, container: str, path: str) -> tuple[Doc, str]:
    """The volume that provides `path` in a container, and the file's key in it."""
    c = pod.container(container)
    for m in c.get("volumeMounts", []):
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            (vol,) = [v for v in pod.spec["volumes"] if v["name"] == m["name"]]
            return vol, path[len(m["mountPath"].rstrip("/")) + 1:]
    raise AssertionError(f"{pod.name}/{container}: nothing mounted at {path}")


@pytest.fixture(scope="module")
def configs(builds: dict[str, Build], tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, tuple[Path, Config]]:
    """Each pattern's config, as the pods will read it (from the built ConfigMap)."""
    out = {}
    for name in PATTERNS:
        path = tmp_path_factory.mktemp(name) / "config.yaml"
        path.write_text(configmap(builds[name], "tokenbooth-config")["data"]["config.yaml"])
        out[name] = (path, load_config(path, env={}))
    return out


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = tokenbooth(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.mark.parametrize("name", PATTERNS)
def test_configmap_passes_check_config(configs: dict[str, tuple[Path, Config]], name: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = configs[name]
    assert run_cli(capsys, "check-config", str(path)).startswith(f"{path}: ok (1 model(s)")


@pytest.mark.parametrize("name", PATTERNS)
def test_envoy_bootstrap_is_rendered_from_the_config(
        builds: dict[str, Build], configs: dict[str, tuple[Path, Config]], name: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = configs[name]
    rendered = run_cli(capsys, "envoy", "render", "--config", str(path))
    checked_in = (K8S / "overlays" / name / "config" / "envoy.yaml").read_text()
    assert checked_in == rendered, (
        f"deploy/k8s/overlays/{name}/config/envoy.yaml is stale: run `make deploy-render`")
    assert configmap(builds[name], "envoy-bootstrap")["data"]["envoy.yaml"] == rendered


@pytest.mark.parametrize("name", PATTERNS)
def test_envoy_validates_the_bootstrap(builds: dict[str, Build],
                                       configs: dict[str, tuple[Path, Config]],
                                       name: str, tmp_path: Path) -> None:
    """The real Envoy, with the TLS files the Secret will provide swapped for test ones."""
    _, cfg = configs[name]
    assert cfg.tls is not None
    _, cert, key = make_test_ca(tmp_path)
    text = configmap(builds[name], "envoy-bootstrap")["data"]["envoy.yaml"]
    assert str(cfg.tls.cert) in text and str(cfg.tls.key) in text
    path = tmp_path / "envoy.yaml"
    path.write_text(text.replace(str(cfg.tls.cert), str(cert))
                    .replace(str(cfg.tls.key), str(key)))
    r = envoy_validate(path)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", PATTERNS)
def test_pods_read_the_files_the_config_names(builds: dict[str, Build],
                                              configs: dict[str, tuple[Path, Config]],
                                              name: str) -> None:
    _, cfg = configs[name]
    b = builds[name]
    services_pod = b.pod_with_container("tokenbooth")
    services = services_pod.container("tokenbooth")
    # The config: --config and TOKENBOOTH_CONFIG name the ConfigMap's file.
    config_path = services["args"][services["args"].index("--config") + 1]
    env = {e["name"]: e.get("value") for e in services.get("env", [])}
    assert env["TOKENBOOTH_CONFIG"] == config_path
    vol, key = mounted_file(services_pod, "tokenbooth", config_path)
    assert vol["configMap"]["name"] == "tokenbooth-config" and key == "config.yaml"
    # data_dir: writable (the root filesystem is not).
    vol, _ = mounted_file(services_pod, "tokenbooth", f"{cfg.data_dir}/spool")
    assert "emptyDir" in vol
    # Envoy: its bootstrap from the generated ConfigMap, TLS from the Secret.
    envoy_pod = b.pod_with_container("envoy")
    args = envoy_pod.container("envoy")["args"]
    vol, key = mounted_file(envoy_pod, "envoy", args[args.index("--config-path") + 1])
    assert vol["configMap"]["name"] == configmap(b, "envoy-bootstrap")["metadata"]["name"]
    assert key == "envoy.yaml"
    assert cfg.tls is not None
    for file, secret_key in ((cfg.tls.cert, "tls.crt"), (cfg.tls.key, "tls.key")):
        vol, key = mounted_file(envoy_pod, "envoy", str(file))
        assert (vol["secret"]["secretName"], key) == ("tokenbooth-tls", secret_key)


@pytest.mark.parametrize("name", PATTERNS)
def test_ports_agree_with_the_config(builds: dict[str, Build],
                                     configs: dict[str, tuple[Path, Config]],
                                     name: str) -> None:
    _, cfg = configs[name]
    b = builds[name]
    envoy = b.pod_with_container("envoy").container("envoy")
    services = b.pod_with_container("tokenbooth").container("tokenbooth")
    assert container_port(envoy, "https") == parse_hostport(cfg.listen)[1]
    assert container_port(services, "http") == parse_hostport(cfg.services.http_listen)[1]
    if name == "ingress":
        assert container_port(services, "grpc") == parse_hostport(cfg.services.grpc_listen)[1]
    # The readiness probe and the drain hook talk to the admin port the bootstrap opens.
    admin = cfg.envoy.admin_listen
    assert f"http://{admin}/ready" in " ".join(envoy["readinessProbe"]["exec"]["command"])
    drain = envoy["lifecycle"]["preStop"]["exec"]["command"]
    assert drain[0] == "envoy-drain" and drain[drain.index("--admin") + 1] == admin


@pytest.mark.parametrize("name", PATTERNS)
def test_admin_api_is_served_on_its_port(builds: dict[str, Build],
                                         configs: dict[str, tuple[Path, Config]],
                                         name: str) -> None:
    """admin.listen is the container port `admin` behind the Service tokenbooth-admin,
    on every interface of the pod (the NetworkPolicy closes it); the token comes from
    the Secret tokenbooth-admin, never from the ConfigMap."""
    _, cfg = configs[name]
    b = builds[name]
    pod = b.pod_with_container("tokenbooth")
    services = pod.container("tokenbooth")
    host, port = parse_hostport(cfg.admin.listen)
    assert host == "0.0.0.0"
    assert container_port(services, "admin") == port
    svc = b.get("Service", "tokenbooth-admin")
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(port, "admin")]
    assert cfg.admin.tokens == ()  # fingerprints only, when any; the token is the Secret
    assert _secret_source(pod, "tokenbooth", ADMIN_TOKEN_ENV) == {
        "name": "tokenbooth-admin", "key": "token"}
    text = configmap(b, "tokenbooth-config")["data"]["config.yaml"]
    assert ADMIN_TOKEN_ENV in text and "tokenbooth-admin" in text  # says where it is


def _secret_source(pod: Pod, container: str, var: str) -> Any:
    (env,) = [e for e in pod.container(container)["env"] if e["name"] == var]
    return env["valueFrom"]["secretKeyRef"]


@pytest.mark.parametrize("name", PATTERNS)
def test_state_is_the_redis_service(builds: dict[str, Build],
                                    configs: dict[str, tuple[Path, Config]],
                                    name: str) -> None:
    _, cfg = configs[name]
    b = builds[name]
    url = urlsplit(cfg.state)
    assert url.scheme == "redis" and url.password is None  # never in the ConfigMap
    svc = b.get("Service", "redis")
    ns = svc["metadata"]["namespace"]
    assert url.hostname == f"redis.{ns}.svc.cluster.local"
    assert url.port in [p["port"] for p in svc["spec"]["ports"]]
    redis = Pod(b.get("StatefulSet", "redis"))
    services = b.pod_with_container("tokenbooth")
    assert (_secret_source(services, "tokenbooth", REDIS_PASSWORD_ENV)
            == _secret_source(redis, "redis", "REDIS_PASSWORD"))
    assert "$(REDIS_PASSWORD)" in redis.container("redis")["args"]


def test_ingress_addresses(builds: dict[str, Build],
                           configs: dict[str, tuple[Path, Config]]) -> None:
    """Envoy reaches the services through their headless Service and vLLM through its
    Service's DNS name; the rendered bootstrap says the same."""
    _, cfg = configs["ingress"]
    b = builds["ingress"]
    svc = b.get("Service", "tokenbooth")
    assert svc["spec"]["clusterIP"] == "None"  # one endpoint per pod for Envoy
    assert cfg.envoy.services_address is not None
    host, port = parse_hostport(cfg.envoy.services_address)
    assert host == f"tokenbooth.{svc['metadata']['namespace']}.svc.cluster.local"
    (grpc,) = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
    assert port == grpc["port"]
    assert parse_hostport(cfg.services.grpc_listen)[0] == "0.0.0.0"
    (model,) = cfg.models.values()
    (backend,) = model.backends
    assert (backend.host, backend.port) == ("vllm-gpt-oss-20b.system.svc.cluster.local", 8000)
    # vllm-access admits Envoy to that namespace and port.
    (pol,) = builds["vllm-access"].of_kind("NetworkPolicy")
    assert pol["metadata"]["namespace"] == backend.host.split(".")[1]
    assert [p["port"] for r in pol["spec"]["ingress"] for p in r["ports"]] == [backend.port]
    assert _cluster_addresses(cfg) == {"tokenbooth_services": [(host, port)],
                                       model_cluster_name("gpt-oss-20b"): [
                                           (backend.host, backend.port)]}


def test_sidecar_addresses(builds: dict[str, Build],
                           configs: dict[str, tuple[Path, Config]]) -> None:
    """Everything but Envoy's listener and the side port stays on loopback; the pod's
    containers share one network namespace, so no two of them may take one port."""
    _, cfg = configs["sidecar"]
    pod = builds["sidecar"].pod_with_container("vllm")
    assert cfg.envoy.services_address is None
    grpc = parse_hostport(cfg.services.grpc_listen)
    assert grpc[0] == "127.0.0.1"
    vllm_args = pod.container("vllm")["args"]
    vllm = ("127.0.0.1", int(vllm_args[vllm_args.index("--port") + 1]))
    assert vllm_args[vllm_args.index("--host") + 1] == "127.0.0.1"
    (model,) = cfg.models.values()
    assert [(b.host, b.port) for b in model.backends] == [vllm]
    assert _cluster_addresses(cfg) == {"tokenbooth_services": [grpc],
                                       model_cluster_name("gpt-oss-20b"): [vllm]}
    ports = [parse_hostport(a)[1] for a in (cfg.listen, cfg.envoy.admin_listen,
                                            cfg.services.grpc_listen,
                                            cfg.services.http_listen,
                                            cfg.admin.listen)] + [vllm[1]]
    assert len(set(ports)) == len(ports)
    assert not pod.has_port(vllm[1]) and not pod.has_port(grpc[1])  # not exposed


def _cluster_addresses(cfg: Config) -> dict[str, list[tuple[str, int]]]:
    out = {}
    # The services cluster is static; the model clusters come over ADS.
    for c in [*render_dict(cfg)["static_resources"]["clusters"], *model_cluster_dicts(cfg)]:
        eps = c["load_assignment"]["endpoints"][0]["lb_endpoints"]
        out[c["name"]] = [(e["endpoint"]["address"]["socket_address"]["address"],
                           e["endpoint"]["address"]["socket_address"]["port_value"])
                          for e in eps]
    return out


def _prestop_seconds(container: Doc) -> float:
    cmd = container["lifecycle"]["preStop"]["exec"]["command"]
    if cmd[0] == "sleep":
        return float(cmd[1])
    assert cmd[0] == "envoy-drain"
    return float(cmd[cmd.index("--timeout") + 1])


@pytest.mark.parametrize("name", PATTERNS)
def test_shutdown_lets_generations_finish(builds: dict[str, Build],
                                          configs: dict[str, tuple[Path, Config]],
                                          name: str) -> None:
    """Envoy drains for the route timeout; the services (and the sidecar's workload)
    outlive that drain; the grace period outlives them all."""
    _, cfg = configs[name]
    b = builds[name]
    envoy_pod = b.pod_with_container("envoy")
    drain = _prestop_seconds(envoy_pod.container("envoy"))
    assert drain >= max(cfg.envoy.route_timeout_s, cfg.envoy.max_stream_duration_s)
    for pod in {p.name: p for p in b.pods() if p.name != "StatefulSet/redis"}.values():
        grace = pod.spec["terminationGracePeriodSeconds"]
        for c in pod.spec["containers"]:
            stop = _prestop_seconds(c)
            if c["name"] != "envoy":
                assert stop > drain, (pod.name, c["name"])
            extra = SERVICES_GRACE_S if c["name"] == "tokenbooth" else 0
            assert grace >= stop + extra + 5, (pod.name, c["name"], grace)


def test_certificate_extra_issues_the_tls_secret(builds: dict[str, Build]) -> None:
    (cert,) = yaml.safe_load_all((K8S / "extras" / "certificate.yaml").read_text())
    assert cert["kind"] == "Certificate"
    assert cert["spec"]["secretName"] == "tokenbooth-tls"
    assert cert["metadata"]["namespace"] == builds["ingress"].get(
        "Deployment", "envoy")["metadata"]["namespace"]


@pytest.mark.parametrize("secret", ["tokenbooth-tls", "tokenbooth-redis",
                                    "tokenbooth-admin"])
def test_the_secrets_to_create_are_documented(secret: str) -> None:
    readme = (K8S.parent / "README.md").read_text()
    kind = "tls" if secret == "tokenbooth-tls" else "generic"
    assert f"create secret {kind} {secret}" in readme


def test_posix_paths() -> None:  # the config's paths are container paths
    for name in PATTERNS:
        cfg = load_config(K8S / "overlays" / name / "config" / "tokenbooth.yaml", env={})
        assert cfg.tls is not None
        for p in (cfg.tls.cert, cfg.tls.key, cfg.data_dir):
            assert posixpath.isabs(str(p)), p


_QUANTITY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity ("512Mi", "1G", "1048576") in bytes."""
    for suffix, factor in _QUANTITY.items():
        if quantity.endswith(suffix) and quantity[:-len(suffix)].isdigit():
            return int(quantity[:-len(suffix)]) * factor
    return int(quantity)


def test_memory_quantities() -> None:
    assert [memory_bytes(q) for q in ("512Mi", "1Gi", "1G", "1048576")] == [
        512 << 20, 1 << 30, 10**9, 1 << 20]


@pytest.mark.parametrize("name", PATTERNS)
def test_envoy_heap_bound_fits_its_container(builds: dict[str, Build],
                                             configs: dict[str, tuple[Path, Config]],
                                             name: str) -> None:
    """envoy.max_heap_bytes is ~80 % of the Envoy container's memory limit: the overload
    actions (503s, stream resets) act before the kernel's OOM killer, which would end
    every stream in flight; the rest is memory outside the heap (binary, stacks)."""
    _, cfg = configs[name]
    limit = memory_bytes(
        builds[name].pod_with_container("envoy").container("envoy")["resources"]["limits"]
        ["memory"])
    assert cfg.envoy.max_heap_bytes is not None
    assert 0.7 * limit <= cfg.envoy.max_heap_bytes <= 0.8 * limit, (limit, cfg.envoy)


@pytest.mark.parametrize("name", PATTERNS)
def test_envoy_logs_json_lines_as_the_services_do(builds: dict[str, Build], name: str) -> None:
    """Envoy's own lines were plain text among the services' JSON (newcomer tester)."""
    args = builds[name].pod_with_container("envoy").container("envoy")["args"]
    assert args[args.index("--log-format") + 1] == LOG_FORMAT
    # The format is Envoy's: each line it writes is a JSON object.
    line = LOG_FORMAT.replace("%Y-%m-%dT%T.%e%z", "2026-12-07T03:59:25.536+0000").replace(
        "%l", "warning").replace("%n", "misc").replace("%j", 'a \\"quoted\\" word')
    assert json.loads(line)["msg"] == 'a "quoted" word'
