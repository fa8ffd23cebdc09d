"""The Envoy bootstrap that `tokenbooth up` runs, built from the policy config.

Static: the admin, the listener (routes included) and the services cluster. The model
clusters come from the services over ADS (`xds_resources.py`), so models and backends
change without an Envoy restart.

Built from envoy_data_plane's typed dataclasses (a wrong field name fails here, not in
Envoy), then rendered as proto-JSON-shaped YAML: `Any` as {"@type": ..., fields},
durations as "2s", enums by name, fields under their proto (snake_case) names, in
declaration order. The output is a pure function of the config (golden-tested).
"""

from __future__ import annotations

from typing import Any

import yaml
from envoy_data_plane.envoy.config.bootstrap.v3 import (
    Admin,
    Bootstrap,
    BootstrapDynamicResources,
    BootstrapStaticResources,
)
from envoy_data_plane.envoy.config.core.v3 import (
    AggregatedConfigSource,
    ApiConfigSource,
    ApiConfigSourceApiType,
    ApiVersion,
    BackoffStrategy,
    ConfigSource,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    Node,
    RetryPolicy,
    TransportSocket,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.overload.v3 import (
    BufferFactoryConfig,
    OverloadAction,
    OverloadManager,
    ResourceMonitor,
    ScaledTrigger,
    ThresholdTrigger,
    Trigger,
)
from envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3 import (
    DownstreamConnectionsConfig,
)
from envoy_data_plane.envoy.extensions.resource_monitors.fixed_heap.v3 import FixedHeapConfig
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CommonTlsContext,
    DownstreamTlsContext,
    TlsCertificate,
)

from authz.envoy_config.clusters import services_cluster
from authz.envoy_config.common import (
    CIRCUIT_BREAKER_MAX,
    SERVICES_CLUSTER,
    listen_address,
    ms,
    pack,
    seconds,
)
from authz.envoy_config.http_filters import http_connection_manager
from policy.config import Config, EnvoySettings, Tls

LISTENER_NAME = "tokenbooth_ingress"
NODE = Node(id="tokenbooth-envoy", cluster="tokenbooth")
# How long Envoy's start waits for the model clusters before serving without them.
# `up` starts the services first. Where they start later (a pod), ext_authz refuses
# every request until they answer anyway, and the clusters follow within 2 s.
ADS_INITIAL_FETCH_TIMEOUT_S = 5
_HEADER = "# Envoy bootstrap rendered by `tokenbooth envoy render`; edit the policy, not this.\n"


def _downstream_tls(tls: Tls) -> TransportSocket:
    """Envoy terminates TLS; ALPN offers HTTP/2 and HTTP/1.1 (the codec is AUTO)."""
    cert = TlsCertificate(
        certificate_chain=DataSource(filename=str(tls.cert)),
        private_key=DataSource(filename=str(tls.key)),
    )
    ctx = DownstreamTlsContext(
        common_tls_context=CommonTlsContext(
            tls_certificates=[cert], alpn_protocols=["h2", "http/1.1"]
        )
    )
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=pack(ctx))


def _listener(cfg: Config) -> Listener:
    hcm = Filter(
        name="envoy.filters.network.http_connection_manager",
        typed_config=pack(http_connection_manager(cfg)),
    )
    chain = FilterChain(
        filters=[hcm],
        transport_socket=_downstream_tls(cfg.tls) if cfg.tls is not None else None,
    )
    return Listener(
        name=LISTENER_NAME,
        address=listen_address(cfg.listen, "listen"),
        filter_chains=[chain],
    )


FIXED_HEAP = "envoy.resource_monitors.fixed_heap"
# Heap pressure (used / envoy.max_heap_bytes) at which each action starts. Envoy's edge
# guide shrinks at 95 % and refuses requests at 98 %; here the heap is shrunk earlier so
# that memory freed by ended streams goes back before any stream is reset.
SHRINK_HEAP_AT = 0.90
# Streams are reset from 95 % (the largest accounts first, more of them as pressure
# grows) until 98 %, where every tracked one is.
RESET_STREAMS_FROM = 0.95
RESET_STREAMS_ALL_AT = 0.98
# HTTP/1 connections close after their response, HTTP/2 ones get GOAWAY: idle
# keep-alive connections stop holding their buffers.
DISABLE_KEEPALIVE_AT = 0.95
# New requests get 503 (local_replies.OVERLOADED, with retry-after) instead of memory.
STOP_REQUESTS_AT = 0.98
# Streams whose buffers hold at least 2^16 bytes (64 KiB) are tracked, so the ones
# holding the most (bodies buffered up to max_request_body_bytes) can be reset.
TRACK_STREAMS_FROM_POWER_OF_TWO = 16
OVERLOAD_REFRESH_MS = 250


def _heap_action(name: str, at: float) -> OverloadAction:
    return OverloadAction(name=name, triggers=[
        Trigger(name=FIXED_HEAP, threshold=ThresholdTrigger(value=at))])


def _overload_manager(env: EnvoySettings) -> OverloadManager:
    """A cap on downstream connections (Envoy warns at start-up without one) and, with
    `envoy.max_heap_bytes`, a bound on the heap (Envoy's fixed-heap monitor): past it a
    flood of requests (every body is buffered before its key is checked) costs the
    largest streams and new requests, never the whole process and its streams."""
    cap = DownstreamConnectionsConfig(max_active_downstream_connections=CIRCUIT_BREAKER_MAX)
    monitors = [ResourceMonitor(
        name="envoy.resource_monitors.global_downstream_max_connections",
        typed_config=pack(cap),
    )]
    if env.max_heap_bytes is None:
        return OverloadManager(resource_monitors=monitors)
    heap = FixedHeapConfig(max_heap_size_bytes=env.max_heap_bytes)
    reset = OverloadAction(
        name="envoy.overload_actions.reset_high_memory_stream",
        triggers=[Trigger(name=FIXED_HEAP, scaled=ScaledTrigger(
            scaling_threshold=RESET_STREAMS_FROM, saturation_threshold=RESET_STREAMS_ALL_AT))])
    return OverloadManager(
        refresh_interval=ms(OVERLOAD_REFRESH_MS),
        resource_monitors=[*monitors, ResourceMonitor(name=FIXED_HEAP, typed_config=pack(heap))],
        actions=[
            _heap_action("envoy.overload_actions.shrink_heap", SHRINK_HEAP_AT),
            reset,
            _heap_action("envoy.overload_actions.disable_http_keepalive",
                         DISABLE_KEEPALIVE_AT),
            _heap_action("envoy.overload_actions.stop_accepting_requests", STOP_REQUESTS_AT),
        ],
        # reset_high_memory_stream resets only the streams whose memory is accounted.
        buffer_factory_config=BufferFactoryConfig(
            minimum_account_to_track_power_of_two=TRACK_STREAMS_FROM_POWER_OF_TWO),
    )


def _dynamic_resources() -> BootstrapDynamicResources:
    """Clusters (CDS) over one ADS stream to any replica of the services. The stream is
    re-opened with backoff (at most 2 s apart) after a replica goes; meanwhile Envoy
    keeps the clusters it has."""
    ads = GrpcServiceEnvoyGrpc(
        cluster_name=SERVICES_CLUSTER,
        retry_policy=RetryPolicy(
            retry_back_off=BackoffStrategy(base_interval=ms(250), max_interval=seconds(2))
        ),
    )
    return BootstrapDynamicResources(
        ads_config=ApiConfigSource(
            api_type=ApiConfigSourceApiType.GRPC,
            transport_api_version=ApiVersion.V3,
            grpc_services=[GrpcService(envoy_grpc=ads)],
            set_node_on_first_message_only=True,
        ),
        cds_config=ConfigSource(
            ads=AggregatedConfigSource(),
            resource_api_version=ApiVersion.V3,
            initial_fetch_timeout=seconds(ADS_INITIAL_FETCH_TIMEOUT_S),
        ),
    )


def build_bootstrap(cfg: Config) -> Bootstrap:
    """The typed bootstrap: admin, one listener, the services cluster, ADS for the rest."""
    return Bootstrap(
        node=NODE,
        admin=Admin(address=listen_address(cfg.envoy.admin_listen, "envoy.admin_listen")),
        static_resources=BootstrapStaticResources(
            listeners=[_listener(cfg)], clusters=[services_cluster(cfg)]
        ),
        dynamic_resources=_dynamic_resources(),
        overload_manager=_overload_manager(cfg.envoy),
    )


def proto_name(name: str) -> str:
    """Keep the dataclass field name, which is the proto field name (betterproto2 strips
    a trailing "_" itself). Its own Casing.SNAKE re-splits digits: consecutive_5xx would
    become consecutive_5_xx, which Envoy rejects."""
    return name


def render_dict(cfg: Config) -> dict[str, Any]:
    """The bootstrap as plain data, ready for YAML or JSON (values of every JSON type)."""
    out: dict[str, Any] = build_bootstrap(cfg).to_dict(casing=proto_name)
    return out


def render_yaml(cfg: Config) -> str:
    """The bootstrap as YAML text (deterministic: same config, same bytes)."""
    body = yaml.safe_dump(
        render_dict(cfg), sort_keys=False, default_flow_style=False, width=1 << 16
    )
    return _HEADER + body
