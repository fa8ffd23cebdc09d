"""ext_authz: who is calling, and may they call this endpoint?

Envoy sends only the key headers, `x-request-id`, `traceparent`, `content-encoding`
and any `x-tokenbooth-*` header (see the rendered bootstrap). The answer removes the
client's key and every spoofed internal header, and sets the trusted
`x-tokenbooth-org` / `x-tokenbooth-key-id` for ext_proc and the upstream.
"""

from __future__ import annotations

import logging
import re
import time

import grpc
from opentelemetry.trace import Tracer

from authz.runtime.metrics import Metrics
from authz.runtime.tracing import request_root
from authz.services import protos
from authz.services.keyauth import KeyAuthority
from authz.services.principal_md import principal_metadata
from authz.services.refusals import log_refusal
from policy.endpoints import allowed_methods, compressed, lookup, path_known, strip_query
from policy.errors import ApiError, not_found
from policy.keys import Principal, extract_secret

log = logging.getLogger("tokenbooth.ext_authz")

INTERNAL_PREFIX = "x-tokenbooth-"
ORG_HEADER = "x-tokenbooth-org"
KEY_ID_HEADER = "x-tokenbooth-key-id"
_SET_BY_US = frozenset({ORG_HEADER, KEY_ID_HEADER})
_KEY_HEADERS = ("authorization", "x-api-key")
TRACEPARENT = "traceparent"
# W3C Trace Context's traceparent, version 00's form (a later version's fields beyond
# these are not read here). Anything else is removed: ext_proc reads this header as an
# attribute, and bytes that are not UTF-8 there fail the whole message's decoding.
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


class AuthorizationService(protos.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, keys: KeyAuthority, metrics: Metrics, tracer: Tracer | None = None
                 ) -> None:
        self._keys = keys
        self._metrics = metrics
        self._tracer = tracer
        self._seconds = metrics.decision_seconds.labels("ext_authz")

    async def Check(
        self, request: protos.Msg, context: grpc.aio.ServicerContext
    ) -> protos.Msg:
        t0 = time.perf_counter()
        try:
            if self._tracer is None:
                return await self._check(request)
            headers = request.attributes.request.http.headers
            with request_root(self._tracer, "ext_authz.check", headers,
                              headers.get("x-request-id", "")) as span:
                resp = await self._check(request)
                allowed = resp.status.code == 0
                # Joined to the request's other spans and records by its id; a refusal
                # says its status (observability tester: neither was on the span).
                # (`x-request-id`, as records and the client have it: the request's `id`
                # attribute is Envoy's own stream number; retest tester)
                span.set_attribute("tokenbooth.request_id",
                                   headers.get("x-request-id", ""))
                span.set_attribute("tokenbooth.decision", "allow" if allowed else "deny")
                if allowed:
                    md = resp.dynamic_metadata.fields
                    span.set_attribute("tokenbooth.key_id", md["key_id"].string_value)
                    span.set_attribute("tokenbooth.org", md["org"].string_value)
                else:
                    span.set_attribute("http.response.status_code",
                                       resp.denied_response.status.code)
                return resp
        finally:
            self._seconds.observe(time.perf_counter() - t0)

    async def _check(self, request: protos.Msg) -> protos.Msg:
        http = request.attributes.request.http
        headers = http.headers
        principal: Principal | None = None
        try:
            principal = await self._keys.authenticate(
                extract_secret(headers.get("authorization"), headers.get("x-api-key"))
            )
            endpoint = lookup(http.method, http.path)
            if endpoint is None:
                if path_known(http.path):
                    # Never the query: a client may put its key there.
                    raise ApiError(405, "method_not_allowed",
                                   f"{http.method} is not allowed on {strip_query(http.path)}.",
                                   headers=(("allow", ", ".join(allowed_methods(http.path))),))
                raise not_found(http.path)
            principal.require_scope(endpoint.scope)
            encoding = headers.get("content-encoding", "")
            if endpoint.method == "POST" and compressed(encoding):
                # The services read, bound and rewrite bodies as they are: plain ones.
                raise ApiError(415, "unsupported_media_type",
                               f"Content-Encoding {encoding.strip()!r} is not supported: send the "
                               "request body uncompressed.")
        except ApiError as err:
            self._metrics.decisions.labels("ext_authz", "deny", err.code).inc()
            log_refusal(log, err, headers.get("x-request-id", ""), principal)
            return protos.authz_denial(err)

        self._metrics.decisions.labels("ext_authz", "allow", "ok").inc()
        remove = [h for h in _KEY_HEADERS if h in headers]
        remove += [h for h in headers if h.startswith(INTERNAL_PREFIX) and h not in _SET_BY_US]
        trace = headers.get(TRACEPARENT)
        if trace is not None and not _TRACEPARENT.fullmatch(trace):
            remove.append(TRACEPARENT)
        return protos.CheckResponse(
            status=protos.OK_STATUS,
            ok_response=protos.external_auth_pb2.OkHttpResponse(
                headers=[
                    _overwrite(ORG_HEADER, principal.org),
                    _overwrite(KEY_ID_HEADER, principal.key_id),
                ],
                headers_to_remove=remove,
            ),
            dynamic_metadata=principal_metadata(principal),
        )


def _overwrite(key: str, value: str) -> protos.Msg:
    return protos.HeaderValueOption(
        header=protos.HeaderValue(key=key, value=value),
        append_action=protos.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
