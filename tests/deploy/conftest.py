"""The kustomizations under deploy/k8s, built once per session."""

from __future__ import annotations

import pytest

from tests.deploy.kube import Build, kustomize
from tests.deploy.tools import K8S

KUSTOMIZATIONS = {
    "base": K8S / "base",
    "ingress": K8S / "overlays" / "ingress",
    "sidecar": K8S / "overlays" / "sidecar",
    "vllm-access": K8S / "vllm-access",
}


@pytest.fixture(scope="session")
def builds() -> dict[str, Build]:
    return {name: Build(name, kustomize(path)) for name, path in KUSTOMIZATIONS.items()}
