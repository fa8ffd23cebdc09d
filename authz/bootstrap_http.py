"""The HTTP connection manager: filters (buffer → ext_authz → ext_proc → router), the
route, the access log."""

from __future__ import annotations

from typing import Any

from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutationRules
from envoy_data_plane.envoy.config.core.v3 import (
    ApiVersion,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    SubstitutionFormatString,
)
from envoy_data_plane.envoy.config.route.v3 import (
    RetryPolicy,
    RetryPolicyRetryBackOff,
    RetryPolicyRetryHostPredicate,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.filters.http.buffer.v3 import Buffer
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import ExtAuthz
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    MetadataOptions,
    MetadataOptionsMetadataNamespaces,
    ProcessingMode,
    ProcessingModeBodySendMode,
    ProcessingModeHeaderSendMode,
)
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
    HttpFilter,
    RequestIdExtension,
)
from envoy_data_plane.envoy.extensions.request_id.uuid.v3 import UuidRequestIdConfig
from envoy_data_plane.envoy.extensions.retry.host.previous_hosts.v3 import PreviousHostsPredicate
from envoy_data_plane.envoy.type.matcher.v3 import ListStringMatcher, RegexMatcher, StringMatcher
from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
from envoy_data_plane.google.protobuf import Struct, Value

from authz.bootstrap_common import SERVICES_CLUSTER, ms, pack, seconds
from authz.bootstrap_replies import local_reply_config
from policy.config import Config
from policy.routing import CLUSTER_HEADER, UPSTREAM_HEADER

BUFFER = "envoy.filters.http.buffer"
EXT_AUTHZ = "envoy.filters.http.ext_authz"
EXT_PROC = "envoy.filters.http.ext_proc"
ROUTER = "envoy.filters.http.router"

# What the access log records: never the authorization / x-api-key headers.
_ACCESS_LOG_FIELDS = {
    "start_time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",
    "protocol": "%PROTOCOL%",
    "status": "%RESPONSE_CODE%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "response_flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "user_agent": "%REQ(USER-AGENT)%",
}


def body_limit(cfg: Config) -> Any:
    """The request-size limit, enforced first. Measured with Envoy 1.40: body bytes that
    arrive while ext_authz or ext_proc is waiting are held under flow control, not counted
    against the limit, so without this filter in front an oversized body is sometimes
    accepted and sometimes stalls until the idle timeout. In front, the limit is exact:
    413 past `max_request_body_bytes`, and ext_proc always gets the whole body at once."""
    return Buffer(max_request_bytes=cfg.max_request_body_bytes)


def _grpc(timeout_ms: int | None = None) -> Any:
    return GrpcService(
        envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=SERVICES_CLUSTER),
        timeout=ms(timeout_ms) if timeout_ms is not None else None,
    )


def ext_authz(cfg: Config) -> Any:
    """Keys, scopes, rate limits, budget admission; fails closed with a 503."""
    allowed = [
        *(StringMatcher(exact=h) for h in ("authorization", "x-api-key", "traceparent",
                                             "x-request-id")),
        # Sent so the service sees (and removes) spoofed internal headers.
        StringMatcher(prefix="x-tokenbooth-"),
    ]
    return ExtAuthz(
        # One unary Check per request: its deadline is the decision timeout.
        grpc_service=_grpc(cfg.envoy.decision_timeout_ms),
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=False,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        # A route picked from a header the service has just removed must not stick.
        clear_route_cache=True,
        allowed_headers=ListStringMatcher(patterns=allowed),
    )


def ext_proc(cfg: Config) -> Any:
    """Body checks, routing, reservation, usage. The response side is off here and
    switched on per request by the processor's `mode_override` (local replies such as
    ext_authz denials then never reach the processor)."""
    mode = ProcessingMode(
        request_header_mode=ProcessingModeHeaderSendMode.SEND,
        request_body_mode=ProcessingModeBodySendMode.BUFFERED,
        response_header_mode=ProcessingModeHeaderSendMode.SKIP,
        response_body_mode=ProcessingModeBodySendMode.NONE,
        request_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
        response_trailer_mode=ProcessingModeHeaderSendMode.SKIP,
    )
    return ExternalProcessor(
        # No deadline on the stream itself: it lives as long as the response it meters.
        grpc_service=_grpc(),
        failure_mode_allow=False,
        processing_mode=mode,
        # Each answer must come within the decision timeout.
        message_timeout=ms(cfg.envoy.decision_timeout_ms),
        # Defaults allow these already (only host, :authority, :scheme, :method and
        # x-envoy-* are off limits); stated so a tightening never blocks the body rewrite
        # (needs content-length) or the routing header.
        mutation_rules=HeaderMutationRules(
            allow_expression=RegexMatcher(regex="^(content-length|x-tokenbooth-.+)$")
        ),
        allow_mode_override=True,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        # The principal ext_authz decided on travels as its dynamic metadata.
        metadata_options=MetadataOptions(
            forwarding_namespaces=MetadataOptionsMetadataNamespaces(untyped=[EXT_AUTHZ])
        ),
    )


def route_config(cfg: Config) -> Any:
    """One route: the ext_proc service names the cluster in CLUSTER_HEADER and clears
    the route cache; the header never reaches the backend."""
    retry = RetryPolicy(
        # Only failures before the backend saw the request (or, for 503, before it
        # started generating): a retry never duplicates tokens already sent.
        retry_on="connect-failure,refused-stream,reset-before-request,retriable-status-codes",
        retriable_status_codes=[503],
        num_retries=2,
        retry_back_off=RetryPolicyRetryBackOff(
            base_interval=ms(250), max_interval=seconds(2)
        ),
        # Retry on another host of the backend where there is one (STRICT_DNS may give several).
        retry_host_predicate=[
            RetryPolicyRetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=pack(PreviousHostsPredicate()),
            )
        ],
        host_selection_retry_max_attempts=3,
    )
    route = Route(
        match=RouteMatch(prefix="/"),
        route=RouteAction(
            cluster_header=CLUSTER_HEADER,
            # Generations are long: Envoy's default 15 s would cut them.
            timeout=seconds(cfg.envoy.route_timeout_s),
            retry_policy=retry,
            # Host = the chosen backend's authority (its endpoint hostname), not ours.
            auto_host_rewrite=True,
        ),
        request_headers_to_remove=[CLUSTER_HEADER],
        # Which backend served: ext_proc reads it for the usage record and removes it.
        response_headers_to_add=[
            HeaderValueOption(
                header=HeaderValue(key=UPSTREAM_HEADER, value="%UPSTREAM_HOST_NAME%"),
                append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        ],
        # Buffering for ext_proc and for retries may reach the body limit (the listener's
        # 1 MiB default would be too small for larger limits).
        request_body_buffer_limit=cfg.max_request_body_bytes,
    )
    return RouteConfiguration(
        name="tokenbooth",
        virtual_hosts=[VirtualHost(name="tokenbooth", domains=["*"], routes=[route])],
    )


def _access_log() -> Any:
    fields = {k: Value(string_value=v) for k, v in _ACCESS_LOG_FIELDS.items()}
    fmt = SubstitutionFormatString(json_format=Struct(fields=fields))
    return AccessLog(
        name="envoy.access_loggers.stdout", typed_config=pack(StdoutAccessLog(log_format=fmt))
    )


def http_connection_manager(cfg: Config) -> Any:
    filters = [
        HttpFilter(name=BUFFER, typed_config=pack(body_limit(cfg))),
        HttpFilter(name=EXT_AUTHZ, typed_config=pack(ext_authz(cfg))),
        HttpFilter(name=EXT_PROC, typed_config=pack(ext_proc(cfg))),
        HttpFilter(name=ROUTER, typed_config=pack(Router())),
    ]
    return HttpConnectionManager(
        codec_type=HttpConnectionManagerCodecType.AUTO,
        stat_prefix="ingress",
        route_config=route_config(cfg),
        http_filters=filters,
        # Clients connect directly: their address is the real one, and x-forwarded-for
        # from them is not trusted.
        use_remote_address=True,
        request_id_extension=RequestIdExtension(typed_config=pack(UuidRequestIdConfig())),
        # Clients see the id their usage record carries.
        always_set_request_id_in_response=True,
        # A stream may sit idle between SSE chunks; the route timeout is the real bound.
        stream_idle_timeout=seconds(300),
        request_timeout=seconds(0),
        # ext_authz decides scopes on the path: /v1/./models and //v1/models must not
        # slip past it.
        normalize_path=True,
        merge_slashes=True,
        access_log=[_access_log()],
        local_reply_config=local_reply_config(cfg),
    )
