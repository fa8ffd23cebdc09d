"""Shared by the deploy tests: the repository's paths and the tools the test extras install."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def venv_tool(name: str) -> Path:
    """A command-line tool from a wheel of the `test` extra (kubectl, hadolint)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed: run `make install` (the test extra)")
    return Path(found)
