"""deploy/k8s/extras/usage-exporter.yaml: valid for the pinned Kubernetes versions, and it
runs the exporter command of this tokenbooth with the secrets and config it needs."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from authz.cli.main import parser
from tests.deploy.test_k8s_manifests import K8S_VERSIONS
from tests.deploy.tools import K8S

PATH = K8S / "extras" / "usage-exporter.yaml"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_schema(version: str) -> None:
    for doc in yaml.safe_load_all(PATH.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)


def test_runs_the_export_command_with_its_secrets() -> None:
    [deploy] = list(yaml.safe_load_all(PATH.read_text()))
    pod = deploy["spec"]["template"]
    [c] = pod["spec"]["containers"]
    args = parser().parse_args(c["args"])
    assert (args.command, args.action, args.config) == (
        "usage", "export", "/etc/tokenbooth/config.yaml")
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"]}
    assert secrets == {"TOKENBOOTH_REDIS_PASSWORD": "tokenbooth-redis",
                       "PGPASSWORD": "tokenbooth-usage-sink"}
    assert pod["metadata"]["labels"]["tokenbooth/redis-client"] == "true"
    assert pod["spec"]["volumes"][0]["configMap"]["name"] == "tokenbooth-config"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
