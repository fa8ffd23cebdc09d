"""`/health` on the public listener: Envoy answers 200 itself, with no key, before any
other route; ext_authz and ext_proc are off for it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from authz.envoy_config.binary import envoy_path
from authz.envoy_config.bootstrap import render_dict, render_yaml
from policy.config import Config, parse_config

FIXTURE = Path(__file__).parent / "fixtures" / "basic.yaml"


def basic() -> Config:
    return parse_config(yaml.safe_load(FIXTURE.read_text()), str(FIXTURE))


def routes(d: dict[str, Any]) -> list[dict[str, Any]]:
    listener = d["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    out: list[dict[str, Any]] = hcm["route_config"]["virtual_hosts"][0]["routes"]
    return out


def test_health_is_the_first_route_and_envoy_answers_it() -> None:
    first = routes(render_dict(basic()))[0]
    assert first == {
        "name": "health",
        "match": {"path": "/health"},
        "direct_response": {"status": 200},
        "typed_per_filter_config": {
            "envoy.filters.http.ext_authz": {
                "@type": "type.googleapis.com/"
                         "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                "disabled": True},
            "envoy.filters.http.ext_proc": {
                "@type": "type.googleapis.com/"
                         "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                "disabled": True},
        },
    }


def test_envoy_validates_the_health_route(tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(basic()))
    r = subprocess.run([str(envoy_path()), "--mode", "validate", "-c", str(path),
                        "--log-level", "warn"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
