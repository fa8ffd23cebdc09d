"""policy/routing.py: one Envoy cluster per alias, and the backend from Envoy's metadata."""

from __future__ import annotations

import hashlib

from policy.config import Backend, parse_config
from policy.routing import (
    Route,
    Router,
    authority,
    backend_from_host_metadata,
    model_cluster_name,
)
from tests.helpers import policy_dict

CFG = parse_config(policy_dict("http://127.0.0.1:8000"))


def test_one_cluster_per_alias() -> None:
    r = Router(CFG)
    assert r.route("demo") == Route("demo", "tiny-llama", model_cluster_name("demo"))
    assert r.route("other") == Route("other", "tiny-llama-2", model_cluster_name("other"))
    assert r.route("nope") is None
    assert r.route("Demo") is None  # aliases are case-sensitive


def test_cluster_names_are_envoy_safe_stable_and_unique() -> None:
    digest = hashlib.sha256(b"demo").hexdigest()[:8]
    assert model_cluster_name("demo") == f"model_demo_{digest}"
    assert model_cluster_name("Llama 3.1/70B").startswith("model_llama_3_1_70b_")
    assert model_cluster_name("a/b") != model_cluster_name("a_b")
    long = model_cluster_name("x" * 100)
    assert long == f"model_{'x' * 40}_{hashlib.sha256(b'x' * 100).hexdigest()[:8]}"


def test_authority_is_host_and_port_as_written() -> None:
    assert authority(Backend(url="http://vllm-a.svc:8000")) == "vllm-a.svc:8000"
    assert authority(Backend(url="https://api.example.com/")) == "api.example.com"


def test_backend_url_from_envoys_rendering_of_endpoint_metadata() -> None:
    # As the pinned Envoy sends the `xds.upstream_host_metadata` attribute.
    text = ('filter_metadata { key: "tokenbooth" value { fields { key: "backend" value '
            '{ string_value: "http://vllm-a.svc:8000" } } } }')
    assert backend_from_host_metadata(text) == "http://vllm-a.svc:8000"
    assert backend_from_host_metadata("") == ""
    assert backend_from_host_metadata('filter_metadata { key: "other" }') == ""
    escaped = 'key: "backend" value { string_value: "http://h:1/\\"q" }'
    assert backend_from_host_metadata(escaped) == 'http://h:1/\\"q'
