"""Envoy's own error replies, rewritten as OpenAI-shaped JSON (`local_reply_config`).

Every local reply passes through these mappers, including the deliberate denials of
our ext_authz service and ext_proc's ImmediateResponses (which carry their own JSON).
So each mapper matches only replies Envoy makes on its own, by response flag or by
response-code details; anything unmatched is left as it is.

Seen with Envoy 1.40 (the real binary, access log `%RESPONSE_FLAGS%` and
`%RESPONSE_CODE_DETAILS%`):
- gRPC services down or timed out at ext_authz: 503, UAEX, `ext_authz_error`
  (a denial is UAEX too, but `ext_authz_denied`: flags alone cannot tell them apart).
- ext_proc stream failed: `status_on_error` (503), no flag,
  `ext_proc_error_gRPC_error_<code>{...}`; message timeout: 504, no flag,
  `ext_proc_error_per-message_timeout_exceeded`.
- ext_proc ImmediateResponse: its own status, no flag, its own `details`.
- backend unhealthy / ejected: 503, UH, `no_healthy_upstream`; the same for a model
  configured with no backend (its cluster's metadata says so: `xds.cluster_metadata`).
- routing header missing or naming no cluster: 503, NC, `cluster_not_found`. Only
  ext_proc's answer names a cluster: without one, either the request had no body
  (ext_proc is sent nothing) or ext_proc failed; with one, Envoy does not have that
  cluster (yet, or any more: a model added or removed moments ago): a 404.
- backend timed out (route timeout): 504, UT, `response_timeout`.
- backend closed the connection before answering: 503, UC,
  `upstream_reset_before_response_started{connection_termination}`; UF (connect
  failure), UR (remote reset) and URX (retries exhausted) come the same way.
- body over the limit (buffer filter): 413, no flag, `request_payload_too_large`.
- a backend's API key not loadable (its environment variable unset, its file missing:
  Envoy rejects the secret): 401, no flag, `failed_to_inject_credential`.
- heap past `envoy.max_heap_bytes`' stop_accepting_requests threshold: 503, OL,
  `overload` (before any filter: no key is checked, nothing is admitted).
"""

from __future__ import annotations

from envoy_data_plane.envoy.config.accesslog.v3 import (
    AccessLogFilter,
    AndFilter,
    ExtensionFilter,
    ResponseFlagFilter,
)
from envoy_data_plane.envoy.config.core.v3 import (
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    SubstitutionFormatString,
)
from envoy_data_plane.envoy.extensions.access_loggers.filters.cel.v3 import ExpressionFilter
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    LocalReplyConfig,
    ResponseMapper,
)
from envoy_data_plane.google.protobuf import NullValue, Struct, Value

from authz.envoy_config.clusters import NO_BACKENDS
from authz.envoy_config.common import REQUEST_HEADERS_TIMEOUT_S, REQUEST_TIMEOUT_S, pack
from authz.envoy_config.names import EXT_PROC, MODELS_ROUTE
from policy.config import Config
from policy.errors import (
    NO_RETRY,
    ApiError,
    invalid_request,
    request_too_large,
    service_unavailable,
)
from policy.routing import BACKEND_METADATA, UNREACHED_DETAILS

AUTHZ_DOWN = service_unavailable("The authorization service is unavailable; try again.",
                                 retry=True)
PROC_DOWN = service_unavailable("The request processing service is unavailable; try again.",
                                retry=True)
NO_BACKEND = service_unavailable("No healthy backend is available for this model.",
                                 retry=True)
# A model with `backends: []` and no default upstream: waiting cannot help.
UNSERVED = service_unavailable("This model has no backend configured.", retry=False)
# The backend had the request and gave no answer within the route timeout (or a stream's
# idle timeout): the same request would wait as long again, and each attempt is admitted
# and charged (a JSON answer its hold, a stream its prompt and what it showed: lifecycle
# GATEWAY_CUTS). The SDKs retry a 504 twice unless told.
# The message says what helps (the limits are Envoy's, fixed until it restarts).
_TIMEOUT_FLAGS = ("UT", "SI")  # upstream request timeout, stream idle timeout


def backend_timeout(cfg: Config) -> ApiError:
    env = cfg.envoy
    return ApiError(
        504, "upstream_error",
        f"The backend did not answer in time: an answer that is not streamed must be whole "
        f"within {env.route_timeout_s:g} s, and a stream may be silent for at most "
        f"{env.stream_idle_s:g} s. Retrying the same request would take as long: for a "
        f"long answer, stream it (\"stream\": true) or lower max_tokens.",
        headers=(NO_RETRY,))


BACKEND_FAILED = ApiError(502, "upstream_error", "The backend failed before answering.")
# The same failure after the backend had the request (a reset, a closed connection): it
# may have generated, so the attempt is charged like a client that left (lifecycle
# GATEWAY_CUTS: a JSON answer its whole hold), and so would each SDK retry be (clients
# tester: three attempts, three holds, for one call that delivered nothing). Envoy's
# connect failures (after its own retries) and full circuit breakers reached no backend
# and charge nothing: those keep the SDKs' retries.
BACKEND_RESET = ApiError(502, "upstream_error",
                         "The backend failed before answering, after it had the request: "
                         "this attempt is charged (its usage record says what), and a retry "
                         "would be charged again.", headers=(NO_RETRY,))
# A client that took too long to send its request (http_filters: the HCM's timeouts).
REQUEST_TIMEOUT = ApiError(
    408, "request_timeout",
    f"The request was not received in time: its headers must arrive within "
    f"{REQUEST_HEADERS_TIMEOUT_S} s and the whole request within {REQUEST_TIMEOUT_S} s.")
# CONNECT: the gateway is no forward proxy (the route answers it; see http_filters.py).
CONNECT_REFUSED = ApiError(405, "method_not_allowed",
                           "CONNECT is not allowed: this is an OpenAI-compatible API, not a "
                           "proxy.")
HEALTH_METHOD = ApiError(405, "method_not_allowed",
                         "Only GET, HEAD and OPTIONS are allowed on /health.")
NO_BODY = invalid_request("This endpoint needs a JSON request body.")
# ext_proc named a cluster Envoy does not have: the model was added or removed moments
# ago and the replica that answered ext_proc saw the change before (or after) the one
# feeding Envoy's xDS, or Envoy is still warming the new cluster; or Envoy refused the
# cluster (a CA file it cannot load: the services log "xds: Envoy rejected the config"),
# which it cannot tell from those (retest tester: "moments ago" for good).
NOT_SERVED = ApiError(404, "model_not_found",
                      "This model is not served here: it was added or removed moments ago, "
                      "or the gateway could not load its configuration (its operator's log "
                      "says why). GET /v1/models lists the models this key can use now.")
# Envoy's memory is nearly spent (overload manager, envoy.max_heap_bytes): the request
# was refused before anything read it, and memory comes back as streams end.
OVERLOADED = service_unavailable("The gateway is overloaded; try again shortly.", retry=True)
NO_BACKEND_KEY = service_unavailable(
    "The gateway cannot load this model's backend API key; an operator must fix it.",
    retry=False)

# Flags of upstream failures that happen before any response byte (else no local reply).
_NO_BACKEND_FLAGS = ("UH", "NC", "UO")
_FAILED_FLAGS = ("UF", "UC", "UR", "URX", "UPE", "DF")


def _cel(expression: str) -> AccessLogFilter:
    """Match on Envoy attributes (here `response.code_details`), as flags cannot."""
    return AccessLogFilter(
        extension_filter=ExtensionFilter(
            name="envoy.access_loggers.extension_filters.cel",
            typed_config=pack(ExpressionFilter(expression=expression)),
        )
    )


def _flags(flags: tuple[str, ...]) -> AccessLogFilter:
    return AccessLogFilter(response_flag_filter=ResponseFlagFilter(flags=list(flags)))


def _body(err: ApiError) -> SubstitutionFormatString:
    """The same JSON as `ApiError.body()`, as a fixed Envoy JSON format."""
    error = Struct(
        fields={
            "message": Value(string_value=err.message),
            "type": Value(string_value=err.error_type),
            "param": Value(null_value=NullValue.NULL_VALUE),
            "code": Value(string_value=err.code),
        }
    )
    return SubstitutionFormatString(
        json_format=Struct(fields={"error": Value(struct_value=error)}),
        content_type="application/json",
    )


def _mapper(match: AccessLogFilter, err: ApiError) -> ResponseMapper:
    """The error's status, body and headers (a 503's retry hint)."""
    headers = [HeaderValueOption(
        header=HeaderValue(key=k, value=v),
        append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD)
        for k, v in err.headers]
    return ResponseMapper(filter=match, status_code=err.status, body_format_override=_body(err),
                          headers_to_add=headers)


# Requests Envoy refuses before any filter runs: a path that does not normalize (a
# `#fragment`, an encoded NUL), an upgrade (a WebSocket) no route takes, an HTTP/1.1
# request without `Host`, a path that is not one (`OPTIONS *`). Envoy's status stays
# (400, 403, 404); the body becomes an OpenAI error naming Envoy's reason. (A request
# its HTTP/1 codec cannot parse, e.g. headers past 60 KiB, gets Envoy's empty answer
# whatever the mapper says: it closes the connection before any body.)
_MALFORMED_DETAILS = ("path_normalization_failed", "upgrade_failed", "missing_host_header",
                      "absolute_path_rejected")
_MALFORMED = ("response.code >= 400 && response.code < 500 && ("
              + " || ".join(f"response.code_details == '{d}'" for d in _MALFORMED_DETAILS)
              + ")")


def _malformed() -> ResponseMapper:
    error = Struct(fields={
        "message": Value(string_value="The HTTP request is malformed or not supported "
                                      "(%RESPONSE_CODE_DETAILS%)."),
        "type": Value(string_value="invalid_request_error"),
        "param": Value(null_value=NullValue.NULL_VALUE),
        "code": Value(string_value="invalid_request"),
    })
    return ResponseMapper(filter=_cel(_MALFORMED), body_format_override=SubstitutionFormatString(
        json_format=Struct(fields={"error": Value(struct_value=error)}),
        content_type="application/json"))


def local_reply_config(cfg: Config) -> LocalReplyConfig:
    """First matching mapper wins; denials and ImmediateResponses match none."""
    return LocalReplyConfig(
        mappers=[
            _mapper(_cel("response.code_details == 'overload'"), OVERLOADED),
            _mapper(_cel("response.code_details == 'ext_authz_error'"), AUTHZ_DOWN),
            # Also turns ext_proc's 504 on a message timeout into a 503.
            _mapper(_cel("response.code_details.startsWith('ext_proc_error')"), PROC_DOWN),
            # GET /v1/models reaches the router only when ext_proc, which answers it,
            # failed (http_filters._models_route).
            _mapper(_cel("response.code_details == 'cluster_not_found' && "
                         f"xds.route_name == '{MODELS_ROUTE}'"), PROC_DOWN),
            # No cluster: ext_proc never named one. It is sent nothing for a request
            # without a body (the client's 400); else it failed or timed out (it fails
            # open, see http_filters.ext_proc, so this is how its outage shows).
            _mapper(_cel("response.code_details == 'cluster_not_found' && "
                         "request.size == 0"), NO_BODY),
            _mapper(_cel("response.code_details == 'cluster_not_found' && "
                         f"!('{EXT_PROC}' in metadata.filter_metadata)"), PROC_DOWN),
            _mapper(_cel("response.code_details == 'cluster_not_found'"), NOT_SERVED),
            _mapper(_cel("response.code_details == 'no_healthy_upstream' && xds.cluster_metadata"
                         f".filter_metadata['{BACKEND_METADATA}']['{NO_BACKENDS}'] == true"),
                    UNSERVED),
            _mapper(_flags(_NO_BACKEND_FLAGS), NO_BACKEND),
            _mapper(_flags(_TIMEOUT_FLAGS), backend_timeout(cfg)),
            _mapper(AccessLogFilter(and_filter=AndFilter(filters=[
                _flags(_FAILED_FLAGS), _cel(" || ".join(
                    f"response.code_details.contains('{d}')" for d in UNREACHED_DETAILS))])),
                BACKEND_FAILED),
            _mapper(_flags(_FAILED_FLAGS), BACKEND_RESET),
            _mapper(
                _cel("response.code_details == 'request_payload_too_large'"),
                request_too_large(cfg.max_request_body_bytes),
            ),
            _mapper(_cel("response.code_details == 'failed_to_inject_credential'"),
                    NO_BACKEND_KEY),
            _mapper(_cel("response.code_details == 'request_header_timeout' || "
                         "response.code_details == 'request_overall_timeout'"),
                    REQUEST_TIMEOUT),
            _malformed(),
        ]
    )
