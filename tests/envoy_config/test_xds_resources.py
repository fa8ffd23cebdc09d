"""The resources served over ADS: one cluster per alias, the official wire form equal to
the typed form, versions from content (stable across runs and replicas), Envoy's own
validation, and the bootstrap that points Envoy at them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2  # noqa: F401  (Any types)
from envoy.extensions.filters.http.upstream_codec.v3 import upstream_codec_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import (
    secret_pb2,
    tls_pb2,  # noqa: F401  (Any types)
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from envoy_data_plane.envoy.config.cluster.v3 import Cluster as TypedCluster
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret as TypedSecret
from google.protobuf import json_format

from authz.envoy_config.bootstrap import proto_name, render_dict, render_yaml
from authz.envoy_config.clusters import SYSTEM_CA_BUNDLE
from authz.envoy_config.names import WHOLE_ANSWERS
from authz.envoy_config.xds_resources import (
    CLUSTER_TYPE,
    SECRET_TYPE,
    backend_secrets,
    build_resources,
    model_cluster_dicts,
    model_clusters,
    with_static_models,
)
from policy.config import Config, ConfigError, parse_config
from policy.routing import model_cluster_name
from tests.envoy_config.test_bootstrap import envoy_validate, load_fixture

ROOT = Path(__file__).resolve().parents[2]


def version(cfg: Config) -> str:
    return build_resources(cfg)[CLUSTER_TYPE].version


def with_models(cfg: Config, **changes: dict[str, Any]) -> Config:
    """`cfg` with models replaced (a dict) or removed (None), through validation."""
    data = cfg.model_dump(mode="json")
    for alias, model in changes.items():
        if model is None:
            del data["models"][alias]
        else:
            data["models"][alias] = model
    return Config.model_validate(data)


def by_name(cfg: Config) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in model_cluster_dicts(cfg)}


def test_one_cluster_per_alias_with_weighted_endpoints() -> None:
    cfg = load_fixture("tls_multi")
    got = by_name(cfg)
    assert sorted(got) == sorted(model_cluster_name(a) for a in cfg.models)
    assert list(build_resources(cfg)[CLUSTER_TYPE].resources) == sorted(got)
    small = got[model_cluster_name("llama-small")]
    eps = small["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [(e["endpoint"]["hostname"], e.get("load_balancing_weight")) for e in eps] == [
        ("10.0.0.11:8000", 3), ("vllm-small.inference.svc.cluster.local:8000", 1)]
    assert small["type"] == "STRICT_DNS"  # endpoints inline: EDS cannot carry DNS names
    assert small["lb_policy"] == "LEAST_REQUEST"
    assert small["health_checks"][0]["http_health_check"]["path"] == "/health"
    assert "transport_socket" not in small
    large = got[model_cluster_name("llama-large")]
    assert large["transport_socket"]["name"] == "envoy.transport_sockets.tls"
    # One TLS socket per backend host, picked by the endpoint: SNI and the certificate's
    # name are the URL's host, never the Host a client sent (Envoy's auto_sni and
    # auto_san_validation read that; retest tester).
    assert "upstream_http_protocol_options" not in json.dumps(large)
    sockets = {m["match"]["tls_host"]: m["transport_socket"]["typed_config"]
               for m in large["transport_socket_matches"]}
    assert sorted(sockets) == ["vllm-large-2.example.com", "vllm-large.example.com"]
    for host, ctx in sockets.items():
        assert ctx["sni"] == host
        combined = ctx["common_tls_context"]["combined_validation_context"]
        assert combined["default_validation_context"]["match_typed_subject_alt_names"] == [
            {"san_type": "DNS", "matcher": {"exact": host}}]
        # The CAs are a secret, whose file Envoy watches (a rotated CA is read again).
        ca_name = combined["validation_context_sds_secret_config"]["name"]
        (secret,) = [s for s in backend_secrets(cfg) if s.name == ca_name]
        assert secret.validation_context.trusted_ca.filename == SYSTEM_CA_BUNDLE
    picked = [e["metadata"]["filter_metadata"]["envoy.transport_socket_match"]["tls_host"]
              for e in large["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert sorted(picked) == sorted(sockets)


@pytest.mark.parametrize(("url", "sni", "san"), [
    ("https://Vllm.Example.com.:8443", "vllm.example.com", ("DNS", "vllm.example.com")),
    ("https://[::ffff:10.0.0.1]:8443", "", ("IP_ADDRESS", "10.0.0.1")),
    ("https://[2001:DB8::1]", "", ("IP_ADDRESS", "2001:db8::1")),
])
def test_tls_names_the_backend_as_its_certificate_does(url: str, sni: str,
                                                       san: tuple[str, str]) -> None:
    """A DNS name's final dot and an IPv4-mapped address are the same backend as without
    (config), and so for TLS too: the dot is no SNI (RFC 6066) and no certificate names
    it; an IPv4-mapped address's certificate names the IPv4 one (review)."""
    cfg = Config.model_validate({
        "models": {"m": {"upstream_model": "u", "backends": [{"url": url}]}}, "keys": []})
    cluster = by_name(cfg)[model_cluster_name("m")]
    (match,) = cluster["transport_socket_matches"]
    ctx = match["transport_socket"]["typed_config"]
    assert ctx.get("sni", "") == sni
    assert ctx["common_tls_context"]["combined_validation_context"][
        "default_validation_context"]["match_typed_subject_alt_names"] \
        == [{"san_type": san[0], "matcher": {"exact": san[1]}}]
    (ep,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert ep["metadata"]["filter_metadata"]["envoy.transport_socket_match"] == \
        match["match"] == {"tls_host": sni or san[1]}


@pytest.mark.parametrize("name", ["basic", "tls_multi"])
def test_the_wire_form_is_the_typed_form(name: str) -> None:
    """Each packed resource, parsed by the official protobuf, says what the typed
    dataclasses (the same ones the bootstrap renders) say."""
    cfg = load_fixture(name)
    packed = build_resources(cfg)[CLUSTER_TYPE].resources
    # Served over ADS: the secrets they name come over ADS too.
    typed = {c.name: c.to_dict(casing=proto_name) for c in model_clusters(cfg)}
    for cluster_name, any_msg in packed.items():
        assert any_msg.type_url == CLUSTER_TYPE
        cluster = cluster_pb2.Cluster()
        assert any_msg.Unpack(cluster)
        assert json_format.MessageToDict(cluster, preserving_proto_field_name=True) == \
            typed[cluster_name]


def test_versions_are_stable_across_builds_and_processes() -> None:
    """Replicas are separate processes (own hash seeds): same config, same bytes."""
    cfg = load_fixture("tls_multi")
    here = version(cfg)
    assert version(load_fixture("tls_multi")) == here
    code = ("from tests.envoy_config.test_bootstrap import load_fixture\n"
            "from tests.envoy_config.test_xds_resources import version\n"
            "print(version(load_fixture('tls_multi')))")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"})
        assert out.stdout.strip() == here


def test_versions_change_with_the_clusters_only() -> None:
    cfg = load_fixture("tls_multi")
    small = cfg.models["llama-small"].model_dump(mode="json")
    backends = small["backends"]
    reweighted = {**small, "backends": [{**backends[0], "weight": 1}, backends[1]]}
    one_backend = {**small, "backends": backends[:1]}
    variants = [
        with_models(cfg, **{"llama-small": reweighted}),
        with_models(cfg, **{"llama-small": one_backend}),
        with_models(cfg, **{"llama-small": None}),
        with_models(cfg, added=one_backend),
    ]
    versions = {version(c) for c in [cfg, *variants]}
    assert len(versions) == 5
    # Prices, token caps and keys are the services' business: Envoy's clusters stay.
    priced = {**small, "price_per_1k_tokens": {"input": "9", "output": "9"},
              "max_tokens": 7}
    assert version(with_models(cfg, **{"llama-small": priced})) == version(cfg)
    assert version(cfg.model_copy(update={"keys": []})) == version(cfg)


@pytest.mark.parametrize("name", ["basic", "tls_multi"])
def test_envoy_accepts_the_clusters(name: str, tmp_path: Path) -> None:
    """`envoy --mode validate` on the bootstrap with the ADS clusters made static."""
    cfg = load_fixture(name)
    d = with_static_models(render_dict(cfg.model_copy(update={"tls": None})), cfg)
    assert "dynamic_resources" not in d
    assert len(d["static_resources"]["clusters"]) == 1 + len(cfg.models)
    path = tmp_path / "static.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    r = envoy_validate(path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_bootstrap_takes_model_clusters_from_ads() -> None:
    d = render_dict(load_fixture("tls_multi"))
    assert [c["name"] for c in d["static_resources"]["clusters"]] == ["tokenbooth_services"]
    dyn = d["dynamic_resources"]
    assert dyn["cds_config"]["ads"] == {}
    assert dyn["cds_config"]["initial_fetch_timeout"] == "5s"
    assert "lds_config" not in dyn  # the listener and its routes stay static
    ads = dyn["ads_config"]
    assert (ads["api_type"], ads["transport_api_version"]) == ("GRPC", "V3")
    [grpc] = ads["grpc_services"]
    assert grpc["envoy_grpc"]["cluster_name"] == "tokenbooth_services"
    assert "timeout" not in grpc  # a deadline would end the stream
    assert d["node"]["id"] and d["node"]["cluster"]


# -- backend API keys: named in the config, read by Envoy, written nowhere --------------

BACKEND_KEY = "vllm-key-never-rendered-7f3a9c"
KEY_VAR = "TB_TEST_VLLM_KEY"


def keyed_config(tmp_path: Path) -> Config:
    """`basic` plus a model whose key is in an env var, one whose key is in a file (both
    holding BACKEND_KEY), and one with no backend."""
    key_file = tmp_path / "vllm.key"
    key_file.write_text(BACKEND_KEY + "\n")
    base = load_fixture("basic")
    demo = base.models["demo"].model_dump(mode="json")
    url = demo["backends"][0]["url"]
    return with_models(
        base,
        env_keyed={**demo, "backends": [{"url": url, "api_key_env": KEY_VAR}]},
        file_keyed={**demo, "backends": [{"url": url, "api_key_file": str(key_file)},
                                         {"url": "http://127.0.0.2:8000",
                                          "api_key_file": str(key_file)}]},
        unserved={**demo, "backends": []},
    )


def test_backend_keys_are_injected_from_secrets_served_by_name(tmp_path: Path) -> None:
    cfg = keyed_config(tmp_path)
    # Read back with the typed dataclasses (xds-protos predates `header_value_prefix`).
    secrets = {n: TypedSecret.parse(a.value).to_dict(casing=proto_name)
               for n, a in build_resources(cfg)[SECRET_TYPE].resources.items()}
    # One secret per key source, naming where Envoy reads the key, never the key.
    assert sorted(s["generic_secret"]["secret"].popitem() for s in secrets.values()) == [
        ("environment_variable", KEY_VAR), ("filename", str(tmp_path / "vllm.key"))]
    clusters = {n: TypedCluster.parse(a.value).to_dict(casing=proto_name)
                for n, a in build_resources(cfg)[CLUSTER_TYPE].resources.items()}
    env_keyed = clusters[model_cluster_name("env_keyed")]
    opts = env_keyed["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    whole, injector, codec = opts["http_filters"]
    assert whole["name"] == WHOLE_ANSWERS
    assert codec["name"] == "envoy.filters.http.upstream_codec"
    generic = injector["typed_config"]["credential"]["typed_config"]
    assert (generic["header"], generic["header_value_prefix"]) == ("Authorization", "Bearer ")
    assert generic["credential"]["sds_config"]["ads"] == {}
    assert generic["credential"]["name"] in secrets
    assert injector["typed_config"]["overwrite"] is True
    # No key: answers held whole, then the codec; no backend, marked (its 503 says not
    # to retry).
    demo = clusters[model_cluster_name("demo")]
    assert [f["name"] for f in demo["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]] == [
            WHOLE_ANSWERS, "envoy.filters.http.upstream_codec"]
    assert clusters[model_cluster_name("unserved")]["metadata"] == {
        "filter_metadata": {"tokenbooth": {"no_backends": True}}}


def _unpack(any_msg: Any, into: Any) -> Any:
    assert any_msg.Unpack(into)
    return into


def test_backend_key_is_in_no_rendered_or_served_text(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With the key in the environment and in the file, nothing tokenbooth renders or
    serves holds it: the bootstrap (`envoy render`), the static form (benchmarks), the
    xDS resources as bytes and as text."""
    monkeypatch.setenv(KEY_VAR, BACKEND_KEY)
    cfg = keyed_config(tmp_path)
    resources = build_resources(cfg)
    texts = [render_yaml(cfg), yaml.safe_dump(with_static_models(render_dict(cfg), cfg)),
             str(resources)]
    for rs in resources.values():
        texts += [a.value.decode("latin-1") for a in rs.resources.values()]
        texts += [str(_unpack(a, secret_pb2.Secret() if rs.type_url == SECRET_TYPE
                              else cluster_pb2.Cluster())) for a in rs.resources.values()]
    for text in texts:
        assert BACKEND_KEY not in text
    assert any(KEY_VAR in t for t in texts)


def test_envoy_accepts_backend_keys(tmp_path: Path) -> None:
    """The static form (secrets in the bootstrap) with `envoy --mode validate`, which
    reads the key from its environment and the file."""
    cfg = keyed_config(tmp_path)
    d = with_static_models(render_dict(cfg), cfg)
    assert len(d["static_resources"]["secrets"]) == 2
    path = tmp_path / "static.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    r = envoy_validate(path, env={KEY_VAR: BACKEND_KEY})
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(("backend", "problem"), [
    ({"api_key": "sk-inline"}, "never written in the config"),
    ({"api_key_env": "A", "api_key_file": "/k"}, "not both"),
    ({"api_key_env": "1BAD"}, "api_key_env"),
    ({"api_key_file": "relative/key"}, "api_key_file"),
])
def test_backend_key_settings_are_checked(backend: dict[str, str], problem: str) -> None:
    data = {"models": {"m": {"upstream_model": "x",
                             "backends": [{"url": "http://h:8000", **backend}]}}}
    with pytest.raises(ConfigError) as e:
        parse_config(data, "policy.yaml")
    assert problem in str(e.value) and "models.m.backends[0]" in str(e.value)


def test_one_key_source_per_model() -> None:
    data = {"models": {"m": {"upstream_model": "x", "backends": [
        {"url": "http://a:8000", "api_key_env": "A"}, {"url": "http://b:8000"}]}}}
    with pytest.raises(ConfigError, match="same api_key_env"):
        parse_config(data, "policy.yaml")
