"""policy/ is the pure core: no grpc, redis, protobuf or Envoy imports (checked by AST)."""

from __future__ import annotations

import ast
from pathlib import Path

FORBIDDEN = ("grpc", "redis", "google", "envoy", "envoy_data_plane", "aiohttp", "authz",
             "prometheus_client", "xds", "udpa", "validate")


def test_policy_imports_nothing_impure() -> None:
    root = Path(__file__).resolve().parents[2] / "policy"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []
    assert len(list(root.rglob("*.py"))) >= 8  # the test looked at the real package
