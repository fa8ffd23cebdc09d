"""The HTTP connection manager: filters ((CORS →) buffer → ext_authz → ext_proc → upstream errors
(Lua) → buffer → header_mutation → router), the routes, the access log."""

from __future__ import annotations

from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import (
    HeaderMutation as MutationRulesHeaderMutation,
)
from envoy_data_plane.envoy.config.core.v3 import (
    ApiVersion,
    BackoffStrategy,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    Http1ProtocolOptions,
    Http2ProtocolOptions,
    HttpProtocolOptions,
    HttpProtocolOptionsHeadersWithUnderscoresAction,
    SubstitutionFormatString,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.config.core.v3 import RetryPolicy as GrpcRetryPolicy
from envoy_data_plane.envoy.config.core.v3 import (
    RetryPolicyRetryHostPredicate as GrpcRetryHostPredicate,
)
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    RetryPolicy,
    RetryPolicyRetryBackOff,
    RetryPolicyRetryHostPredicate,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    RouteMatchConnectMatcher,
    VirtualHost,
)
from envoy_data_plane.envoy.config.route.v3 import HeaderMatcher as RouteHeaderMatcher
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.filters.http.buffer.v3 import Buffer, BufferPerRoute
from envoy_data_plane.envoy.extensions.filters.http.cors.v3 import Cors, CorsPolicy
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import ExtAuthz, ExtAuthzPerRoute
from envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 import (
    ExternalProcessor,
    ExtProcOverrides,
    ExtProcPerRoute,
    MetadataOptions,
    MetadataOptionsMetadataNamespaces,
    ProcessingMode,
    ProcessingModeBodySendMode,
    ProcessingModeHeaderSendMode,
)
from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import (
    HeaderMutation as HeaderMutationFilter,
)
from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import (
    Mutations as HeaderMutations,
)
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua, LuaPerRoute
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
    HttpConnectionManagerUpgradeConfig,
    HttpFilter,
    RequestIdExtension,
)
from envoy_data_plane.envoy.extensions.formatter.req_without_query.v3 import ReqWithoutQuery
from envoy_data_plane.envoy.extensions.request_id.uuid.v3 import UuidRequestIdConfig
from envoy_data_plane.envoy.extensions.retry.host.previous_hosts.v3 import PreviousHostsPredicate
from envoy_data_plane.envoy.type.matcher.v3 import (
    ListStringMatcher,
    MetadataMatcher,
    MetadataMatcherPathSegment,
    RegexMatcher,
    StringMatcher,
    ValueMatcher,
)
from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
from envoy_data_plane.google.protobuf import Struct, Value

from authz.envoy_config.common import (
    REQUEST_HEADERS_TIMEOUT_S,
    REQUEST_TIMEOUT_S,
    SERVICES_CLUSTER,
    ms,
    pack,
    seconds,
)
from authz.envoy_config.local_replies import CONNECT_REFUSED, HEALTH_METHOD, local_reply_config
from authz.envoy_config.names import (
    EXT_AUTHZ,
    EXT_PROC,
    MODELS_ROUTE,
    UPSTREAM_ERRORS,
    UPSTREAM_STATUS_KEY,
)
from authz.envoy_config.stream_meter import (
    METER_ECHO_KEY,
    METER_KEY,
    METER_STEPS_KEY,
    meter_access_log,
    meter_lua,
)
from policy.config import Config
from policy.errors import ApiError
from policy.limits import RATE_HEADER_NAMES
from policy.routing import CLUSTER_HEADER, CLUSTER_KEY

# Downstream HTTP/2: streams per connection and flow-control windows (see
# `http_connection_manager`).
H2_MAX_CONCURRENT_STREAMS = 100
H2_STREAM_WINDOW_BYTES = 64 << 10
H2_CONNECTION_WINDOW_BYTES = 1 << 20
BUFFER = "envoy.filters.http.buffer"
CORS = "envoy.filters.http.cors"
ROUTER = "envoy.filters.http.router"
HOLD = "tokenbooth.hold_for_routing"  # a second buffer filter (names must be unique)
SET_CLUSTER = "envoy.filters.http.header_mutation"
MODELS_PATH = "/v1/models"
# vLLM's liveness path: load balancers, routers and benchmark clients probe it first.
HEALTH_PATH = "/health"
HEALTH_METHODS = "GET, HEAD, OPTIONS"
NO_CLUSTER = "tokenbooth_unrouted"  # never defined
# What ext_proc's body rewrite may add: a model name (config-bound) and stream_options.
REWRITE_SLACK = 64 << 10
# What ext_proc reads from the request headers and the response, as attributes.
REQUEST_ATTRIBUTES = ("request.path", "request.method", "request.id",
                      "request.headers['traceparent']")
# `response.code_details` tells Envoy's own 502s apart: a backend never reached
# (connect failure, circuit breaker) from one that failed with the request in hand.
RESPONSE_ATTRIBUTES = ("response.code", "response.code_details", "xds.upstream_host_metadata")
# ext_proc's metadata key marking a streamed response (its own route and timeouts). Equal
# to STREAM_KEY in authz/services/exchange.py (a test holds them equal).
STREAM_KEY = "stream"
# Calls to the services that could not reach a replica (it died, or is shutting down) go
# to another one at once. A Check has no side effects, so it is retried after a reset
# too; an ext_proc stream only when the replica never saw it.
AUTHZ_RETRY_ON = "connect-failure,refused-stream,reset,unavailable"
PROC_RETRY_ON = "connect-failure,refused-stream,reset-before-request"
PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
# What the inference routes send backends as Accept-Encoding, in place of the client's.
ACCEPT_ENCODING = "accept-encoding"
IDENTITY = "identity"
# Headers that carry credentials in other clients' conventions, removed upstream.
MISPLACED_KEY_HEADERS = ("proxy-authorization", "api-key", "x-goog-api-key", "cookie")
# vLLM's scheduling priority (read before the body's `priority`, which the gateway
# refuses) and data-parallel rank as headers: the backend's queue order and balancing are
# the operator's, not a tenant's (a rank out of range is vLLM's 400, after the hold). And
# its ORCA load report's request: a backend's load is the operator's, not a tenant's.
BACKEND_CONTROL_HEADERS = ("x-vllm-priority", "x-data-parallel-rank",
                           "endpoint-load-metrics-format")
# Where a client may claim another address: Envoy is the edge (`use_remote_address`), so
# the backend gets the peer in x-forwarded-for (appended last, where proxies read it),
# and these, which nothing here sets, are dropped (security and TLS testers).
SPOOFABLE_HEADERS = ("x-real-ip", "forwarded", "x-client-ip", "true-client-ip")
# The gateway's own headers, removed from a backend's response, and a backend's ORCA
# load report (KV cache use, queue lengths: what other tenants' requests load it with).
INTERNAL_RESPONSE_HEADERS = ("x-tokenbooth-org", "x-tokenbooth-key-id", CLUSTER_HEADER,
                             "endpoint-load-metrics")
# A backend's own CORS answer (vLLM allows every origin by default): the gateway's
# envoy.cors_allow_origins decides which browsers may call, not the backend's.
BACKEND_CORS_HEADERS = ("access-control-allow-origin", "access-control-allow-credentials",
                        "access-control-expose-headers", "access-control-allow-methods",
                        "access-control-allow-headers", "access-control-max-age")

# What the access log keeps of a client's strings (the request id is Envoy's own UUID):
# without a cap, a client with no key wrote ~60 KiB lines (a path and a user-agent up to
# Envoy's header limit) at every request.
LOG_PATH_CHARS = 1024
LOG_USER_AGENT_CHARS = 256
LOG_METHOD_CHARS = 32
# What the access log records: never the authorization / x-api-key headers.
_ACCESS_LOG_FIELDS = {
    "start_time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": f"%REQ(:METHOD):{LOG_METHOD_CHARS}%",
    # Without the query: a client may put its key there (`?api-key=sk-…`).
    "path": f"%REQ_WITHOUT_QUERY(:PATH):{LOG_PATH_CHARS}%",
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
    "user_agent": f"%REQ(USER-AGENT):{LOG_USER_AGENT_CHARS}%",
}


def body_limit(cfg: Config) -> Buffer:
    """The request-size limit, enforced first. Measured with Envoy 1.40: body bytes that
    arrive while ext_authz or ext_proc is waiting are held under flow control, not counted
    against the limit, so without this filter in front an oversized body is sometimes
    accepted and sometimes stalls until the idle timeout. In front, the limit is exact:
    413 past `max_request_body_bytes`, and ext_proc always gets the whole body at once.

    Measured again (1.40) with ext_authz first and this filter right after it, so that a
    client without a key would get its 401 before any of its body is buffered: a body
    far over the limit sent at once over HTTP/1.1 stalled until the request timeout
    (tests/e2e/test_body_limit.py, 2 of its 32 cases). The bytes that arrive during the
    Check cross the stream's buffer watermark while ext_authz streams, which pauses
    reading; when this filter then switches to buffering with a lower limit, Envoy fires
    no second crossing (no 413) and never resumes reading. Hence this order, and the
    bounds on what a keyless client can make Envoy hold (HTTP/2 windows, connections,
    `envoy.max_heap_bytes`)."""
    return Buffer(max_request_bytes=cfg.max_request_body_bytes)


def _grpc(retry_on: str, per_try_ms: int, timeout_ms: int | None = None) -> GrpcService:
    """The services cluster, with retries on another replica (see clusters.services_cluster
    for the health checks and ejection that keep a dead one out). Envoy makes the back-off's
    `max_interval` each try's timeout too (Http::Utility::convertCoreToRouteRetryPolicy):
    it is the decision timeout, so a slow answer is waited for as configured, not cut at a
    back-off's length and asked again (a Check slower than 250 ms was retried twice, then
    answered Envoy's 503; under load, three Checks for one request)."""
    retry = GrpcRetryPolicy(
        retry_on=retry_on,
        num_retries=2,
        # (A base above the max is an Envoy bug report: decision timeouts under 25 ms.)
        retry_back_off=BackoffStrategy(base_interval=ms(min(25, per_try_ms)),
                                       max_interval=ms(per_try_ms)),
        retry_host_predicate=[GrpcRetryHostPredicate(
            name=PREVIOUS_HOSTS, typed_config=pack(PreviousHostsPredicate()))],
        host_selection_retry_max_attempts=3,
    )
    return GrpcService(
        envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=SERVICES_CLUSTER),
        timeout=ms(timeout_ms) if timeout_ms is not None else None,
        retry_policy=retry,
    )


def ext_authz(cfg: Config) -> ExtAuthz:
    """Keys, scopes, rate limits, budget admission; fails closed with a 503."""
    allowed = [
        *(StringMatcher(exact=h) for h in ("authorization", "x-api-key", "traceparent",
                                             "x-request-id", "content-encoding")),
        # Sent so the service sees (and removes) spoofed internal headers.
        StringMatcher(prefix="x-tokenbooth-"),
    ]
    return ExtAuthz(
        # One unary Check per request: its deadline is the decision timeout.
        grpc_service=_grpc(AUTHZ_RETRY_ON, cfg.envoy.decision_timeout_ms,
                           cfg.envoy.decision_timeout_ms),
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=False,
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        # A route picked from a header the service has just removed must not stick.
        clear_route_cache=True,
        allowed_headers=ListStringMatcher(patterns=allowed),
    )


def ext_proc(cfg: Config) -> ExternalProcessor:
    """Body checks, routing, reservation, usage, in the fewest messages (each costs the
    service ~100 µs of CPU): no header messages at all. The request body arrives with
    what the service needs from the headers as attributes (and ext_authz's principal as
    metadata); the response arrives as body chunks, the first with the status and the
    serving endpoint as attributes. Routing and rate-limit headers go back as dynamic
    metadata (see `hold_for_routing` and the route)."""
    envoy_meters = cfg.envoy.meters_streams
    mode = _mode(request_headers=False, request_body=ProcessingModeBodySendMode.BUFFERED,
                 response_body=ProcessingModeBodySendMode.STREAMED,
                 response_headers=envoy_meters)
    return ExternalProcessor(
        # With Envoy metering streams, the response headers' answer hands a stream over
        # to it (its body mode NONE): see authz/envoy_config/stream_meter.py.
        allow_mode_override=envoy_meters,
        # No deadline on the stream itself: it lives as long as the response it meters.
        grpc_service=_grpc(PROC_RETRY_ON, cfg.envoy.decision_timeout_ms),
        # `serve` fails open, yet no request reaches a backend without ext_proc's answer:
        # only that answer names the cluster (`cluster_from_metadata`), and without one
        # the request ends in a 503 (local_replies); a response in flight when the
        # service dies is served to its end, unmetered. `cut` resets that response and,
        # as every response body passes through ext_proc, the body of Envoy's own error
        # replies (ext_authz's 503) while the service is down: status, then a reset.
        failure_mode_allow=cfg.envoy.on_metering_loss == "serve",
        processing_mode=mode,
        # Each answer must come within the decision timeout.
        message_timeout=ms(cfg.envoy.decision_timeout_ms),
        request_attributes=list(REQUEST_ATTRIBUTES),
        response_attributes=list(RESPONSE_ATTRIBUTES),
        status_on_error=HttpStatus(code=StatusCode.ServiceUnavailable),
        metadata_options=MetadataOptions(
            # The principal ext_authz decided on travels as its dynamic metadata...
            # (and a backend's error status, see `upstream_errors`)...
            forwarding_namespaces=MetadataOptionsMetadataNamespaces(
                untyped=[EXT_AUTHZ, UPSTREAM_ERRORS]),
            # ...and the route and rate-limit headers come back as ext_proc's.
            receiving_namespaces=MetadataOptionsMetadataNamespaces(untyped=[EXT_PROC]),
        ),
    )


def _mode(request_headers: bool, request_body: ProcessingModeBodySendMode,
          response_body: ProcessingModeBodySendMode,
          response_headers: bool = False) -> ProcessingMode:
    """An ext_proc processing mode; trailers are never sent."""
    skip, send = ProcessingModeHeaderSendMode.SKIP, ProcessingModeHeaderSendMode.SEND
    return ProcessingMode(
        request_header_mode=send if request_headers else skip,
        request_body_mode=request_body,
        response_header_mode=send if response_headers else skip,
        response_body_mode=response_body,
        request_trailer_mode=skip,
        response_trailer_mode=skip,
    )


def hold_for_routing(cfg: Config) -> Buffer:
    """With request headers skipped, ext_proc lets them on at once; this second buffer
    holds them (and so the router's choice of cluster) until ext_proc has answered the
    body. It also sets content-length for the rewritten body, which may be a little
    longer than the client's (the upstream model name, `stream_options`): hence the slack,
    so a body at the limit is not refused after it was admitted."""
    return Buffer(max_request_bytes=rewritten_body_limit(cfg))


def rewritten_body_limit(cfg: Config) -> int:
    return cfg.max_request_body_bytes + REWRITE_SLACK


def cluster_from_metadata() -> HeaderMutationFilter:
    """CLUSTER_HEADER := the cluster ext_proc chose (absent when ext_proc saw no body)."""
    return HeaderMutationFilter(mutations=HeaderMutations(request_mutations=[
        MutationRulesHeaderMutation(append=HeaderValueOption(
            header=HeaderValue(key=CLUSTER_HEADER, value=_proc_metadata(CLUSTER_KEY)),
            append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
            keep_empty_value=False,
        ))
    ]))


_GATEWAY_RATE = ", ".join(f'["{n}"] = true' for n in RATE_HEADER_NAMES)
# A backend's error answer (never Envoy's own local replies: only upstream responses
# carry x-envoy-upstream-service-time, so the router must not suppress Envoy's headers):
# its status goes into this filter's metadata, for ext_proc (sent with its messages),
# which rewrites the body as OpenAI-shaped JSON; a 5xx becomes the contract's 502. A
# success costs one Lua call (measured 10-20 us of Envoy CPU) and no ext_proc message
# (sending ext_proc the response headers would cost ~100 us of Python per request).
_UPSTREAM_ERRORS_LUA = f"""\
function envoy_on_request(h)
  -- No inference endpoint reads a query, and a client may put its key there: the
  -- backend gets the path alone (ext_authz has read the whole one already).
  local headers = h:headers()
  local path = headers:get(":path")
  local q = path and string.find(path, "?", 1, true)
  if q then
    headers:replace(":path", string.sub(path, 1, q - 1))
  end
end

-- The gateway's own rate-limit headers (the route added them from ext_proc's metadata).
local GATEWAY_RATE = {{{_GATEWAY_RATE}}}

-- What a backend's answer must not make a client or a cache do for the gateway's
-- origin: pin or unpin its TLS (HSTS), move it to another host (Alt-Svc, Refresh,
-- Location), ask for credentials (a browser's login prompt), or keep a completion in a
-- shared cache (Cache-Control: public).
local BACKEND_ONLY = {{["strict-transport-security"] = true, ["alt-svc"] = true,
  ["refresh"] = true, ["location"] = true, ["content-location"] = true,
  ["www-authenticate"] = true, ["proxy-authenticate"] = true, ["cache-control"] = true,
  ["expires"] = true, ["clear-site-data"] = true}}

-- What only the gateway may say, from a backend's answer: any x-tokenbooth-* header,
-- rate-limit headers past the gateway's own names, a retry verdict (the SDKs obey
-- x-should-retry over the status: a backend's `true` made them resend its 400s), Envoy's
-- own x-envoy-* (`x-envoy-overloaded` to the Envoys in front; the router's service time
-- stays), cookies (the gateway's origin sets none; keys, not cookies, authenticate) and
-- BACKEND_ONLY's.
function strip_backend(headers)
  local drop = {{}}
  for name, _ in pairs(headers) do
    -- Spelled with underscores too (`x_tokenbooth_org`): a CGI/WSGI reader takes it for
    -- the dashed name.
    local n = (string.gsub(name, "_", "-"))
    if string.sub(n, 1, 13) == "x-tokenbooth-" or n == "x-should-retry"
        or (string.sub(n, 1, 12) == "x-ratelimit-" and not GATEWAY_RATE[name])
        or (string.sub(n, 1, 8) == "x-envoy-" and name ~= "x-envoy-upstream-service-time")
        or n == "set-cookie" or n == "set-cookie2" or BACKEND_ONLY[n] then
      drop[#drop + 1] = name
    end
  end
  for _, name in ipairs(drop) do
    headers:remove(name)
  end
end

function envoy_on_response(h)
  local headers = h:headers()
  local status = headers:get(":status")
  local upstream = headers:get("x-envoy-upstream-service-time") ~= nil
  if upstream then
    strip_backend(headers)
  end
  -- 204, 205 and 304 have no body whatever their headers say.
  local empty = headers:get("content-length") == "0" or status == "204"
    or status == "205" or status == "304"
  -- A success with no body at all: no SDK parses an empty 200, and no usage reaches
  -- ext_proc. Marked as an error (a marked 2xx is an empty one): a 502 saying so.
  local empty_success = upstream and empty and status >= "200" and status < "300"
  -- A redirect is never an inference answer (and a client following it would send its
  -- key elsewhere): marked too, a 502 without its location.
  local redirect = upstream and status >= "300" and status < "400"
  if status < "400" and not empty_success and not redirect then
    METER(h)
    return
  end
  if not upstream then
    return
  end
  h:streamInfo():dynamicMetadata():set("{UPSTREAM_ERRORS}", "{UPSTREAM_STATUS_KEY}", status)
  headers:replace("content-type", "application/json")
  headers:remove("content-encoding")
  if redirect then
    headers:remove("location")
  end
  if status >= "500" or empty_success or redirect then
    headers:replace(":status", "502")
  end
  if empty_success then
    -- Charged its whole hold (the backend may have generated it all): the SDKs' two
    -- retries would each be charged as much again.
    headers:replace("x-should-retry", "false")
  end
  if empty then
    -- No body: no body message would reach ext_proc, which writes the error and the
    -- record (a 499 with the prompt charged, an empty 502). An empty JSON object reads
    -- as "no message" there.
    h:body(true):setBytes("{{}}")
  end
end
"""


# A success whose stream ext_proc asked Envoy to meter (its metadata's `meter`).
_METER_CALL = f"""\
local proc = h:streamInfo():dynamicMetadata():get("{EXT_PROC}")
    local how = proc and proc["{METER_KEY}"]
    if how then
      meter(h, how == "strip", headers:get("content-type"), headers:get("content-encoding"),
            proc["{METER_STEPS_KEY}"], proc["{METER_ECHO_KEY}"])
    end"""


def upstream_errors(cfg: Config) -> Lua:
    """Marks backend error answers (see _UPSTREAM_ERRORS_LUA); placed after ext_proc, so
    it sees the response first. With envoy.stream_metering: envoy, it also meters the
    streams ext_proc hands over (authz/envoy_config/stream_meter.py)."""
    if cfg.envoy.meters_streams:
        code = meter_lua(cfg) + _UPSTREAM_ERRORS_LUA.replace("METER(h)", _METER_CALL)
    else:
        code = _UPSTREAM_ERRORS_LUA.replace("    METER(h)\n", "")
    return Lua(default_source_code=DataSource(inline_string=code))


def _proc_metadata(key: str) -> str:
    return f"%DYNAMIC_METADATA({EXT_PROC}:{key})%"


def _health_route() -> Route:
    """`GET`, `HEAD` and `OPTIONS /health` (HAProxy's `option httpchk` sends OPTIONS
    unless told otherwise), answered by Envoy itself with 200 and no key (ext_authz and
    ext_proc off): it says Envoy is up, not that any backend is."""
    off = {EXT_AUTHZ: pack(ExtAuthzPerRoute(disabled=True)),
           EXT_PROC: pack(ExtProcPerRoute(disabled=True))}
    probe = RouteHeaderMatcher(name=":method", string_match=StringMatcher(
        safe_regex=RegexMatcher(regex=HEALTH_METHODS.replace(", ", "|"))))
    return Route(name="health", match=RouteMatch(path=HEALTH_PATH, headers=[probe]),
                 direct_response=DirectResponseAction(status=200),
                 typed_per_filter_config=off)


def _health_other_methods_route() -> Route:
    """Any other method on `/health`: the 405 with `allow` that every path gives, at once
    (nothing reads its body: no buffer waits for it)."""
    return _refusal_route("health-method", RouteMatch(path=HEALTH_PATH), HEALTH_METHOD,
                          (("allow", HEALTH_METHODS),))


def _connect_route() -> Route:
    """CONNECT (a client taking the gateway for a forward proxy) gets a 405 at once. It
    matches no other route, and its body never ends: the buffer filters would wait for
    it until the idle timeout, every filter before the router is off here."""
    return _refusal_route(
        "connect", RouteMatch(connect_matcher=RouteMatchConnectMatcher()), CONNECT_REFUSED)


def _refusal_route(name: str, match: RouteMatch, err: ApiError,
                   headers: tuple[tuple[str, str], ...] = ()) -> Route:
    """Envoy answers `err` itself, every filter before the router off."""
    off = {EXT_AUTHZ: pack(ExtAuthzPerRoute(disabled=True)),
           EXT_PROC: pack(ExtProcPerRoute(disabled=True)),
           BUFFER: pack(BufferPerRoute(disabled=True)),
           HOLD: pack(BufferPerRoute(disabled=True)),
           UPSTREAM_ERRORS: pack(LuaPerRoute(disabled=True))}
    return Route(
        name=name,
        match=match,
        direct_response=DirectResponseAction(
            status=err.status, body=DataSource(inline_string=err.body().decode())),
        response_headers_to_add=[HeaderValueOption(
            header=HeaderValue(key=k, value=v),
            append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD)
            for k, v in (("content-type", "application/json"), *headers)],
        typed_per_filter_config=off,
    )


def _models_route() -> Route:
    """GET /v1/models and /v1/models/{id} have no body: ext_proc takes their headers here
    and answers at once. A route to a cluster that does not exist, not a direct answer:
    Envoy's CORS filter reads its policy only on a route that forwards (a direct answer's
    preflight got a 401, its answers no CORS headers). Reached by the router only when
    ext_proc failed (it fails open): the local replies make that the same 503 as
    elsewhere (local_replies.py, by this route's name)."""
    headers_only = _mode(request_headers=True, request_body=ProcessingModeBodySendMode.NONE,
                         response_body=ProcessingModeBodySendMode.NONE)
    per_route = ExtProcPerRoute(overrides=ExtProcOverrides(processing_mode=headers_only))
    return Route(
        name=MODELS_ROUTE,
        match=RouteMatch(path_separated_prefix=MODELS_PATH),
        route=RouteAction(cluster=NO_CLUSTER),
        typed_per_filter_config={EXT_PROC: pack(per_route)},
    )


def _backend_retry() -> RetryPolicy:
    """Only failures before the backend saw the request (or, for 503, before it started
    generating): a retry never duplicates tokens already sent."""
    return RetryPolicy(
        retry_on="connect-failure,refused-stream,reset-before-request,retriable-status-codes",
        retriable_status_codes=[503],
        num_retries=2,
        retry_back_off=RetryPolicyRetryBackOff(
            base_interval=ms(250), max_interval=seconds(2)
        ),
        # Retry on another host of the backend where there is one (STRICT_DNS may give several).
        retry_host_predicate=[
            RetryPolicyRetryHostPredicate(
                name=PREVIOUS_HOSTS,
                typed_config=pack(PreviousHostsPredicate()),
            )
        ],
        host_selection_retry_max_attempts=3,
    )


def _proc_metadata_present(key: str) -> MetadataMatcher:
    return MetadataMatcher(filter=EXT_PROC, path=[MetadataMatcherPathSegment(key=key)],
                           value=ValueMatcher(present_match=True))


def _inference_route(cfg: Config, stream: bool) -> Route:
    """Matched only once ext_proc has answered (its metadata names the cluster): until
    then, and for good if it failed open, the request is on `_unrouted` and reaches no
    backend, whatever headers it carries. A stream (ext_proc's metadata says so) is cut
    after `stream_idle_s` with no byte either way, or at `max_stream_duration_s`; any
    other response must be whole within `route_timeout_s` (see EnvoySettings.idle_s)."""
    env = cfg.envoy
    match = [_proc_metadata_present(CLUSTER_KEY)]
    if stream:
        match.append(_proc_metadata_present(STREAM_KEY))
    return Route(
        name="inference_stream" if stream else "inference",
        match=RouteMatch(prefix="/", dynamic_metadata=match),
        route=RouteAction(
            cluster_header=CLUSTER_HEADER,
            # From the end of the request, retries included (Envoy's default 15 s would
            # cut generations).
            timeout=seconds(env.response_limit_s(stream)),
            idle_timeout=seconds(env.idle_s(stream)),
            retry_policy=_backend_retry(),
            # Host = the chosen backend's authority (its endpoint hostname), not ours.
            auto_host_rewrite=True,
        ),
        # Where a client may misplace its key (Azure's and Google's SDKs, a proxy's
        # credentials, a browser's cookies): never forwarded to a backend.
        request_headers_to_remove=[CLUSTER_HEADER, *MISPLACED_KEY_HEADERS,
                                   *BACKEND_CONTROL_HEADERS, *SPOOFABLE_HEADERS],
        # The answer must come uncompressed, whatever the client accepts: usage is read
        # from its bytes (ext_proc, the stream meter), and a compressed one is unreadable
        # (its record would be an estimate). `identity` rather than no header at all,
        # which by RFC 9110 allows any coding.
        # The body is the JSON ext_proc wrote, whatever type the client named (vLLM
        # refuses any but application/json, after the request was admitted).
        request_headers_to_add=[HeaderValueOption(
            header=HeaderValue(key=k, value=v),
            append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
        ) for k, v in ((ACCEPT_ENCODING, IDENTITY), ("content-type", "application/json"))],
        # A backend's own rate-limit, internal or CORS headers never pass for the
        # gateway's (removed before the admission's and the CORS filter's are added).
        response_headers_to_remove=[*RATE_HEADER_NAMES, *INTERNAL_RESPONSE_HEADERS,
                                    *BACKEND_CORS_HEADERS],
        # The admission's rate-limit headers, from ext_proc's metadata; absent ones are
        # left out (keys without limits, and refusals, which carry their own).
        response_headers_to_add=[
            HeaderValueOption(
                header=HeaderValue(key=name, value=_proc_metadata(name)),
                append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
                keep_empty_value=False,
            )
            for name in RATE_HEADER_NAMES
        ],
        # Buffering for ext_proc and for retries may reach the body limit (the listener's
        # 1 MiB default would be too small for larger limits).
        request_body_buffer_limit=rewritten_body_limit(cfg),
    )


def route_config(cfg: Config) -> RouteConfiguration:
    """GET /v1/models, then the inference routes (streams first): ext_proc names the
    cluster in its metadata and clears the route cache; `cluster_from_metadata` turns it
    into CLUSTER_HEADER, which never reaches the backend."""
    inference = [_inference_route(cfg, stream=True), _inference_route(cfg, stream=False)]
    return RouteConfiguration(
        name="tokenbooth",
        # `_unrouted` names a cluster that must not exist.
        validate_clusters=False,
        virtual_hosts=[VirtualHost(
            name="tokenbooth", domains=["*"],
            typed_per_filter_config=({CORS: pack(cors_policy(cfg))}
                                     if cfg.envoy.cors_allow_origins else {}),
            response_headers_to_add=_vary_origin() if cfg.envoy.cors_allow_origins else [],
            routes=[
            _connect_route(), _health_route(), _health_other_methods_route(),
            _models_route(), *inference, _unrouted(cfg)])],
    )


# What browsers may send and read (CORS). The OpenAI SDKs send their own `x-stainless-*`
# headers, more with each release: "*" allows any header but `authorization`, which a
# wildcard never covers, so it is named. Credentials (cookies) are never allowed: keys
# travel in headers.
CORS_ALLOW_HEADERS = "authorization, *"
CORS_EXPOSE_HEADERS = "*"
CORS_METHODS = "GET, POST, OPTIONS"
CORS_MAX_AGE_S = 600


def _vary_origin() -> list[HeaderValueOption]:
    """`vary: Origin` on every answer where CORS is on: access-control-allow-origin
    depends on the request's Origin, and a cache (a browser's, a CDN's) that reused an
    answer across origins, or with and without CORS, failed the browser's check
    (security tester; the Fetch standard asks for it). Added to a backend's own `vary`.
    (Not on the preflights Envoy answers itself: no HTTP cache stores an OPTIONS answer,
    and browsers key their preflight cache by origin.)"""
    return [HeaderValueOption(
        header=HeaderValue(key="vary", value="Origin"),
        append_action=HeaderValueOptionHeaderAppendAction.APPEND_IF_EXISTS_OR_ADD)]


def cors_policy(cfg: Config) -> CorsPolicy:
    """envoy.cors_allow_origins: Envoy answers a preflight from those origins itself (no
    key needed, nothing reaches the services), and every answer to them, errors
    included, carries access-control-allow-origin. Other origins' preflights go on, and
    get the 401 of a request without a key."""
    origins = cfg.envoy.cors_allow_origins
    # Any origin: a regex (Envoy refuses an empty prefix; ops tester: `"*"` stopped `up`).
    match = ([StringMatcher(safe_regex=RegexMatcher(regex=".*"))] if "*" in origins
             else [StringMatcher(exact=o) for o in origins])
    return CorsPolicy(
        allow_origin_string_match=match,
        allow_methods=CORS_METHODS,
        allow_headers=CORS_ALLOW_HEADERS,
        expose_headers=CORS_EXPOSE_HEADERS,
        max_age=str(CORS_MAX_AGE_S),
        allow_credentials=False,
    )


def _unrouted(cfg: Config) -> Route:
    """Every request until ext_proc has named its cluster. If the router still sees this
    route, ext_proc saw no body or failed: a cluster that does not exist gives Envoy's
    `cluster_not_found`, which the local replies turn into a 400 or a 503."""
    return Route(
        name="unrouted",
        match=RouteMatch(prefix="/"),
        route=RouteAction(cluster=NO_CLUSTER),
        request_body_buffer_limit=rewritten_body_limit(cfg),
    )


def _access_log() -> AccessLog:
    fields = {k: Value(string_value=v) for k, v in _ACCESS_LOG_FIELDS.items()}
    fmt = SubstitutionFormatString(json_format=Struct(fields=fields), formatters=[
        TypedExtensionConfig(name="envoy.formatter.req_without_query",
                             typed_config=pack(ReqWithoutQuery()))])
    return AccessLog(
        name="envoy.access_loggers.stdout", typed_config=pack(StdoutAccessLog(log_format=fmt))
    )


def http_connection_manager(cfg: Config) -> HttpConnectionManager:
    filters = [
        # First: it answers preflights, and its headers reach every answer, denials too.
        *([HttpFilter(name=CORS, typed_config=pack(Cors()))]
          if cfg.envoy.cors_allow_origins else []),
        HttpFilter(name=BUFFER, typed_config=pack(body_limit(cfg))),
        HttpFilter(name=EXT_AUTHZ, typed_config=pack(ext_authz(cfg))),
        HttpFilter(name=EXT_PROC, typed_config=pack(ext_proc(cfg))),
        HttpFilter(name=UPSTREAM_ERRORS, typed_config=pack(upstream_errors(cfg))),
        HttpFilter(name=HOLD, typed_config=pack(hold_for_routing(cfg))),
        HttpFilter(name=SET_CLUSTER, typed_config=pack(cluster_from_metadata())),
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
        # Until a route is chosen (the upload); the inference routes set their own.
        stream_idle_timeout=seconds(300),
        # A client that trickles its request (slowloris) holds a connection and a buffer
        # no longer than this: headers within 10 s, the whole request within 5 minutes
        # (its upload and the decisions; the response has the routes' own timeouts).
        request_headers_timeout=seconds(REQUEST_HEADERS_TIMEOUT_S),
        request_timeout=seconds(REQUEST_TIMEOUT_S),
        # ext_authz decides scopes on the path: /v1/./models and //v1/models must not
        # slip past it.
        normalize_path=True,
        merge_slashes=True,
        # `X_Tokenbooth_Org` is `x-tokenbooth-org` to a CGI/WSGI backend: such headers
        # are dropped, not stripped as internal ones by their exact names.
        common_http_protocol_options=HttpProtocolOptions(
            headers_with_underscores_action=(
                HttpProtocolOptionsHeadersWithUnderscoresAction.DROP_HEADER)),
        # Envoy's defaults take 1024 streams per HTTP/2 connection (measured, 1.40) and
        # 256 MiB windows: every stream's body is buffered (up to max_request_body_bytes)
        # before ext_authz can refuse it, so one connection without a key could hold a
        # gigabyte. These are Envoy's edge-proxy values (its best-practices guide).
        http2_protocol_options=Http2ProtocolOptions(
            max_concurrent_streams=H2_MAX_CONCURRENT_STREAMS,
            initial_stream_window_size=H2_STREAM_WINDOW_BYTES,
            initial_connection_window_size=H2_CONNECTION_WINDOW_BYTES),
        # HTTP/1.0 too: load balancers' health checks (HAProxy's httpchk) still send it.
        # A method HTTP does not define (WebDAV's, a typo) reaches the routes, which answer
        # the path's 405 or 404; the parser refused it with a text/plain 400 whose body
        # the closed connection cut short. No route forwards it to a backend.
        # A 400 of the gateway's own (a bad body, answered by ext_proc) keeps the
        # connection: Envoy closed it after every local 400 on HTTP/1, so a client sending
        # bad requests reconnected each time (client-libraries tester). A request the
        # parser cannot read still closes it (Envoy closes on every codec error).
        http_protocol_options=Http1ProtocolOptions(
            accept_http_10=True, allow_custom_methods=True, default_host_for_http_10="tokenbooth",
            override_stream_error_on_invalid_http_message=True),
        # CONNECT reaches the routes only as an upgrade: without this, Envoy's own 403
        # (upgrade_failed); with it, `_connect_route`'s 405. Nothing else accepts it.
        upgrade_configs=[HttpConnectionManagerUpgradeConfig(upgrade_type="CONNECT")],
        access_log=[_access_log(),
                    *([meter_access_log()] if cfg.envoy.meters_streams else [])],
        local_reply_config=local_reply_config(cfg),
    )
