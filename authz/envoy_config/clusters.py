"""Envoy clusters: tokenbooth's gRPC services, and one cluster per distinct backend."""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path

from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    ClusterCommonLbConfig,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
    ClusterLbPolicy,
    ClusterTransportSocketMatch,
    OutlierDetection,
)
from envoy_data_plane.envoy.config.core.v3 import (
    AggregatedConfigSource,
    ApiVersion,
    ConfigSource,
    DataSource,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    HealthCheckHttpHealthCheck,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    HttpProtocolOptions,
    KeepaliveSettings,
    Metadata,
    TransportSocket,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    EndpointHealthCheckConfig,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.extensions.filters.http.credential_injector.v3 import (
    CredentialInjector,
)
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua
from envoy_data_plane.envoy.extensions.filters.http.upstream_codec.v3 import UpstreamCodec
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.http.injected_credentials.generic.v3 import Generic
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    CommonTlsContextCombinedCertificateValidationContext,
    GenericSecret,
    SdsSecretConfig,
    Secret,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions as UpstreamHttpOptions,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
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
from authz.envoy_config.names import WHOLE_ANSWERS
from policy.config import WHOLE_ANSWER_BYTES, Backend, Config, Model, parse_hostport
from policy.routing import BACKEND_METADATA, authority, model_cluster_name

_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Cluster metadata (under BACKEND_METADATA) of a model configured with no backend.
NO_BACKENDS = "no_backends"
# Where https backends' server certificates are verified against (Debian/Ubuntu path,
# also in the container image). Fixed, so the rendered file does not depend on the host.
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# Below uvicorn's (vLLM's) 5 s keep-alive: Envoy drops an idle connection before the
# backend does, so a request never races a server-side close.
_BACKEND_IDLE_TIMEOUT_S = 4
# The services: consecutive connect failures / resets that eject a replica, at most this
# share of them at once (so the last one never is), and the gRPC health checks' pace.
SERVICES_EJECT_AFTER = 2
SERVICES_MAX_EJECTION_PERCENT = 50
SERVICES_HC_INTERVAL_S = 1.0
SERVICES_HC_TIMEOUT_S = 1.0
# HTTP/2 PINGs on each connection to a replica: one unanswered for this long closes the
# connection. A frozen replica (SIGSTOP, a hung VM, a half-open connection after a
# partition) never closes its streams, and Envoy kept its ADS stream there: no config
# change reached Envoy until it died. Any frame received extends the wait, so a replica
# that is busy but alive is never cut.
SERVICES_PING_S = 5.0
# Backends: outlier detection never takes out more than half of an alias's backends (an
# alias with one backend is never ejected: only its health checks take it out).
BACKEND_MAX_EJECTION_PERCENT = 50
# Held in the upstream request, before the router sees it: an answer the backend cuts
# short never began for the router, which answers the client's request as for a backend
# that failed before answering (through every filter, so ext_proc records it as such).
_WHOLE_ANSWERS_LUA = """\
function envoy_on_response(h)
  local headers = h:headers()
  local length = tonumber(headers:get("content-length") or "")
  local kind = headers:get("content-type") or ""
  if length and length > 0 and length <= WHOLE_BYTES
      and not string.find(kind, "event-stream", 1, true) then
    h:body()
  end
end
"""


def clusters(cfg: Config) -> list[Cluster]:
    """The services cluster first, then the backends in first-seen order."""
    return [services_cluster(cfg),
            *(model_cluster(alias, m, whole_bytes=cfg.whole_answer_limit)
              for alias, m in sorted(cfg.models.items()))]


def _circuit_breakers(retries: bool = False) -> CircuitBreakers:
    """`retries`: no cap on concurrent retries (Envoy's default, 3, would drop most of
    the retries a replica's death causes under load)."""
    return CircuitBreakers(
        thresholds=[
            CircuitBreakersThresholds(
                max_connections=CIRCUIT_BREAKER_MAX,
                max_pending_requests=CIRCUIT_BREAKER_MAX,
                max_requests=CIRCUIT_BREAKER_MAX,
                max_retries=CIRCUIT_BREAKER_MAX if retries else None,
            )
        ]
    )


def _discovery(*hosts: str) -> tuple[ClusterDiscoveryType, ClusterDnsLookupFamily]:
    """STATIC when every host is an IP literal, else STRICT_DNS (IPv4 first: `localhost`
    may resolve to ::1 while vLLM listens on 127.0.0.1 only)."""
    if all(is_ip(h) for h in hosts):
        return ClusterDiscoveryType.STATIC, ClusterDnsLookupFamily.AUTO
    return ClusterDiscoveryType.STRICT_DNS, ClusterDnsLookupFamily.V4_PREFERRED


def services_endpoints(cfg: Config) -> list[tuple[str, int]]:
    """Where Envoy reaches the services: `envoy.services_addresses`, else
    `envoy.services_address`, else `services.grpc_listen` (wildcards through loopback)."""
    env = cfg.envoy
    listed = env.services_addresses or (env.services_address or cfg.services.grpc_listen,)
    out = []
    for hostport in listed:
        host, port = parse_hostport(hostport)
        out.append((connect_host(host), port))
    return out


def services_cluster(cfg: Config) -> Cluster:
    """gRPC needs HTTP/2 upstream; every in-flight request holds a stream here. A DNS
    name (a headless Service) gives one endpoint per address, balanced per stream. A
    replica that dies is taken out at once by its connect failures (outlier detection)
    and kept out by gRPC health checks; calls that could not reach it are retried on
    another (see http_filters._grpc)."""
    endpoints = services_endpoints(cfg)
    kind, family = _discovery(*(h for h, _ in endpoints))
    h2 = UpstreamHttpOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
            http2_protocol_options=Http2ProtocolOptions(
                connection_keepalive=KeepaliveSettings(
                    interval=seconds(SERVICES_PING_S), timeout=seconds(SERVICES_PING_S)))
        )
    )
    lb_endpoints = [LbEndpoint(endpoint=Endpoint(address=address(h, p))) for h, p in endpoints]
    return Cluster(
        name=SERVICES_CLUSTER,
        type=kind,
        dns_lookup_family=family,
        connect_timeout=seconds(1),
        load_assignment=ClusterLoadAssignment(
            cluster_name=SERVICES_CLUSTER,
            endpoints=[LocalityLbEndpoints(lb_endpoints=lb_endpoints)]),
        # grpc.health.v1 on the whole server (service ""): NOT_SERVING from the start of a
        # replica's graceful shutdown, so Envoy opens no new streams to it.
        health_checks=[_health_check(SERVICES_HC_INTERVAL_S, SERVICES_HC_TIMEOUT_S,
                                     HealthCheckGrpcHealthCheck(service_name=""))],
        # A replica gone from DNS (a pod terminating: out of the headless Service's
        # endpoints from its preStop on) takes no new streams although its health check
        # still passes; its open ones drain. Else it took new streams for the whole
        # preStop, and those open at its stop were charged whole (deploy review).
        ignore_health_on_host_removal=True,
        outlier_detection=_local_origin_outliers(
            failures=SERVICES_EJECT_AFTER, interval_s=1, ejection_s=5,
            max_percent=SERVICES_MAX_EJECTION_PERCENT),
        # Envoy's default panic threshold (50 %) stays: with every replica marked down
        # (at start-up, say) Envoy still tries them rather than failing every request.
        circuit_breakers=_circuit_breakers(retries=True),
        typed_extension_protocol_options={_HTTP_OPTIONS: pack(h2)},
    )


def _health_check(interval_s: float, timeout_s: float,
                  check: HealthCheckHttpHealthCheck | HealthCheckGrpcHealthCheck) -> HealthCheck:
    """Active checks: down after two failures, up after one success. Clusters that get
    no traffic are probed at the same pace, so they are known healthy when needed."""
    grpc = isinstance(check, HealthCheckGrpcHealthCheck)
    return HealthCheck(
        timeout=seconds(timeout_s),
        interval=seconds(interval_s),
        unhealthy_threshold=2,
        healthy_threshold=1,
        no_traffic_interval=seconds(interval_s),
        http_health_check=None if grpc else check,
        grpc_health_check=check if grpc else None,
    )


def _local_origin_outliers(failures: int, interval_s: float, ejection_s: float,
                           max_percent: int) -> OutlierDetection:
    """Eject on consecutive locally originated failures only (connect failures, resets,
    timeouts), never on a status code an upstream answered: a tenant's own requests
    cannot take a host out for everyone. `max_percent` caps how many are out at once."""
    return OutlierDetection(
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=failures,
        enforcing_consecutive_local_origin_failure=100,
        # Answered errors (5xx, 502-504 from the backend) count but never eject.
        consecutive_5xx=5,
        enforcing_consecutive_5xx=0,
        enforcing_consecutive_gateway_failure=0,
        enforcing_success_rate=0,
        enforcing_local_origin_success_rate=0,
        interval=seconds(interval_s),
        base_ejection_time=seconds(ejection_s),
        max_ejection_percent=max_percent,
    )


# A backend's /health, every 5 s; two failures in a row mark it down. A refused
# connection or an error status fails at once; an answer gets 3 s: a backend slowed by
# one tenant's load (its /health queued behind large prompts) was marked down at 1 s,
# and with it the alias, for every org (resource tester).
BACKEND_HC_INTERVAL_S = 5
BACKEND_HC_TIMEOUT_S = 3

# Endpoint metadata that picks a cluster's transport socket (Envoy's key).
_SOCKET_MATCH = "envoy.transport_socket_match"


def _upstream_tls(ca_file: Path | None, host: str, static_secrets: bool) -> TransportSocket:
    """TLS to an https backend `host` (its URL's): SNI that name (none for an address),
    its certificate checked against the model's `backend_ca_file`, else the system CAs,
    and against that name. Not Envoy's auto_sni and auto_san_validation: those take the
    name from the Host header the client sent, so a certificate had to name the
    gateway's own host, and a client chose the name checked (retest tester).

    The CAs come as a secret (`ca_secret`), over ADS or from the bootstrap with
    `static_secrets`: Envoy watches the files of the secrets it is sent, so a CA file
    rotated in place (a ConfigMap's `..data` swap) is read again. Inline in the cluster
    it was read once: a rotated CA left the model at 503 until Envoy restarted (reload
    tester)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    san = SubjectAltNameMatcher(
        san_type=SubjectAltNameMatcherSanType.DNS if ip is None
        else SubjectAltNameMatcherSanType.IP_ADDRESS,
        matcher=StringMatcher(exact=host if ip is None else str(ip)))
    cas = SdsSecretConfig(name=ca_secret_name(ca_file), sds_config=_sds_source(static_secrets))
    validation = CommonTlsContextCombinedCertificateValidationContext(
        default_validation_context=CertificateValidationContext(
            match_typed_subject_alt_names=[san]),
        validation_context_sds_secret_config=cas)
    ctx = UpstreamTlsContext(
        common_tls_context=CommonTlsContext(combined_validation_context=validation),
        sni=host if ip is None else "")
    return TransportSocket(name="envoy.transport_sockets.tls", typed_config=pack(ctx))


def ca_secret_name(ca_file: Path | None) -> str:
    """The secret of a CA file (the system CAs' without one): named after its path."""
    digest = hashlib.sha256(str(ca_file or SYSTEM_CA_BUNDLE).encode()).hexdigest()[:12]
    return f"backend_ca_{digest}"


def ca_secret(ca_file: Path | None) -> Secret:
    """The CAs https backends are checked against, as Envoy loads them: from its disk."""
    return Secret(name=ca_secret_name(ca_file), validation_context=CertificateValidationContext(
        trusted_ca=DataSource(filename=str(ca_file or SYSTEM_CA_BUNDLE))))


def _sds_source(static_secrets: bool) -> ConfigSource | None:
    """Where a cluster's secrets come from: ADS, or (None) the bootstrap's own."""
    return None if static_secrets else ConfigSource(ads=AggregatedConfigSource(),
                                                    resource_api_version=ApiVersion.V3)


def _tls_matches(model: Model, static_secrets: bool) -> list[ClusterTransportSocketMatch]:
    """One TLS socket per backend host of an https model, picked by each endpoint's
    `_SOCKET_MATCH` metadata (`_endpoints`)."""
    hosts = dict.fromkeys(b.endpoint[1] for b in model.backends if b.tls)
    return [ClusterTransportSocketMatch(
        name=f"tls-{i}", match=Struct(fields={"tls_host": Value(string_value=h)}),
        transport_socket=_upstream_tls(model.backend_ca_file, h, static_secrets))
        for i, h in enumerate(hosts)]


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
                BACKEND_METADATA: Struct(fields={"backend": Value(string_value=b.url)}),
                **({_SOCKET_MATCH: Struct(fields={
                    "tls_host": Value(string_value=b.endpoint[1])})} if b.tls else {})}),
        )
        for b in model.backends
    ]
    return ClusterLoadAssignment(cluster_name=name,
                                 endpoints=[LocalityLbEndpoints(lb_endpoints=eps)])


def credential_secret_name(backend: Backend) -> str | None:
    """The SDS secret holding a backend's key: named after where the key is read from
    (never after the key), so backends sharing a source share one secret."""
    source = backend.credential
    if source is None:
        return None
    digest = hashlib.sha256(f"{source[0]}:{source[1]}".encode()).hexdigest()[:12]
    return f"backend_key_{digest}"


def credential_secret(backend: Backend) -> Secret | None:
    """The secret as Envoy loads it: a reference to its own environment variable or to a
    file on its own disk. The key itself is in no config, rendered or served."""
    name, source = credential_secret_name(backend), backend.credential
    if name is None or source is None:
        return None
    kind, where = source
    data = (DataSource(environment_variable=where) if kind == "env"
            else DataSource(filename=where))
    return Secret(name=name, generic_secret=GenericSecret(secret=data))


def whole_answers(max_bytes: int) -> HttpFilter:
    """A backend's answer that is not a stream, of a known length up to `max_bytes`,
    reaches the router (and so ext_proc) whole: its bytes and their end in one piece, one
    ext_proc message where its bytes and then an empty end cost two (a gRPC round trip
    per JSON request: ~0.3 ms and ~200 µs of CPU, bench/README.md). A stream, an answer
    without content-length or a larger one (embeddings of megabytes) flows as it comes."""
    return HttpFilter(name=WHOLE_ANSWERS, typed_config=pack(
        Lua(default_source_code=DataSource(
            inline_string=_WHOLE_ANSWERS_LUA.replace("WHOLE_BYTES", str(max_bytes))))))


def _upstream_filters(model: Model, static_secrets: bool, whole_bytes: int,
                      ) -> list[HttpFilter]:
    """Upstream filters: answers held whole (`whole_answers`); `Authorization: Bearer
    <key>` on every request to a backend with a key (overwriting any, though ext_authz
    already removed the client's); then the codec. The secret comes over ADS, or from the
    bootstrap with `static_secrets`. None of them: no filter at all (not the codec alone)."""
    codec = HttpFilter(name="envoy.filters.http.upstream_codec",
                       typed_config=pack(UpstreamCodec()))
    whole = [whole_answers(whole_bytes)] if whole_bytes else []
    name = credential_secret_name(model.backends[0]) if model.backends else None
    if name is None:
        return [*whole, codec] if whole else []
    sds = SdsSecretConfig(name=name, sds_config=_sds_source(static_secrets))
    generic = Generic(credential=sds, header="Authorization", header_value_prefix="Bearer ")
    injector = CredentialInjector(overwrite=True, credential=TypedExtensionConfig(
        name="envoy.http.injected_credentials.generic", typed_config=pack(generic)))
    return [*whole,
            HttpFilter(name="envoy.filters.http.credential_injector", typed_config=pack(injector)),
            codec]


def model_cluster(alias: str, model: Model, static_secrets: bool = False,
                  whole_bytes: int = WHOLE_ANSWER_BYTES) -> Cluster:
    """An alias's backends: Envoy balances by weight (least request), health-checks and
    ejects among them, so a failing backend is taken out while others serve. A model
    with no backend is marked in the cluster's metadata: its 503 is not worth a retry."""
    name = model_cluster_name(alias)
    matches = _tls_matches(model, static_secrets)
    kind, family = _discovery(*(b.host for b in model.backends))
    # vLLM serves HTTP/1.1.
    h1 = UpstreamHttpOptions(
        common_http_protocol_options=HttpProtocolOptions(
            idle_timeout=seconds(_BACKEND_IDLE_TIMEOUT_S)
        ),
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
            http_protocol_options=Http1ProtocolOptions()
        ),
        http_filters=_upstream_filters(model, static_secrets, whole_bytes),
    )
    return Cluster(
        name=name,
        type=kind,
        dns_lookup_family=family,
        connect_timeout=seconds(2),
        lb_policy=ClusterLbPolicy.LEAST_REQUEST,
        load_assignment=_endpoints(name, model),
        health_checks=[_health_check(BACKEND_HC_INTERVAL_S, BACKEND_HC_TIMEOUT_S,
                                     HealthCheckHttpHealthCheck(path="/health"))],
        # Connection failures, resets and timeouts eject, never a tenant's error answers;
        # at most half of the backends at once, so ejection alone never darkens an alias.
        outlier_detection=_local_origin_outliers(
            failures=3, interval_s=5, ejection_s=15, max_percent=BACKEND_MAX_EJECTION_PERCENT),
        circuit_breakers=_circuit_breakers(),
        # Panic threshold 0 %: never send to hosts the health checks know are down (Envoy's
        # default 50 % would, turning "no healthy backend" 503s into slow connect failures).
        common_lb_config=ClusterCommonLbConfig(healthy_panic_threshold=Percent(value=0)),
        typed_extension_protocol_options={_HTTP_OPTIONS: pack(h1)},
        # Each endpoint's own (its host's name); the first host's for one unmatched.
        transport_socket=matches[0].transport_socket if matches else None,
        transport_socket_matches=matches,
        metadata=None if model.backends else Metadata(filter_metadata={
            BACKEND_METADATA: Struct(fields={NO_BACKENDS: Value(bool_value=True)})}),
    )
