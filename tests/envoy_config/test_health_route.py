"""`/health` on the public listener: Envoy answers 200 itself, with no key, before any
other route but CONNECT's; ext_authz and ext_proc are off for it. CONNECT gets its 405 from
the first route, every filter off (its body never ends: a buffer would wait for it)."""

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


def test_connect_is_answered_first_with_every_filter_off() -> None:
    d = render_dict(basic())
    first = routes(d)[0]
    assert first["match"] == {"connect_matcher": {}}
    assert first["direct_response"]["status"] == 405
    assert "method_not_allowed" in first["direct_response"]["body"]["inline_string"]
    assert {k: v.get("disabled") for k, v in first["typed_per_filter_config"].items()} == {
        "envoy.filters.http.ext_authz": True, "envoy.filters.http.ext_proc": True,
        "envoy.filters.http.buffer": True, "tokenbooth.hold_for_routing": True,
        "tokenbooth.upstream_errors": True}
    hcm = d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert hcm["typed_config"]["upgrade_configs"] == [{"upgrade_type": "CONNECT"}]


def test_health_is_the_first_route_after_connect_and_envoy_answers_it() -> None:
    first = routes(render_dict(basic()))[1]
    assert first == {
        "name": "health",
        "match": {"path": "/health", "headers": [
            {"name": ":method", "string_match": {"safe_regex": {"regex": "GET|HEAD|OPTIONS"}}}]},
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


def test_other_methods_on_health_get_a_405_with_every_filter_off() -> None:
    second = routes(render_dict(basic()))[2]
    assert second["name"] == "health-method"
    assert second["match"] == {"path": "/health"}
    assert second["direct_response"]["status"] == 405
    assert {h["header"]["key"]: h["header"]["value"]
            for h in second["response_headers_to_add"]} == {
        "content-type": "application/json", "allow": "GET, HEAD, OPTIONS"}
    assert all(v.get("disabled") for v in second["typed_per_filter_config"].values())


def test_envoy_validates_the_health_route(tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(basic()))
    r = subprocess.run([str(envoy_path()), "--mode", "validate", "-c", str(path),
                        "--log-level", "warn"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
