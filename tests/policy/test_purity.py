"""policy/ is the pure core: no grpc, redis, protobuf or Envoy imports (checked by AST).
Process settings are read once, in the CLI: nothing else touches the environment."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("grpc", "redis", "google", "envoy", "envoy_data_plane", "aiohttp", "authz",
             "prometheus_client", "xds", "udpa", "validate")
ENV_NAMES = ("environ", "environb", "getenv", "getenvb", "putenv", "unsetenv")


def test_policy_imports_nothing_impure() -> None:
    root = ROOT / "policy"
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


def env_reads(source: str) -> list[int]:
    """Lines that use `os.environ`, `os.getenv` and the like, however imported."""
    return sorted(node.lineno for node in ast.walk(ast.parse(source)) if _reads_env(node))


def _reads_env(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute):  # os.environ, os.getenv(...)
        return (node.attr in ENV_NAMES and isinstance(node.value, ast.Name)
                and node.value.id == "os")
    if isinstance(node, ast.ImportFrom):  # from os import environ
        return node.module == "os" and any(a.name in ENV_NAMES for a in node.names)
    return False


def test_the_checker_finds_every_form() -> None:
    src = ("import os\nfrom os import getenv as g\nos.environ.get('A')\nx = os.getenv('B')\n"
           "os.putenv('C', '1')\nenviron = {}\n")
    assert env_reads(src) == [2, 3, 4, 5]


def test_only_the_cli_reads_the_environment() -> None:
    files = [p for d in ("authz", "policy") for p in sorted((ROOT / d).rglob("*.py"))
             if (ROOT / "authz" / "cli") not in p.parents]
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in files for n in env_reads(p.read_text())]
    assert offenders == []
    assert len(files) >= 40  # it looked at the real packages
    assert env_reads((ROOT / "authz" / "cli" / "main.py").read_text())  # and the CLI does


def test_every_policy_module_has_its_own_test_file() -> None:
    modules = {p.stem for p in (ROOT / "policy").glob("*.py") if p.stem != "__init__"}
    tests = {p.stem.removeprefix("test_") for p in Path(__file__).parent.glob("test_*.py")}
    assert sorted(modules - tests) == []
