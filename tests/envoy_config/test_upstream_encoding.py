"""Backends answer uncompressed: every route that reaches one replaces the client's
Accept-Encoding with `identity`, since usage is read from the answer's bytes (a gzipped
answer's usage is unreadable and its record an estimate). tests/e2e/
test_tool_call_metering.py checks it against a backend that compresses when allowed."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from authz.envoy_config.bootstrap import render_dict
from authz.envoy_config.http_filters import ACCEPT_ENCODING, IDENTITY
from policy.config import Config
from tests.envoy_config.test_bootstrap import hcm, load_fixture


def routes(cfg: Config) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = hcm(render_dict(cfg))["route_config"]["virtual_hosts"][0][
        "routes"]
    return out


def with_metering(cfg: Config, how: str) -> Config:
    data = cfg.model_dump(mode="json")
    data["envoy"]["stream_metering"] = how
    return Config.model_validate(data)


@pytest.mark.parametrize("fixture", ["basic", "tls_multi"])
@pytest.mark.parametrize("metering", ["ext_proc", "envoy"])
def test_every_backend_route_asks_for_an_uncompressed_answer(fixture: str,
                                                             metering: str) -> None:
    cfg = with_metering(load_fixture(fixture), metering)
    to_backends = [r for r in routes(cfg) if "cluster_header" in r.get("route", {})]
    assert {r["name"] for r in to_backends} == {"inference", "inference_stream"}
    for r in to_backends:
        [accept] = [h for h in r.get("request_headers_to_add", [])
                    if h["header"]["key"].lower() == ACCEPT_ENCODING]
        assert accept == {"header": {"key": "accept-encoding", "value": IDENTITY},
                          "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}, r["name"]
    # Every other route answers itself or reaches no backend.
    for r in routes(cfg):
        if r not in to_backends:
            assert "direct_response" in r or r["route"]["cluster"] == "tokenbooth_unrouted"


def test_the_rendered_yaml_says_so() -> None:
    text = yaml.safe_dump(render_dict(load_fixture("basic")))
    assert text.count("key: accept-encoding") == 2
