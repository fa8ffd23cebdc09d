"""The Envoy config that keeps failures from clients and lets long streams live:
- the services cluster: every replica an endpoint, gRPC health checks, ejection on
  connection failures (never of the last replicas), ext_authz / ext_proc calls retried
  on another replica;
- backends: ejection on connection failures only, never of more than half of them;
- timeouts: a stream route (idle timeout + maximum duration) beside the route for other
  responses (route_timeout_s), and the holds' leases that outlast both.
Checked on the rendered config and with `envoy --mode validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from authz.envoy_config.bootstrap import render_dict
from authz.envoy_config.clusters import model_cluster
from authz.envoy_config.http_filters import STREAM_KEY as ROUTE_STREAM_KEY
from authz.envoy_config.names import WHOLE_ANSWERS
from authz.services.exchange import STREAM_KEY
from policy.config import Config, ConfigError, EnvoySettings, parse_config
from policy.routing import model_cluster_name
from tests.envoy_config.test_bootstrap import (
    clusters,
    envoy_validate,
    http_filter,
    load_fixture,
    route,
)
from tests.helpers import policy_dict

SERVICES = "tokenbooth_services"


def with_envoy(**settings: Any) -> Config:
    base = load_fixture("tls_multi")
    data = {**base.envoy.model_dump(), **settings}
    return base.model_copy(update={"envoy": EnvoySettings.model_validate(data)})


def as_dict(c: Any) -> dict[str, Any]:
    out: dict[str, Any] = c.to_dict(casing=lambda name: name)
    return out


def endpoints(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["endpoint"]["address"]["socket_address"]
            for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]


# --- the services cluster --------------------------------------------------------------


def test_every_replica_is_an_endpoint() -> None:
    cfg = with_envoy(services_addresses=["127.0.0.1:9101", "0.0.0.0:9102"])
    svc = clusters(render_dict(cfg))[SERVICES]
    assert endpoints(svc) == [{"address": "127.0.0.1", "port_value": 9101},
                              {"address": "127.0.0.1", "port_value": 9102}]
    assert svc["type"] == "STATIC"
    named = with_envoy(services_addresses=["10.0.0.5:9001", "tokenbooth-b.tb.svc:9001"])
    assert clusters(render_dict(named))[SERVICES]["type"] == "STRICT_DNS"
    # The single forms keep working.
    one = with_envoy(services_address="tokenbooth.tb.svc:9001")
    assert endpoints(clusters(render_dict(one))[SERVICES]) == [
        {"address": "tokenbooth.tb.svc", "port_value": 9001}]
    default = clusters(render_dict(load_fixture("tls_multi")))[SERVICES]
    assert endpoints(default) == [{"address": "127.0.0.1", "port_value": 9001}]


@pytest.mark.parametrize("envoy", [
    {"services_address": "127.0.0.1:1", "services_addresses": ["127.0.0.1:2"]},
    {"services_addresses": ["127.0.0.1:2", "127.0.0.1:2"]},
    {"services_addresses": ["no-port"]},
])
def test_bad_services_addresses_are_refused(envoy: dict[str, Any]) -> None:
    data = yaml.safe_load((Path(__file__).parent / "fixtures" / "basic.yaml").read_text())
    with pytest.raises(ConfigError) as e:
        parse_config({**data, "envoy": envoy}, "t.yaml")
    assert e.value.args[0].startswith("t.yaml: envoy")


def test_replicas_are_health_checked_and_ejected_on_connection_failures() -> None:
    svc = clusters(render_dict(load_fixture("basic")))[SERVICES]
    (hc,) = svc["health_checks"]
    assert hc["grpc_health_check"] == {}  # service "": the whole server
    assert hc["interval"] == "1s" and hc["unhealthy_threshold"] == 2
    od = svc["outlier_detection"]
    assert od["split_external_local_origin_errors"] is True
    assert (od["consecutive_local_origin_failure"],
            od["enforcing_consecutive_local_origin_failure"]) == (2, 100)
    # Never the last of two replicas (Envoy counts the host about to be ejected).
    assert od["max_ejection_percent"] == 50
    assert "common_lb_config" not in svc  # Envoy's panic threshold: all down, try all
    assert svc["circuit_breakers"]["thresholds"][0]["max_retries"] >= 100_000


def test_service_calls_are_retried_on_another_replica() -> None:
    d = render_dict(load_fixture("basic"))
    authz = http_filter(d, "envoy.filters.http.ext_authz")["grpc_service"]["retry_policy"]
    proc = http_filter(d, "envoy.filters.http.ext_proc")["grpc_service"]["retry_policy"]
    # A Check has no side effects: retried after a reset too. A stream only if unseen.
    assert set(authz["retry_on"].split(",")) >= {"connect-failure", "reset", "unavailable"}
    assert set(proc["retry_on"].split(",")) == {"connect-failure", "refused-stream",
                                                 "reset-before-request"}
    for policy in (authz, proc):
        assert policy["num_retries"] >= 1
        assert [p["name"] for p in policy["retry_host_predicate"]] == [
            "envoy.retry_host_predicates.previous_hosts"]


# --- backends ----------------------------------------------------------------------------


def test_backends_are_ejected_for_connection_failures_never_for_answers() -> None:
    cfg = load_fixture("tls_multi")
    for alias, m in cfg.models.items():
        c = as_dict(model_cluster(alias, m))
        od = c["outlier_detection"]
        assert od["split_external_local_origin_errors"] is True
        assert od["enforcing_consecutive_local_origin_failure"] == 100
        # A tenant's requests that the backend answers with 5xx eject nothing.
        assert od["enforcing_consecutive_5xx"] == 0
        assert od["enforcing_consecutive_gateway_failure"] == 0
        assert od["enforcing_success_rate"] == 0
        # At most half of an alias's backends; a lone backend never.
        assert od["max_ejection_percent"] == 50
        # Hosts the health checks know are down get no traffic: a fast 503.
        assert c["common_lb_config"]["healthy_panic_threshold"] == {}


def test_an_alias_without_backends_renders() -> None:
    m = load_fixture("basic").models["demo"].model_copy(update={"backends": []})
    c = as_dict(model_cluster("demo", m))
    assert c["name"] == model_cluster_name("demo") and c["type"] == "STATIC"


def _upstream_filters(cluster: dict[str, Any]) -> list[str]:
    opts = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    return [f["name"] for f in opts.get("http_filters", [])]


def test_small_answers_are_held_whole_up_to_the_setting() -> None:
    """Every backend cluster holds answers up to `whole_answer_bytes` (its Lua says the
    bound); 0 renders no upstream filter at all; past half of Envoy's 1 MiB buffer limit
    per connection the setting is refused."""
    m = load_fixture("basic").models["demo"]
    c = as_dict(model_cluster("demo", m, whole_bytes=4096))
    assert _upstream_filters(c) == [WHOLE_ANSWERS, "envoy.filters.http.upstream_codec"]
    opts = c["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "length <= 4096" in opts["http_filters"][0]["typed_config"][
        "default_source_code"]["inline_string"]
    assert _upstream_filters(as_dict(model_cluster("demo", m, whole_bytes=0))) == []
    assert EnvoySettings().whole_answer_bytes == 256 << 10
    # Envoy takes the request body limit as the stream's buffer limit too: an answer held
    # past it was a plain-text 500 (charged nothing), so the smaller one bounds it.
    cfg = load_fixture("basic")
    small = cfg.model_copy(update={"max_request_body_bytes": 4096})
    assert (cfg.whole_answer_limit, small.whole_answer_limit) == (256 << 10, 4096)
    for bad in (-1, (512 << 10) + 1):
        with pytest.raises(ValueError):
            EnvoySettings(whole_answer_bytes=bad)


# --- timeouts ----------------------------------------------------------------------------


def test_streams_have_their_own_route_and_timeouts() -> None:
    d = render_dict(with_envoy(route_timeout_s=90, stream_idle_timeout_s=20,
                               max_stream_duration_s=1800))
    names = [r["name"] for r in d["static_resources"]["listeners"][0]["filter_chains"][0][
        "filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]]
    assert names.index("inference_stream") < names.index("inference")
    s, plain = route(d, "inference_stream"), route(d, "inference")
    assert [m["path"][0]["key"] for m in s["match"]["dynamic_metadata"]] == [
        "cluster", STREAM_KEY]
    assert (s["route"]["timeout"], s["route"]["idle_timeout"]) == ("1800s", "20s")
    # The route timeout (an OpenAI-shaped 504) comes first; the idle timer still bounds a
    # client that stops reading.
    assert (plain["route"]["timeout"], plain["route"]["idle_timeout"]) == ("90s", "91.250s")
    assert s["route"]["retry_policy"] == plain["route"]["retry_policy"]


def test_old_configs_load_and_keep_their_meaning() -> None:
    env = with_envoy(route_timeout_s=300).envoy
    assert env.stream_idle_s == 300  # a stream may wait as long for its first token
    assert env.max_stream_duration_s == 600
    # Every hold outlasts its request.
    assert env.hold_lease_s(stream=False) == 330
    assert env.hold_lease_s(stream=True) == 630
    d = render_dict(load_fixture("basic"))
    assert route(d, "inference_stream")["route"]["idle_timeout"] == "120s"


@pytest.mark.parametrize(("stream", "idle_s", "elapsed_s", "cut"), [
    (True, 0.3, 5.0, False),    # the client left mid-stream
    (True, 10.0, 12.0, True),   # silent for the idle timeout
    (True, 9.99, 12.0, True),   # Envoy's timer, seen a moment early
    (True, 1.0, 60.0, True),    # the maximum duration
    (False, 3.0, 3.0, False),   # a client that gave up waiting
    (False, 30.0, 30.0, True),  # the route timeout
    (False, 33.0, 33.0, True),  # the idle timeout past it (a client that stopped reading)
])
def test_a_cut_is_told_from_a_client_leaving(stream: bool, idle_s: float, elapsed_s: float,
                                             cut: bool) -> None:
    env = with_envoy(route_timeout_s=30, stream_idle_timeout_s=10,
                     max_stream_duration_s=60).envoy
    assert env.ended_by_gateway(stream, idle_s, elapsed_s) is cut


def test_the_stream_marker_is_one_name() -> None:
    assert STREAM_KEY == ROUTE_STREAM_KEY


# --- the real binary ---------------------------------------------------------------------


@pytest.mark.parametrize("addresses", [["127.0.0.1:9101", "127.0.0.1:9102"],
                                       ["127.0.0.1:9101", "tokenbooth.tb.svc:9101"]])
def test_envoy_validates(addresses: list[str], tmp_path: Path) -> None:
    cfg = with_envoy(services_addresses=addresses, stream_idle_timeout_s=30)
    cfg = cfg.model_copy(update={"tls": None})
    d = render_dict(cfg)
    static = d["static_resources"]["clusters"]
    have = {c["name"] for c in static}
    # The model clusters as Envoy gets them (statically here, to be validated too).
    static += [c for c in (as_dict(model_cluster(a, m)) for a, m in cfg.models.items())
               if c["name"] not in have]
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    r = envoy_validate(path)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(("field", "value"), [
    ("max_stream_duration_s", 1e-7),  # rendered 0s: no limit, and a live stream swept
    ("route_timeout_s", 1e-7), ("stream_idle_timeout_s", 0.0001),
    ("max_stream_duration_s", float("inf")), ("max_stream_duration_s", 1e15),
    ("stream_idle_timeout_s", float("inf")), ("decision_timeout_ms", 400_000_000_000_000),
    ("max_request_body_bytes", 1_100_000_000), ("max_event_bytes", 3_000_000_000),
])
def test_timeouts_and_sizes_envoy_and_grpc_cannot_take_are_refused(field: str,
                                                                   value: float) -> None:
    """Each was `ok` to check-config, then no limit at all, an internal error in `envoy
    render` or `serve`, or a bootstrap Envoy refused (review)."""
    where = ({"max_request_body_bytes": value} if field == "max_request_body_bytes"
             else {"envoy": {field: value}})
    with pytest.raises(ValidationError, match=field):
        Config.model_validate(policy_dict("http://127.0.0.1:1", **where))


def test_a_decision_timeout_under_the_retry_base_keeps_envoys_back_off_valid() -> None:
    """Envoy reports a back-off base above its max as a bug of its own (review)."""
    d = render_dict(with_envoy(decision_timeout_ms=20))
    for name in ("envoy.filters.http.ext_authz", "envoy.filters.http.ext_proc"):
        grpc = http_filter(d, name)["grpc_service"]
        assert grpc["retry_policy"]["retry_back_off"] == {
            "base_interval": "0.020s", "max_interval": "0.020s"}
