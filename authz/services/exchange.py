"""Envoy's ext_proc messages in, `Lifecycle` calls, Envoy's answers out: translation only.

Message pattern (see authz/envoy_config/http_filters.py; every message costs ~100 µs, so no
header messages on the inference path):
  request_body     → the path, method, request id and traceparent come as attributes,
                     the principal as ext_authz's metadata; the answer carries the new
                     body, clears the route cache, and hands back the cluster, whether
                     the response is a stream, and the rate-limit headers as ext_proc's
                     dynamic metadata
  response_body    → chunks as they arrive; the first carries the status and the serving
                     endpoint as attributes (and, for a backend's error answer, its own
                     status as the upstream-errors filter's metadata); a chunk the
                     lifecycle rewrites goes back as a body mutation
  request_headers  → only GET /v1/models (its own route): answered right here
  response_headers → only with envoy.stream_metering: envoy (each response's first
                     message, with the attributes); a stream Envoy meters is handed over
                     (its response body is not sent: mode_override), the rest go on as
                     above
Errors are not turned into answers here: the servicer (ext_proc.py) does that.
"""

from __future__ import annotations

from authz.envoy_config.names import EXT_PROC, UPSTREAM_ERRORS, UPSTREAM_STATUS_KEY
from authz.envoy_config.stream_meter import METER_ECHO_KEY, METER_KEY, METER_STEPS_KEY
from authz.services import protos
from authz.services.lifecycle import Lifecycle
from authz.services.principal_md import METADATA_NAMESPACE, principal_from_metadata
from policy.keys import Principal
from policy.routing import CLUSTER_KEY, backend_from_host_metadata

ep = protos.ep
# Answers that carry nothing: built once.
_BODY_AS_IS = protos.ProcessingResponse(response_body=ep.BodyResponse())
_HEADERS_AS_IS = protos.ProcessingResponse(response_headers=ep.HeadersResponse())
_MODE = protos.ProcessingMode
# A stream handed over to Envoy's meter: nothing more of the response comes here. The
# meter's rewrite of a chunk read before this answer sets a content-length (Envoy's Lua
# setBytes does), which must not reach the client: removed here, before the headers go.
_HAND_OVER = protos.ProcessingResponse(
    response_headers=ep.HeadersResponse(response=ep.CommonResponse(
        header_mutation=ep.HeaderMutation(remove_headers=["content-length"]))),
    mode_override=_MODE(request_header_mode=_MODE.SKIP, response_header_mode=_MODE.SKIP,
                        response_body_mode=_MODE.NONE, response_trailer_mode=_MODE.SKIP))
_REQUEST_HEADERS_AS_IS = protos.ProcessingResponse(request_headers=ep.HeadersResponse())
_TRACEPARENT = "request.headers['traceparent']"
# Marks a streamed response in ext_proc's metadata: it takes the stream route (idle and
# duration timeouts). Equal to STREAM_KEY in authz/envoy_config/http_filters.py.
STREAM_KEY = "stream"


async def handle(life: Lifecycle, msg: protos.Msg) -> protos.Msg:
    """The answer to one ProcessingRequest; an ApiError when the request is refused."""
    kind = msg.WhichOneof("request")
    if kind == "response_body":
        return _response_body(life, msg)
    if kind == "request_body":
        return await _request_body(life, msg)
    if kind == "request_headers":
        return await _request_headers(life, msg)
    if kind == "response_headers":
        return _response_headers(life, msg)
    if kind == "request_trailers":
        return protos.ProcessingResponse(request_trailers=ep.TrailersResponse())
    return protos.ProcessingResponse(response_trailers=ep.TrailersResponse())


def _attributes(msg: protos.Msg) -> protos.Msg:
    """The attributes Envoy sent with this message (the filter's config names them)."""
    return msg.attributes[EXT_PROC].fields if EXT_PROC in msg.attributes else {}


def _principal(msg: protos.Msg) -> Principal | None:
    return principal_from_metadata(msg.metadata_context.filter_metadata.get(METADATA_NAMESPACE))


async def _request_headers(life: Lifecycle, msg: protos.Msg) -> protos.Msg:
    h = protos.header_map(msg.request_headers)
    life.identify(h.get(":method", ""), h.get(":path", ""), h.get("x-request-id", ""),
                  h.get("traceparent"), _principal(msg))
    answer = await life.request_headers(msg.request_headers.end_of_stream)
    if answer is None:
        return _REQUEST_HEADERS_AS_IS
    return protos.immediate(200, *answer)


async def _request_body(life: Lifecycle, msg: protos.Msg) -> protos.Msg:
    if life.endpoint is None:
        attrs = _attributes(msg)

        def attr(name: str) -> str:
            return attrs[name].string_value if name in attrs else ""

        life.identify(attr("request.method"), attr("request.path"), attr("request.id"),
                      attr(_TRACEPARENT), _principal(msg))
    fwd = await life.request_body(msg.request_body.body)
    common = ep.CommonResponse(body_mutation=ep.BodyMutation(body=fwd.body),
                               clear_route_cache=True)
    # Envoy ignores clear_route_cache in a body answer without a header mutation.
    common.header_mutation.SetInParent()
    resp = protos.ProcessingResponse(request_body=ep.BodyResponse(response=common))
    # The route's cluster, and the rate-limit headers the route adds to the response.
    md = resp.dynamic_metadata.fields[EXT_PROC].struct_value.fields
    md[CLUSTER_KEY].string_value = fwd.cluster
    if life.req is not None and life.req.stream:
        md[STREAM_KEY].string_value = "1"
    if fwd.envoy_meter is not None and life.req is not None:
        md[METER_KEY].string_value = fwd.envoy_meter
        md[METER_STEPS_KEY].number_value = life.req.stream_interval
        if fwd.echoes:
            md[METER_ECHO_KEY].number_value = 1
    for name, value in fwd.rate_headers:
        md[name].string_value = value
    return resp


def _upstream_error(msg: protos.Msg) -> int:
    """The status of a backend's error answer (0: not one), as the upstream-errors filter
    marked it (see authz/envoy_config/http_filters.upstream_errors)."""
    md = msg.metadata_context.filter_metadata.get(UPSTREAM_ERRORS)
    if md is None or UPSTREAM_STATUS_KEY not in md.fields:
        return 0
    try:
        return int(md.fields[UPSTREAM_STATUS_KEY].string_value)
    except ValueError:
        return 0


def _response_start(life: Lifecycle, msg: protos.Msg) -> None:
    """The response's first message: the status and the serving endpoint as attributes."""
    attrs = _attributes(msg)
    life.response_start(
        int(attrs["response.code"].number_value) if "response.code" in attrs else 0,
        backend_from_host_metadata(attrs["xds.upstream_host_metadata"].string_value)
        if "xds.upstream_host_metadata" in attrs else "",
        _upstream_error(msg),
        attrs["response.code_details"].string_value
        if "response.code_details" in attrs else "")


def _response_headers(life: Lifecycle, msg: protos.Msg) -> protos.Msg:
    if life.responded:  # not expected twice; answered so a stream cannot stall
        return _HEADERS_AS_IS
    _response_start(life, msg)
    return _HAND_OVER if life.hand_over() else _HEADERS_AS_IS


def _response_body(life: Lifecycle, msg: protos.Msg) -> protos.Msg:
    if not life.responded:
        _response_start(life, msg)
    body = msg.response_body
    out = life.response_chunk(body.body, body.end_of_stream)
    if out is None:
        return _BODY_AS_IS
    resp = protos.ProcessingResponse(response_body=ep.BodyResponse())
    resp.response_body.response.body_mutation.body = out
    return resp
