"""One request's life in ext_proc: the decisions per Envoy message, and its record.

Message pattern (see authz/envoy_config/http_filters.py; every message costs ~100 µs, so no
header messages on the inference path):
  request_body     → the path, method, request id and traceparent come as attributes,
                     the principal as ext_authz's metadata: validate, check the model
                     allow-list, admit, rewrite the body; the cluster and the
                     rate-limit headers go back as metadata, and the route cache is cleared
  response_body    → chunks as they arrive; the first carries the status and the serving
                     endpoint as attributes. Meter usage (SSE: strip the usage chunk the
                     client did not ask for; JSON: read `usage` at the end)
  request_headers  → only GET /v1/models (its own route): answered right here
The record is written once: at the response's end, or when the stream ends early.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import replace
from datetime import datetime

import orjson

from authz.envoy_config.names import EXT_PROC
from authz.runtime.recorder import Recorder
from authz.runtime.snapshot import Runtime, Snapshot
from authz.services import protos
from authz.services.ext_authz import METADATA_NAMESPACE
from authz.state.limits.admission import Admission
from policy.endpoints import Endpoint, Kind, lookup
from policy.errors import ApiError, invalid_api_key, invalid_request, model_not_allowed, not_found
from policy.keys import Principal
from policy.limits import (
    Ask,
    Limits,
    cost_nano,
    period_id,
    rate_headers,
    usd_to_nano,
)
from policy.request import InferenceRequest, models_list, parse_request, upstream_body
from policy.routing import CLUSTER_KEY, Route, backend_from_host_metadata
from policy.stream_usage import StreamMeter
from policy.usage import Usage, make_record, usage_from_obj

log = logging.getLogger("tokenbooth.ext_proc")

ep = protos.ep
# Answers that carry nothing: built once.
_BODY_AS_IS = protos.ProcessingResponse(response_body=ep.BodyResponse())
_HEADERS_AS_IS = protos.ProcessingResponse(response_headers=ep.HeadersResponse())
# A JSON response is kept to read its `usage`, up to this size (past it: estimated).
JSON_KEEP_BYTES = 64 << 20
_TRACEPARENT = "request.headers['traceparent']"
CLIENT_CLOSED = 499  # nginx's convention: the client went away before the response ended


class Exchange:
    __slots__ = (
        "_admission",
        "_ask",
        "_backend",
        "_json_body",
        "_meter",
        "_org",
        "_rec",
        "_responded",
        "_rt",
        "_settle",
        "_snap",
        "_started",
        "_t0",
        "endpoint",
        "finished",
        "principal",
        "req",
        "request_id",
        "route",
        "status",
        "traceparent",
    )

    def __init__(self, runtime: Runtime, recorder: Recorder, admission: Admission) -> None:
        self._rt = runtime
        self._rec = recorder
        self._admission = admission
        self._ask: Ask | None = None
        self._backend = ""  # the backend URL Envoy chose (from its response header)
        self._org: tuple[Limits, Ask] | None = None  # the org's limits and hold, if any
        self._settle: tuple[int, int] | None = None  # (used tokens, cost nano) once ended
        self._snap: Snapshot = runtime.snapshot
        self._t0 = time.monotonic()
        self._started: datetime = runtime.clock()
        self._meter: StreamMeter | None = None
        self._json_body = bytearray()
        self._responded = False  # the first response message was seen
        self.endpoint: Endpoint | None = None
        self.principal: Principal | None = None
        self.req: InferenceRequest | None = None
        self.route: Route | None = None
        self.request_id = ""
        self.traceparent: str | None = None
        self.status = 0
        self.finished = False

    @property
    def admitted(self) -> bool:
        return self.route is not None

    async def handle(self, msg: protos.Msg) -> protos.Msg:
        kind = msg.WhichOneof("request")
        if kind == "response_body":
            return self._response_body(msg)
        if kind == "request_body":
            return await self._request_body(msg)
        if kind == "request_headers":
            return await self._request_headers(msg)
        # Not configured to be sent; answered so a changed configuration cannot stall.
        if kind == "response_headers":
            return _HEADERS_AS_IS
        if kind == "request_trailers":
            return protos.ProcessingResponse(request_trailers=ep.TrailersResponse())
        return protos.ProcessingResponse(response_trailers=ep.TrailersResponse())

    # -- request side ---------------------------------------------------------

    async def _request_headers(self, msg: protos.Msg) -> protos.Msg:
        """GET /v1/models (the only route that sends request headers)."""
        h = protos.header_map(msg.request_headers)
        self._identify(msg, h.get(":method", ""), h.get(":path", ""),
                       h.get("x-request-id", ""), h.get("traceparent"))
        assert self.endpoint is not None and self.principal is not None
        if self.endpoint.kind is not Kind.MODELS:
            if msg.request_headers.end_of_stream:
                raise invalid_request("This endpoint needs a JSON request body.")
            return protos.ProcessingResponse(request_headers=ep.HeadersResponse())
        principal = self.principal
        # Counts as a request for the rate limit; reserves no tokens or money.
        lim = principal.limits
        ask = self._make_ask(0, 0)
        org = self._org_hold(ask)
        decision = await self._admission.admit_all(org, lim, ask, self._started)
        await self._admission.settle(lim, ask, 0, 0, self._rt.clock())
        if org is not None:
            await self._admission.settle(*org, 0, 0, self._rt.clock())
        aliases = [a for a in self._snap.aliases if principal.may_use(a)]
        return protos.immediate(200, models_list(aliases, int(self._started.timestamp())),
                                tuple(rate_headers(decision)))

    def _identify(self, msg: protos.Msg, method: str, path: str, request_id: str,
                  traceparent: str | None) -> None:
        """Which endpoint, which request, whose key (once per request)."""
        self.request_id = request_id or uuid.uuid4().hex
        self.traceparent = traceparent or None
        endpoint = lookup(method, path)
        if endpoint is None:
            raise not_found(path)
        principal = principal_from_metadata(msg)
        if principal is None:
            # Only reachable when ext_authz did not run first: refuse, never guess.
            raise invalid_api_key("No authenticated API key on this request.")
        self.endpoint, self.principal = endpoint, principal

    def _make_ask(self, tokens: int, cost: int) -> Ask:
        assert self.principal is not None
        lim = self.principal.limits
        return Ask(
            request_id=self.request_id,
            key_id=self.principal.key_id,
            org=self.principal.org,
            tokens=tokens,
            cost_nano=cost,
            period=period_id(lim.budget_period, self._started),
            lease_s=self._snap.config.envoy.route_timeout_s + 30,
        )

    def _org_hold(self, ask: Ask) -> tuple[Limits, Ask] | None:
        """The org's limits and a hold under the pseudo-key `org:<name>`, if configured."""
        ol = self._snap.config.orgs.get(ask.org)
        if ol is None:
            return None
        limits = Limits(
            rpm=ol.rpm, tpm=ol.tpm, max_concurrent=ol.max_concurrent,
            budget_nano=usd_to_nano(ol.budget_usd) if ol.budget_usd is not None else None,
            budget_period=ol.budget_period,
        )
        org_ask = replace(ask, key_id=f"org:{ask.org}",
                          period=period_id(ol.budget_period, self._started))
        return limits, org_ask

    async def _request_body(self, msg: protos.Msg) -> protos.Msg:
        if self.endpoint is None:
            attrs = msg.attributes[EXT_PROC].fields if EXT_PROC in msg.attributes else {}

            def attr(name: str) -> str:
                return attrs[name].string_value if name in attrs else ""

            self._identify(msg, attr("request.method"), attr("request.path"),
                           attr("request.id"), attr(_TRACEPARENT))
        assert self.endpoint is not None and self.principal is not None
        req = parse_request(msg.request_body.body, self.endpoint, self._snap.config)
        if not self.principal.may_use(req.alias):
            raise model_not_allowed(req.alias)
        route = self._snap.router.route(req.alias)
        assert route is not None  # parse_request checked the alias
        price = req.model.price_per_1k_tokens
        ask = self._make_ask(req.prompt_estimate + req.max_tokens,
                             cost_nano(req.prompt_bound, req.max_tokens, price))
        org = self._org_hold(ask)
        decision = await self._admission.admit_all(org, self.principal.limits, ask,
                                                   self._started)
        self._ask, self._org = ask, org
        new_body = upstream_body(req)
        self.req, self.route = req, route
        common = ep.CommonResponse(body_mutation=ep.BodyMutation(body=new_body),
                                   clear_route_cache=True)
        # Envoy ignores clear_route_cache in a body answer without a header mutation.
        common.header_mutation.SetInParent()
        resp = protos.ProcessingResponse(request_body=ep.BodyResponse(response=common))
        # The route's cluster, and the rate-limit headers the route adds to the response.
        md = resp.dynamic_metadata.fields[EXT_PROC].struct_value.fields
        md[CLUSTER_KEY].string_value = route.cluster
        for name, value in rate_headers(decision):
            md[name].string_value = value
        return resp

    # -- response side --------------------------------------------------------

    def _response_body(self, msg: protos.Msg) -> protos.Msg:
        body = msg.response_body
        if not self._responded:
            self._responded = True
            self._first_response(msg)
        if not self.admitted:
            return _BODY_AS_IS  # a local reply (a refusal): nothing to meter
        out: bytes | None = None
        meter = self._meter
        if meter is not None:
            out = meter.feed(body.body)
            if body.end_of_stream:
                tail = meter.finish()
                if tail is not None:
                    out = (out or b"") + tail
        elif len(self._json_body) < JSON_KEEP_BYTES:
            self._json_body += body.body
        if body.end_of_stream:
            self.finish()
        if out is None:
            return _BODY_AS_IS
        resp = protos.ProcessingResponse(response_body=ep.BodyResponse())
        resp.response_body.response.body_mutation.body = out
        return resp

    def _first_response(self, msg: protos.Msg) -> None:
        """Status and serving backend (attributes of the first response message); an SSE
        meter for a stream the backend accepted (an error answer is JSON)."""
        attrs = msg.attributes[EXT_PROC].fields if EXT_PROC in msg.attributes else {}
        if "response.code" in attrs:
            self.status = int(attrs["response.code"].number_value)
        if "xds.upstream_host_metadata" in attrs:
            self._backend = backend_from_host_metadata(
                attrs["xds.upstream_host_metadata"].string_value)
        req = self.req
        if req is not None and req.stream and 0 < self.status < 400:
            self._meter = StreamMeter(strip_usage=not req.client_wants_usage)

    # -- the end --------------------------------------------------------------

    def finish(self, aborted: bool = False) -> None:
        """Write the one usage record of an admitted request (idempotent)."""
        if self.finished or not self.admitted:
            return
        self.finished = True
        req, route, principal, endpoint = self.req, self.route, self.principal, self.endpoint
        assert req and route and principal and endpoint
        usage, estimated = self._usage(req)
        self._settle = (usage.total_tokens,
                        cost_nano(usage.prompt_tokens, usage.completion_tokens,
                                  req.model.price_per_1k_tokens))
        status = self.status or CLIENT_CLOSED
        if aborted and (self._meter is None or not self._meter.done):
            status = CLIENT_CLOSED
        self._rec.record(
            make_record(
                request_id=self.request_id,
                key_id=principal.key_id,
                org=principal.org,
                model=req.alias,
                upstream_model=route.upstream_model,
                backend=self._backend,
                usage=usage,
                price=req.model.price_per_1k_tokens,
                status=status,
                stream=req.stream,
                estimated=estimated,
                started_at=self._started,
                duration_ms=(time.monotonic() - self._t0) * 1000,
                endpoint=endpoint.name,
            )
        )

    @property
    def settle_pending(self) -> bool:
        return self._settle is not None

    async def settle(self) -> None:
        """Settle the reservation once the record is written (driven by the same end)."""
        pending, self._settle = self._settle, None
        if pending is None or self._ask is None or self.principal is None:
            return
        now = self._rt.clock()
        await self._admission.settle(self.principal.limits, self._ask, pending[0], pending[1],
                                     now)
        if self._org is not None:
            await self._admission.settle(*self._org, pending[0], pending[1], now)

    def _usage(self, req: InferenceRequest) -> tuple[Usage, bool]:
        """The upstream's own count when it gave one; else an estimate from what was seen."""
        if self._meter is not None:
            if self._meter.usage is not None:
                return self._meter.usage, False
            return Usage(req.prompt_estimate, self._meter.content_chunks), True
        if self._json_body:
            try:
                usage = usage_from_obj(orjson.loads(self._json_body).get("usage"))
            except (orjson.JSONDecodeError, AttributeError):
                usage = None
            if usage is not None:
                return usage, False
        if self.status >= 400:
            return Usage(), False  # the backend refused: nothing was generated
        return Usage(req.prompt_estimate, 0), True


def principal_from_metadata(msg: protos.Msg) -> Principal | None:
    """The principal ext_authz attached to this request (Envoy forwards its metadata)."""
    md = msg.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
    if md is None:
        return None
    fields = md.fields
    key_id = fields["key_id"].string_value if "key_id" in fields else ""
    if not key_id:
        return None
    models = fields["models"].list_value.values if "models" in fields else ()

    def opt_int(name: str) -> int | None:
        raw = fields[name].string_value if name in fields else ""
        return int(raw) if raw else None

    return Principal(
        key_id=key_id,
        org=fields["org"].string_value if "org" in fields else "",
        scopes=frozenset(),  # ext_authz checked them
        models=frozenset(v.string_value for v in models),
        limits=Limits(
            rpm=opt_int("rpm"),
            tpm=opt_int("tpm"),
            max_concurrent=opt_int("max_concurrent"),
            budget_nano=opt_int("budget_nano"),
            budget_period=(fields["budget_period"].string_value
                           if "budget_period" in fields else "month"),
        ),
    )


def error_response(err: ApiError) -> protos.Msg:
    return protos.immediate_error(err)
