"""ext_authz: who is calling, and may they call this endpoint?

Envoy sends only the key headers, `x-request-id`, `traceparent` and any
`x-tokenbooth-*` header (see the rendered bootstrap). The answer removes the
client's key and every spoofed internal header, and sets the trusted
`x-tokenbooth-org` / `x-tokenbooth-key-id` for ext_proc and the upstream.
"""

from __future__ import annotations

import logging
import time

import grpc

from authz import protos
from authz.metrics import Metrics
from authz.snapshot import Runtime
from policy.endpoints import lookup, path_known
from policy.errors import ApiError, not_found
from policy.keys import authenticate, extract_secret

log = logging.getLogger("tokenbooth.ext_authz")

INTERNAL_PREFIX = "x-tokenbooth-"
ORG_HEADER = "x-tokenbooth-org"
KEY_ID_HEADER = "x-tokenbooth-key-id"
_SET_BY_US = frozenset({ORG_HEADER, KEY_ID_HEADER})
_KEY_HEADERS = ("authorization", "x-api-key")


class AuthorizationService(protos.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, runtime: Runtime, metrics: Metrics) -> None:
        self._rt = runtime
        self._metrics = metrics
        self._seconds = metrics.decision_seconds.labels("ext_authz")

    async def Check(
        self, request: protos.Msg, context: grpc.aio.ServicerContext
    ) -> protos.Msg:
        t0 = time.perf_counter()
        try:
            return self._check(request)
        finally:
            self._seconds.observe(time.perf_counter() - t0)

    def _check(self, request: protos.Msg) -> protos.Msg:
        http = request.attributes.request.http
        headers = http.headers
        snap = self._rt.snapshot
        try:
            principal = authenticate(
                extract_secret(headers.get("authorization"), headers.get("x-api-key")),
                snap.keys_by_fingerprint,
                self._rt.clock(),
            )
            endpoint = lookup(http.method, http.path)
            if endpoint is None:
                if path_known(http.path):
                    raise ApiError(405, "method_not_allowed",
                                   f"{http.method} is not allowed on {http.path}.")
                raise not_found(http.path)
            principal.require_scope(endpoint.scope)
        except ApiError as err:
            self._metrics.decisions.labels("ext_authz", "deny", err.code).inc()
            return protos.authz_denial(err)

        self._metrics.decisions.labels("ext_authz", "allow", "ok").inc()
        remove = [h for h in _KEY_HEADERS if h in headers]
        remove += [h for h in headers if h.startswith(INTERNAL_PREFIX) and h not in _SET_BY_US]
        return protos.CheckResponse(
            status=protos.OK_STATUS,
            ok_response=protos.external_auth_pb2.OkHttpResponse(
                headers=[
                    _overwrite(ORG_HEADER, principal.org),
                    _overwrite(KEY_ID_HEADER, principal.key_id),
                ],
                headers_to_remove=remove,
            ),
        )


def _overwrite(key: str, value: str) -> protos.Msg:
    return protos.HeaderValueOption(
        header=protos.HeaderValue(key=key, value=value),
        append_action=protos.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
