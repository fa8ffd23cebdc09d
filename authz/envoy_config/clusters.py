"""Envoy clusters: tokenbooth's gRPC services, and one cluster per distinct backend."""

from __future__ import annotations

from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    ClusterCommonLbConfig,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
    ClusterLbPolicy,
    OutlierDetection,
)
from envoy_data_plane.envoy.config.core.v3 import (
    DataSource,
    HealthCheck,
    HealthCheckHttpHealthCheck,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    HttpProtocolOptions,
    Metadata,
    TransportSocket,
    UpstreamHttpProtocolOptions,
)
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    EndpointHealthCheckConfig,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions as UpstreamHttpOptions,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.v3 import Percent
from envoy_data_plane.google.protobuf import Struct, Value

from authz.envoy_config.common import (
    CIRCUIT_BREAKER_MAX,
    SERVICES_CLUSTER,
    address,
    connect_host,
    is_ip,
    pack,
    seconds,
)
from policy.config import Config, Model, parse_hostport
from policy.routing import BACKEND_METADATA, authority, model_cluster_name

_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Where https backends' server certificates are verified against (Debian/Ubuntu path,
# also in the container image). Fixed, so the rendered file does not depend on the host.
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# Below uvicorn's (vLLM's) 5 s keep-alive: Envoy drops an idle connection before the
# backend does, so a request never races a server-side close.
_BACKEND_IDLE_TIMEOUT_S = 4


def clusters(cfg: Config) -> list[Cluster]:
    """The services cluster first, then the backends in first-seen order."""
    return [services_cluster(cfg),
            *(model_cluster(alias, m) for alias, m in sorted(cfg.models.items()))]


def _circuit_breakers() -> CircuitBreakers:
    return CircuitBreakers(
        thresholds=[
            CircuitBreakersThresholds(
                max_connections=CIRCUIT_BREAKER_MAX,
                max_pending_requests=CIRCUIT_BREAKER_MAX,
                max_requests=CIRCUIT_BREAKER_MAX,
            )
        ]
    )


def _discovery(host: str) -> tuple[ClusterDiscoveryType, ClusterDnsLookupFamily]:
    """STATIC for an IP literal, else STRICT_DNS (IPv4 first: `localhost` may resolve to ::1
    while vLLM listens on 127.0.0.1 only)."""
    if is_ip(host):
        return ClusterDiscoveryType.STATIC, ClusterDnsLookupFamily.AUTO
    return ClusterDiscoveryType.STRICT_DNS, ClusterDnsLookupFamily.V4_PREFERRED


def _load_assignment(name: str, host: str, port: int,
                     hostname: str = "") -> ClusterLoadAssignment:
    endpoint = LbEndpoint(endpoint=Endpoint(address=address(host, port), hostname=hostname))
    return ClusterLoadAssignment(
        cluster_name=name, endpoints=[LocalityLbEndpoints(lb_endpoints=[endpoint])]
    )


def services_cluster(cfg: Config) -> Cluster:
    """gRPC needs HTTP/2 upstream; every in-flight request holds a stream here. A DNS
    name (a headless Service) gives one endpoint per address, balanced per stream."""
    host, port = parse_hostport(cfg.envoy.services_address or cfg.services.grpc_listen)
    host = connect_host(host)
    kind, family = _discovery(host)
    h2 = UpstreamHttpOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
            http2_protocol_options=Http2ProtocolOptions()
        )
    )
    return Cluster(
        name=SERVICES_CLUSTER,
        type=kind,
        dns_lookup_family=family,
        connect_timeout=seconds(1),
        load_assignment=_load_assignment(SERVICES_CLUSTER, host, port),
        circuit_breakers=_circuit_breakers(),
        typed_extension_protocol_options={_HTTP_OPTIONS: pack(h2)},
    )


def _upstream_tls() -> TransportSocket:
    """TLS to https backends: SNI from each endpoint's hostname (auto_sni, set with the
    protocol options), certificate checked against the system CAs and that name."""
    validation = CertificateValidationContext(trusted_ca=DataSource(filename=SYSTEM_CA_BUNDLE))
    ctx = UpstreamTlsContext(common_tls_context=CommonTlsContext(validation_context=validation))
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=pack(ctx))


def _endpoints(name: str, model: Model) -> ClusterLoadAssignment:
    """Every backend of the alias, weighted; each endpoint's hostname is its URL's
    host[:port], sent as Host on requests (auto_host_rewrite) and health checks. Its
    metadata names the configured URL: ext_proc reads it (as the response attribute
    `xds.upstream_host_metadata`) for the usage record's `backend`."""
    eps = [
        LbEndpoint(
            endpoint=Endpoint(
                address=address(b.host, b.port),
                hostname=authority(b),
                health_check_config=EndpointHealthCheckConfig(hostname=authority(b)),
            ),
            load_balancing_weight=b.weight,
            metadata=Metadata(filter_metadata={
                BACKEND_METADATA: Struct(fields={"backend": Value(string_value=b.url)})}),
        )
        for b in model.backends
    ]
    return ClusterLoadAssignment(cluster_name=name,
                                 endpoints=[LocalityLbEndpoints(lb_endpoints=eps)])


def model_cluster(alias: str, model: Model) -> Cluster:
    """An alias's backends: Envoy balances by weight (least request), health-checks and
    ejects among them, so a failing backend is taken out while others serve."""
    name = model_cluster_name(alias)
    tls = model.backends[0].tls
    hosts = [b.host for b in model.backends]
    kind, family = _discovery(next((h for h in hosts if not is_ip(h)), hosts[0]))
    # vLLM serves HTTP/1.1.
    h1 = UpstreamHttpOptions(
        common_http_protocol_options=HttpProtocolOptions(
            idle_timeout=seconds(_BACKEND_IDLE_TIMEOUT_S)
        ),
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
            http_protocol_options=Http1ProtocolOptions()
        ),
        upstream_http_protocol_options=(
            UpstreamHttpProtocolOptions(auto_sni=True, auto_san_validation=True)
            if tls else None
        ),
    )
    health = HealthCheck(
        timeout=seconds(1),
        interval=seconds(5),
        unhealthy_threshold=2,
        healthy_threshold=1,
        # Keep probing clusters that get no traffic, so they are known healthy when needed.
        no_traffic_interval=seconds(5),
        http_health_check=HealthCheckHttpHealthCheck(path="/health"),
    )
    outlier = OutlierDetection(
        consecutive_5xx=5,
        consecutive_gateway_failure=3,
        # Gateway-failure ejection is off unless enforced (its default is 0 %).
        enforcing_consecutive_gateway_failure=100,
        interval=seconds(5),
        base_ejection_time=seconds(15),
        max_ejection_percent=100,
    )
    return Cluster(
        name=name,
        type=kind,
        dns_lookup_family=family,
        connect_timeout=seconds(2),
        lb_policy=ClusterLbPolicy.LEAST_REQUEST,
        load_assignment=_endpoints(name, model),
        health_checks=[health],
        outlier_detection=outlier,
        circuit_breakers=_circuit_breakers(),
        # Panic threshold 0 %: never send to hosts known to be down (Envoy's default 50 %
        # would, turning "no healthy backend" 503s into slow connect failures).
        common_lb_config=ClusterCommonLbConfig(healthy_panic_threshold=Percent(value=0)),
        typed_extension_protocol_options={_HTTP_OPTIONS: pack(h1)},
        transport_socket=_upstream_tls() if tls else None,
    )
