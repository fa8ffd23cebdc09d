"""One request's life in domain terms: what is decided at each step, and its record.

No protobuf here: `exchange.py` turns Envoy's messages into these calls and their
results back into answers. The steps, in the order the messages drive them:
  identify        → which endpoint, which request, whose key (once per request)
  request_headers → GET /v1/models and /v1/models/{id}: counted as a request, answered
                    at once
  request_body    → validate, check the model allow-list, build the body the backend
                    gets, admit; returns that body, the cluster and the rate-limit headers
  response_start  → the status and the serving backend (the first response chunk); a
                    backend's error answer is held to be rewritten OpenAI-shaped
  response_chunk  → meter usage; returns a chunk to send instead, or None for as is
  hand_over       → a stream Envoy meters (envoy.stream_metering): no chunks come here;
  take_report       its report at the end (authz/services/meter_reports.py) instead
  finish, settle  → the one usage record, then the one settlement
Settlement: once admission has begun, the store may hold something for this request, so
the request owes exactly one `settle()` (settling what the store does not hold is a
no-op). Anything that can refuse a request runs before admission.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple, Protocol

import orjson

from authz.runtime.recorder import Recorder
from authz.runtime.snapshot import Runtime, Snapshot
from authz.services.heavy import sized_work
from authz.state.limits.admission import Admission
from authz.state.repeats import REPEATS
from policy.bounds import MAX_EXACT
from policy.config import Config, OrgLimits, Price
from policy.endpoints import Endpoint, Kind, lookup, path_argument
from policy.errors import (
    ApiError,
    empty_answer,
    invalid_api_key,
    invalid_request,
    model_not_allowed,
    model_not_found,
    not_found,
    redirected_answer,
    unserved_model_answer,
    upstream_error,
)
from policy.keys import Principal
from policy.limits import Ask, Decision, HoldRecord, Limits, cost_nano, period_id, rate_headers
from policy.meter_report import MeterReport, meter_from_report
from policy.prompt_count import Recount, tokenize_request
from policy.quota import org_hold
from policy.request import (
    InferenceRequest,
    model_object,
    models_list,
    parse_request,
    upstream_body,
)
from policy.request_fields import lax_true
from policy.routing import UNREACHED_DETAILS, Route
from policy.stream_pace import StreamPace
from policy.stream_usage import StreamMeter, meter_for
from policy.usage import (
    LOST,
    Usage,
    UsageRecord,
    answered_choices,
    iso_z,
    loads_lenient,
    make_record,
    usage_from_obj,
)

log = logging.getLogger("tokenbooth.ext_proc")

Headers = tuple[tuple[str, str], ...]
# A JSON response is kept whole to read its `usage`, up to this size; past it only its
# last JSON_TAIL_BYTES are, where vLLM writes `usage` (the top-level object's end), and
# the last `usage` in each part trimmed off is remembered: a chat answer's
# `prompt_logprobs` (and `prompt_token_ids`) follow it, ~1.5 KB a prompt token.
JSON_KEEP_BYTES = 64 << 20
JSON_TAIL_BYTES = 64 << 10
# Answers whose usage in a trimmed part counts: in vLLM's chat and completions answers
# only vLLM's own fields follow `usage`; an embeddings or score answer holds nothing
# but numbers (or base64) before it and nothing after it (an embeddings batch of
# thousands of wide vectors passes 64 MiB: it was charged its hold). A rerank answer
# echoes the client's documents after its `usage`. A Responses answer holds objects the client
# shaped on both sides of it (the `tools` it echoes; `input_messages`, with each tool's
# parameters, after it): a `usage` key in them cannot be told from the top-level one by
# a search of the bytes, in what was trimmed nor in the kept tail (a tool's parameters
# there are the client's too): such an answer past the keep limit is charged its hold.
_TRIMMED_USAGE_KINDS = frozenset({Kind.CHAT, Kind.COMPLETION, Kind.EMBEDDINGS, Kind.SCORE})
# Endpoints whose answer counts completion tokens (a usage without them is no count).
_GENERATES = frozenset({Kind.CHAT, Kind.COMPLETION, Kind.RESPONSES})
# A backend's error body is held whole to be rewritten, up to this size (the rest dropped).
ERROR_KEEP_BYTES = 64 << 10
CLIENT_CLOSED = 499  # nginx's convention: the client went away before the response ended
GATEWAY_TIMEOUT = 504  # Envoy cut the response (stream idle timeout, or its time limit)
SERVICE_UNAVAILABLE = 503  # Envoy's answer when ext_proc's came too late
BAD_GATEWAY = 502  # what the client of a backend that answered a success with no body gets
# Envoy's own answers (not a backend's: the upstream-errors filter marks those) after the
# request went to a backend that may have begun on it: the backend failed or reset (502)
# or Envoy's timeout cut it (504). Estimated like a client that left. Envoy's other
# replies after admission (503: no healthy backend, a backend key not loadable) reach no
# backend, and a backend's own error answer generated nothing: those record no tokens.
GATEWAY_CUTS = frozenset({502, GATEWAY_TIMEOUT})
# What the rewrite may add to a body: Envoy's hold buffer takes max_request_body_bytes plus
# this. Equal to REWRITE_SLACK in authz/envoy_config/http_filters.py (a test holds them
# equal), not imported from there: the servicers stay free of the Envoy config builders.
REWRITE_SLACK = 64 << 10


class Forward(NamedTuple):
    """An admitted request: the body the backend gets, its cluster, the rate-limit headers,
    and for a stream Envoy meters, how (`strip` the usage chunk or `keep` it)."""

    body: bytes
    cluster: str
    rate_headers: list[tuple[str, str]]
    envoy_meter: str | None = None
    echoes: bool = False  # its stream's first chunk echoes the prompt (Envoy's meter)

class MeterReports(Protocol):
    """Where a stream Envoy meters will report (authz/services/meter_reports.py)."""

    def expect(self, request_id: str) -> bool: ...
    def forget(self, request_id: str) -> None: ...


# What a request answered by the gateway costs.
_FREE = Price()
# A handed-over stream stops waiting for its report this long before its lease ends.
REPORT_MARGIN_S = 5.0
# How long a metered stream whose ext_proc stream ended before its response headers
# waits for Envoy's report (Envoy sends it within its flush, FLUSH_MS; none comes when
# its meter never saw the answer begin: the client left before the backend answered,
# and the wait keeps its hold and concurrency slot: retest, a 429 for a client that
# pressed Stop during the time to first token and asked again at once).
EARLY_REPORT_S = 0.5

# Streams Envoy can meter: their usage is in a chunk of their own (the Responses API's
# final event echoes the request, so only the services read it).
_ENVOY_METERED = frozenset({Kind.CHAT, Kind.COMPLETION})


def forwarded_body(req: InferenceRequest, cfg: Config) -> bytes:
    """The body the backend gets, or a 400 when it cannot be forwarded: nested deeper than
    the encoder allows, holding a value it cannot encode, or larger once rewritten than
    Envoy's buffer takes (numbers in exponent form, say, grow when re-encoded)."""
    try:
        body = upstream_body(req)
    except (TypeError, RecursionError):  # orjson.JSONEncodeError is a TypeError
        raise invalid_request(
            "The request body cannot be forwarded: it is nested too deeply or holds a value "
            "that cannot be encoded as JSON."
        ) from None
    limit = cfg.max_request_body_bytes + REWRITE_SLACK
    if len(body) > limit:
        raise invalid_request(
            f"The request body is too large once rewritten for the backend ({len(body)} "
            f"bytes; the limit is {limit})."
        )
    return body


def _parsed(raw: bytes, endpoint: Endpoint, cfg: Config) -> tuple[InferenceRequest, bytes]:
    """The request's bounds and the body the backend gets (pure: safe in a thread)."""
    req = parse_request(raw, endpoint, cfg)
    return req, forwarded_body(req, cfg)


# An org's limits: the admin API's stored ones over the config's (authz/state/orgs.py).
OrgLimitsOf = Callable[[Config, str], OrgLimits | None]


def config_org_limits(cfg: Config, org: str) -> OrgLimits | None:
    return cfg.orgs.get(org)


@dataclasses.dataclass(frozen=True, slots=True)
class Ending:
    """What an admitted request's one record says, decided as it ends."""

    usage: Usage
    estimated: bool
    status: int
    prompt_estimated: bool  # its prompt is the byte estimate: the backend may count it
    duration_ms: float



def _echoes(kind: Kind, body: dict[str, Any]) -> bool:
    """Whether vLLM puts the prompt in each choice's first chunk: completions with
    `echo: true`; chat only when the last message is the assistant's (it is prepended to
    the reply of the same role). vLLM reads booleans laxly (`"true"` echoes, `"false"`
    does not)."""
    if not lax_true(body.get("echo")):
        return False
    if kind is Kind.CHAT:
        messages = body.get("messages")
        last = messages[-1] if isinstance(messages, list) and messages else None
        return isinstance(last, dict) and last.get("role") == "assistant"
    return True

class Lifecycle:
    __slots__ = (
        "_admission",
        "_ask",
        "_backend",
        "_count",
        "_empty",
        "_ended_at",
        "_envoy_meter",
        "_error_body",
        "_json_body",
        "_json_limit",
        "_json_tail",
        "_json_usage",
        "_last_byte",
        "_meter",
        "_model_id",
        "_org",
        "_org_limits",
        "_pace",
        "_rec",
        "_redirect",
        "_reported",
        "_reports",
        "_rt",
        "_settle",
        "_snap",
        "_started",
        "_t0",
        "_t_first",
        "_unreached",
        "alias",
        "delivered",
        "endpoint",
        "finished",
        "handed_over",
        "principal",
        "record",
        "recount_owed",
        "req",
        "request_id",
        "responded",
        "route",
        "status",
        "traceparent",
    )

    def __init__(self, runtime: Runtime, recorder: Recorder, admission: Admission,
                 org_limits: OrgLimitsOf | None = None,
                 reports: MeterReports | None = None) -> None:
        self._rt = runtime
        self._reports = reports
        self._envoy_meter: str | None = None  # Envoy may meter this stream: strip / keep
        self.handed_over = False  # Envoy meters the response: its report ends the request
        self._reported = False  # the meter is Envoy's report: counts, not what was read
        self._rec = recorder
        self._admission = admission
        self._org_limits = org_limits or config_org_limits
        self._ask: Ask | None = None  # set once admission begins
        self._backend = ""  # the backend URL Envoy chose
        self._org: tuple[Limits, Ask] | None = None  # the org's limits and hold, if any
        self._settle: tuple[int, int] | None = None  # (used tokens, cost nano) owed
        self._snap: Snapshot = runtime.snapshot
        self._t0 = time.monotonic()
        self._last_byte = self._t0  # when the response last moved (why it ended early)
        self._pace: StreamPace | None = None  # when a metered stream's tokens came
        self._t_first = 0.0  # monotonic time of a stream's first content chunk (TTFT)
        self._ended_at = 0.0  # a stream Envoy metered: when it ended (0: not known)
        self.record: UsageRecord | None = None  # the usage record, once written
        # The record's metrics, counted once its settlement has said whether the sweep
        # had charged it as lost meanwhile (then that record was counted: see `settle`).
        self._count: tuple[UsageRecord, float | None] | None = None
        self._started: datetime = runtime.clock()
        self._meter: StreamMeter | None = None
        self._json_body = bytearray()
        self._unreached = False  # Envoy answered: the request never reached a backend
        self._json_limit = JSON_KEEP_BYTES  # past it, _json_tail_only() trims the body
        self._json_tail = False  # _json_body holds only the answer's last bytes
        self._json_usage: Usage | None = None  # the last usage in bytes trimmed off
        self._error_body: bytearray | None = None  # a backend's error answer, being held
        self._empty = 0  # the status of a backend's success with no body (a 502, its hold)
        self._redirect = 0  # the status of a backend's redirect (a 502, nothing charged)
        self._model_id = ""  # GET /v1/models/{id}: the id
        self.responded = False  # the response has begun (response_start was called)
        self.endpoint: Endpoint | None = None
        self.principal: Principal | None = None
        self.req: InferenceRequest | None = None
        self.route: Route | None = None  # set once admitted: a record is owed
        self.alias = ""  # the configured alias the request named, once read (logs)
        self.request_id = ""
        self.traceparent: str | None = None
        self.status = 0
        self.finished = False
        # An ending whose prompt the backend counts before its record is written (its
        # URL, the /tokenize body): ext_proc asks it (`finish` leaves this, never writes).
        self.recount_owed: tuple[Ending, str, Recount] | None = None
        # The admitted request's answer reached Envoy (the servicer wrote it): only then
        # can it have gone to a backend (only that answer names the cluster).
        self.delivered = False

    @property
    def admitted(self) -> bool:
        return self.route is not None

    # -- request side ---------------------------------------------------------

    def identify(self, method: str, path: str, request_id: str, traceparent: str | None,
                 principal: Principal | None) -> None:
        """Which endpoint, which request, whose key (`principal`: ext_authz's decision)."""
        self.request_id = request_id or uuid.uuid4().hex
        self.traceparent = traceparent or None
        endpoint = lookup(method, path)
        if endpoint is None:
            raise not_found(path)
        if principal is None:
            # Only reachable when ext_authz did not run first: refuse, never guess.
            raise invalid_api_key("No authenticated API key on this request.")
        self.endpoint, self.principal = endpoint, principal
        if endpoint.prefix:
            self._model_id = path_argument(endpoint, path)

    async def request_headers(self, end_of_stream: bool) -> tuple[bytes, Headers] | None:
        """GET /v1/models and /v1/models/{id} (the only routes that send request headers):
        the body and rate-limit headers. None: another endpoint, whose body follows."""
        assert self.endpoint is not None and self.principal is not None
        kind = self.endpoint.kind
        if not kind.answered_here:
            if end_of_stream:
                raise invalid_request("This endpoint needs a JSON request body.")
            return None
        principal = self.principal
        created = int(self._started.timestamp())
        if kind is Kind.MODEL:
            alias = self._model_id
            # A model the key may not use is as absent as one that does not exist.
            if alias not in self._snap.config.models or not principal.may_use(alias):
                raise model_not_found(alias)
            body = model_object(alias, created)
        else:
            body = models_list([a for a in self._snap.aliases if principal.may_use(a)],
                               created)
        # Counts as a request for the rate limit; reserves no tokens or money.
        decision = await self._admit(self._make_ask(0, 0))
        self._settle = (0, 0)
        self._record_here(alias if kind is Kind.MODEL else "")
        return body, tuple(rate_headers(decision))

    def _record_here(self, model: str) -> None:
        """The one record of a request answered here (it counted against the key's
        limits): no backend, no tokens, no cost; `model` "" for the list."""
        principal, endpoint = self.principal, self.endpoint
        assert principal is not None and endpoint is not None
        route = self._snap.router.route(model) if model else None
        hold = self._ask.record if self._ask is not None else None
        self.finished = True
        self.record = make_record(
            request_id=self.request_id, key_id=principal.key_id, org=principal.org,
            model=model, upstream_model=route.upstream_model if route else "", backend="",
            usage=Usage(), price=_FREE, status=200, stream=False, estimated=False,
            started_at=self._started, duration_ms=(time.monotonic() - self._t0) * 1000,
            endpoint=endpoint.name,
            key_budget_period=hold.key_budget_period if hold else None,
            org_budget_period=hold.org_budget_period if hold else None)
        self._rec.record(self.record)
        self._rec.count(self.record)  # no usage hold: never swept as lost

    async def request_body(self, raw: bytes) -> Forward:
        """Validate, check the allow-list, build the forwarded body, then admit: every
        refusal comes before anything is held."""
        assert self.endpoint is not None and self.principal is not None
        cfg = self._snap.config
        endpoint = self.endpoint
        # Large bodies are bounded and re-encoded off the event loop (authz/services/heavy.py).
        try:
            req, body = await sized_work(len(raw), lambda: _parsed(raw, endpoint, cfg))
        except ApiError as e:
            self.alias = e.model  # the refusal's log line names it where it was read
            raise
        self.alias = req.alias
        if not self.principal.may_use(req.alias):
            raise model_not_allowed(req.alias)
        route = self._snap.router.route(req.alias)
        assert route is not None  # parse_request checked the alias
        # The hold: every multiplier and prompt-bearing field (policy/request.py).
        key_period, org_period = self._budget_periods()
        record = HoldRecord(
            model=req.alias, upstream_model=route.upstream_model, endpoint=self.endpoint.name,
            stream=req.stream, prompt_tokens=req.prompt_bound,
            completion_tokens=req.completion_bound, started_at=iso_z(self._started),
            key_budget_period=key_period, org_budget_period=org_period)
        decision = await self._admit(self._make_ask(req.hold_tokens, req.hold_cost_nano(),
                                                    record))
        self.req, self.route = req, route  # admitted: from here a record is owed
        if (cfg.envoy.meters_streams and req.stream
                and self.endpoint.kind in _ENVOY_METERED and self._reports is not None
                and self._reports.expect(self.request_id)):
            self._envoy_meter = "keep" if req.client_wants_usage else "strip"
        return Forward(body, route.cluster, rate_headers(decision), self._envoy_meter,
                       self._envoy_meter is not None and _echoes(self.endpoint.kind, req.body))

    def _make_ask(self, tokens: int, cost: int, record: HoldRecord | None = None) -> Ask:
        """What admission holds; `record` is what a lost hold's usage record says."""
        assert self.principal is not None
        lim = self.principal.limits
        return Ask(
            request_id=self.request_id,
            key_id=self.principal.key_id,
            org=self.principal.org,
            tokens=tokens,
            cost_nano=cost,
            period=period_id(lim.budget_period, self._started),
            lease_s=self._snap.config.envoy.hold_lease_s(record is not None and record.stream),
            record=record,
        )

    def _budget_periods(self) -> tuple[str | None, str | None]:
        """The ledgers this request is charged to: the key's and the org's budget period
        ids (None for an owner with no budget), as its admission and settlement use."""
        assert self.principal is not None
        lim = self.principal.limits
        key = (period_id(lim.budget_period, self._started)
               if lim.budget_nano is not None else None)
        ol = self._org_limits(self._snap.config, self.principal.org)
        org = (period_id(ol.budget_period, self._started)
               if ol is not None and ol.budget_usd is not None else None)
        return key, org

    def _org_hold(self, ask: Ask) -> tuple[Limits, Ask] | None:
        """The org's limits and a hold under the pseudo-key `org:<name>`, if configured."""
        ol = self._org_limits(self._snap.config, ask.org)
        return None if ol is None else org_hold(ol, ask, self._started)

    async def _admit(self, ask: Ask) -> Decision:
        """Admit under the org's limits, then the key's (a refusal holds nothing). If
        admission fails any other way (cancelled: the stream went away; the store broke
        mid-call), the store may hold it anyway: a settlement at zero is owed."""
        assert self.principal is not None
        org = self._org_hold(ask)
        self._ask, self._org = ask, org
        try:
            return await self._admission.admit_all(org, self.principal.limits, ask,
                                                   self._started)
        except ApiError:
            raise
        except BaseException:
            self._settle = (0, 0)
            raise

    # -- response side --------------------------------------------------------

    def response_start(self, status: int, backend: str, upstream_error: int = 0,
                       details: str = "") -> None:
        """The response's status and serving backend (0 and "" when unknown); an SSE
        meter for a stream the backend accepted (an error answer is JSON).
        `upstream_error`: the backend's own status when it answered with an error (Envoy
        already sends a 5xx on as 502): the record keeps it, the body is rewritten. A
        success marked so had no body: the client gets a 502 and the record says 502.
        `details`: Envoy's response-code details (which of its own errors this is)."""
        self.responded = True
        self._unreached = any(d in details for d in UNREACHED_DETAILS)
        if upstream_error and self.route is not None:
            status, self._error_body = upstream_error, bytearray()
            if upstream_error < 300:  # a marked success is one with no body (a 502)
                status, self._empty = BAD_GATEWAY, upstream_error
            elif upstream_error < 400:  # a redirect: no answer here, nothing generated
                status, self._redirect = BAD_GATEWAY, upstream_error
        if status:
            self.status = status
        if backend:
            self._backend = backend
        req, endpoint = self.req, self.endpoint
        if req is not None and endpoint is not None and req.stream and 0 < self.status < 400:
            self._meter = meter_for(endpoint.kind, req.client_wants_usage,
                                    self._snap.config.envoy.max_event_bytes,
                                    req.stream_interval)
            self._meter.echo = _echoes(endpoint.kind, req.body)
            self._pace = self._new_pace(req)

    def _new_pace(self, req: InferenceRequest) -> StreamPace:
        limits = self._snap.config.limits
        return StreamPace(limits.stalled_stream_s, max(1, req.sequences * req.prompts),
                          abort_steps=limits.abort_lag_steps, interval=req.stream_interval)

    def hand_over(self) -> bool:
        """Whether Envoy meters this response: a stream it was asked to meter, that the
        backend accepted (Envoy's meter applies the same test: authz/envoy_config/
        stream_meter.py). Then no chunk comes here, and the request ends with the report."""
        self.handed_over = (self._envoy_meter is not None and self._error_body is None
                            and 0 < self.status < 400)
        return self.handed_over

    def report_wait_s(self) -> float:
        """How long a handed-over stream may wait for its report: until shortly before
        its hold's lease ends (then the lost-hold sweep would write a second record). The
        lease outlasts any stream Envoy lets run, so a report that comes at all is in time."""
        assert self._ask is not None
        return max(0.0, self._ask.lease_s - (time.monotonic() - self._t0) - REPORT_MARGIN_S)

    def take_report(self, report: MeterReport | None) -> None:
        """Envoy's report on a stream it metered, or None when none came: then the record
        charges what the backend could have generated (the completion bound; the prompt
        as the backend counts it, else its bound)."""
        req, endpoint = self.req, self.endpoint
        assert req is not None and endpoint is not None and self.handed_over
        self.handed_over = False
        if report is None:
            self._meter = None
            self.finish(aborted=True, out_of_sight=True)
            return
        self._reported = True
        self._meter = meter_from_report(endpoint.kind, report,
                                        self._snap.config.envoy.max_event_bytes,
                                        req.stream_interval)
        if report.ttft_s is not None:
            self._t_first = self._t0 + report.ttft_s
        self._replay_pace(report)
        # Envoy answered the client a 5xx of its own (the backend failed before the
        # answer reached it, after its 200's headers): the record says what the client
        # got (client-libraries tester: a 502 recorded as 499).
        own = report.client_status if 500 <= report.client_status != self.status else 0
        self.finish(aborted=not report.ended, cut_by_gateway=report.cut_by_gateway,
                    client_status=own)

    def stream_ended_early(self) -> bool:
        """Its ext_proc stream ended: whether before its response headers came here, on
        a stream Envoy was asked to meter and not yet recorded (then notes when: Envoy
        may yet report on it, if its meter saw the backend's answer begin)."""
        if (self._envoy_meter is None or not self.admitted or self.finished
                or self.responded or self.handed_over):
            return False
        self._ended_at = time.monotonic()  # what the record judges by, if none comes
        return True

    def take_early_report(self, report: MeterReport | None, out_of_sight: bool) -> None:
        """The record of a request `stream_ended_early` was true of: with Envoy's
        report, as a stream handed over (its meter reports only a stream whose answer
        began below 400: what passed, how it ended, what the client got: the backend cut
        it as Envoy passed its 200 on, and the client got Envoy's 502, not a 499: final
        retest); without one, as any request that ended early."""
        if report is not None:
            # Its end is the stream's, which Envoy reports (review: a stream served on
            # whole out of sight was recorded as lasting until ext_proc's end).
            self._ended_at = 0.0 if report.end_s is None else self._t0 + report.end_s
            code = report.client_status
            self.response_start(code if 0 < code < 400 else 200, "")
            if self.hand_over():
                self.take_report(report)
                return
        self.finish(aborted=True, out_of_sight=out_of_sight)

    def _end(self) -> float:
        """When the request ended, where known (it may be recorded later: after Envoy's
        report, or the wait for one), else now."""
        return self._ended_at or time.monotonic()

    def _replay_pace(self, report: MeterReport) -> None:
        """A cut stream Envoy metered, as its pace would have seen it: its first and last
        generated text (Envoy reports no other times) and when it ended, so the silence
        before the cut is charged at the stream's pace, as ext_proc's meter charges it
        (streams tester: a client that stopped reading, its stream then cut by Envoy's
        idle timeout, paid a quarter of what the backend generated)."""
        pace, meter = self._pace, self._meter
        if pace is None or meter is None or report.ended or report.ttft_s is None:
            return
        seen = meter.tokens_seen
        # Envoy counts events, not the choices they open: the pace it gives is every
        # sequence's together (review: n=4 paid its silence 4 times over).
        pace.opened = max(pace.opened, pace.sequences)
        pace.chunk(self._t0 + report.ttft_s, min(seen, 1))
        if report.last_s is not None and report.events > 1:
            # Flow, not one read after a pause: a steady stream longer than stall_s was
            # charged its whole span again as a pause (review: ~3x what it carried).
            pace.flowed(self._t0 + max(report.last_s, report.ttft_s), seen - 1)
        if report.end_s is not None:
            self._ended_at = self._t0 + report.end_s

    def response_chunk(self, chunk: bytes, end: bool) -> bytes | None:
        """Meter one chunk; the bytes the client gets instead, or None for as is. Not
        admitted (a local reply, a refusal): nothing to meter. At the end, the record."""
        if self.route is None:
            return None
        self._last_byte = time.monotonic()
        out = (self._meter_chunk(chunk, end) if self._error_body is None
               else self._error_chunk(chunk, end))
        if end:
            self.finish()
        return out

    def _meter_chunk(self, chunk: bytes, end: bool) -> bytes | None:
        out: bytes | None = None
        meter = self._meter
        if meter is not None:
            seen, opened, merged, steps = (meter.tokens_seen, meter.first_chunks,
                                           meter.merged_tokens, meter.content_chunks)
            out = meter.feed(chunk)
            if end:
                tail = meter.finish()
                if tail is not None:
                    out = (out or b"") + tail
            if self._pace is not None:  # when its tokens came: see _usage
                self._pace.chunk(self._last_byte, meter.tokens_seen - seen,
                                 meter.first_chunks - opened, meter.content_chunks - steps,
                                 meter.merged_tokens > merged)
            if not self._t_first and meter.content_chunks:
                self._t_first = time.monotonic()
        else:
            body = self._json_body
            body += chunk
            if len(body) > self._json_limit:
                self._json_tail_only()
        return out

    def _json_tail_only(self) -> None:
        """A JSON answer past JSON_KEEP_BYTES: from now on keep only its last bytes (at
        most twice JSON_TAIL_BYTES between trims), where its top-level `usage` is, and the
        last `usage` found in what is trimmed (a key in the kept tail is found again) of a
        chat, completions, embeddings or score answer (see _TRIMMED_USAGE_KINDS)."""
        if self.endpoint is not None and self.endpoint.kind in _TRIMMED_USAGE_KINDS:
            self._json_usage = tail_usage(self._json_body) or self._json_usage
        self._json_body = bytearray(memoryview(self._json_body)[-JSON_TAIL_BYTES:])
        self._json_limit, self._json_tail = 2 * JSON_TAIL_BYTES, True

    def _error_chunk(self, chunk: bytes, end: bool) -> bytes:
        """A backend's error answer: held (the client gets nothing yet), then sent whole
        as OpenAI-shaped JSON. Envoy streams the response body to ext_proc with no
        content-length (chunked), so the new length needs no header."""
        held = self._error_body
        assert held is not None
        held += chunk[:max(0, ERROR_KEEP_BYTES - len(held))]
        if not end:
            return b""
        if self._empty:  # the `{}` the upstream-errors filter put in the empty body
            return empty_answer(self._empty).body()
        if self._redirect:
            return redirected_answer(self._redirect).body()
        route = self.route
        err = upstream_error(self.status, bytes(held), route.alias if route else "",
                             route.upstream_model if route else "")
        # Only a 404 for the model sent (not one for the path: a backend without the
        # endpoint, which no upstream_model fixes; review).
        if route is not None and unserved_model_answer(self.status, bytes(held),
                                                       route.upstream_model):
            log.error("a backend does not serve the model the gateway sends it: set the "
                      "alias's upstream_model to a name it serves (vLLM: "
                      "--served-model-name)", extra={"model": route.alias,
                                                     "upstream_model": route.upstream_model,
                                                     **REPEATS})
        return err.body()

    # -- the end --------------------------------------------------------------

    def answered_locally(self, status: int) -> None:
        """The gateway answered with an error and the stream ends here. An admitted
        request's record says so: the status, and nothing generated (before the response
        began; after, what was seen, as for a cut stream)."""
        if not self.responded:
            self.status = status
        self.finish(aborted=self.responded)

    def finish(self, aborted: bool = False, out_of_sight: bool = False,
               cut_by_gateway: bool | None = None, client_status: int = 0) -> None:
        """Write the one usage record of an admitted request (idempotent). A stream handed
        over to Envoy's meter finishes with its report (`take_report`), not before.
        `out_of_sight`: the response may go on where the services cannot see it (a
        handed-over stream whose report never came; the services stopping with the
        stream open, which Envoy then serves unmetered): unless its exact usage was
        already seen, charged what the backend could generate (its completion bound, its
        prompt as the backend counts it, else the prompt's bound), estimated, with the
        backend's status (LOST if it had not answered). `cut_by_gateway`: Envoy said
        whether its timeouts cut the stream (else the timings tell). `client_status`:
        Envoy's own 5xx to the client for a cut stream (0: none)."""
        ending = self.conclude(aborted, out_of_sight, cut_by_gateway, client_status)
        if ending is None:
            return
        recount = self.prompt_recount(ending)
        if recount is None:
            self.write(ending)
        elif not recount[1].asks:
            self.write(ending, recount[1].total(()))  # token ids: counted already
        else:  # the backend counts it first: ext_proc asks, then writes (`recount_owed`)
            self.recount_owed = (ending, *recount)

    def conclude(self, aborted: bool = False, out_of_sight: bool = False,
                 cut_by_gateway: bool | None = None, client_status: int = 0
                 ) -> Ending | None:
        """What the one record will say, decided now (the time since the last byte tells
        a client that left from a timeout); None when no record is owed here (already
        finished, not admitted, or Envoy meters it). `write` writes it."""
        if self.finished or not self.admitted or self.handed_over:
            return None
        self.finished = True
        if self._envoy_meter is not None and self._reports is not None:
            self._reports.forget(self.request_id)
        req = self.req
        assert req is not None
        usage, estimated = self._usage(req)
        whole = out_of_sight and estimated and self.status < 400
        if whole:  # what the backend could generate: its completion bound, and the
            # prompt the backend counts (below: recounted, else its bound)
            usage = Usage(req.prompt_estimate, req.completion_bound)
        status = self.status or CLIENT_CLOSED
        if not (self.delivered or self.responded or self.status):
            # Envoy gave up on the answer after its message timeout (it answered 503),
            # or the client left first.
            late = self._end() - self._t0 >= self._snap.config.envoy.decision_timeout_ms / 1000
            status = SERVICE_UNAVAILABLE if late else CLIENT_CLOSED
        elif out_of_sight:
            status = self.status  # nobody left, nothing timed out: the backend's (or LOST)
        elif self._meter is not None and self._meter.error_status:
            # The stream said generation failed (an error event after a 200): the record
            # says so, also when the client left after it; charged as a cut stream.
            status = self._meter.error_status
        elif aborted and self._error_body is None and (self._meter is None
                                                       or not self._meter.done):
            # (A backend's error answer keeps its status when the client leaves during
            # its body: the Node SDK drops the body of every answer it will retry.)
            if cut_by_gateway:
                status = GATEWAY_TIMEOUT
            elif client_status:  # Envoy's own 5xx, what the client got
                status = client_status
            else:
                status = (self._cut_status(req.stream) if cut_by_gateway is None
                          else CLIENT_CLOSED)
        prompt_estimated = (estimated and usage.prompt_tokens > 0
                            and usage.prompt_tokens == req.prompt_estimate)
        return Ending(usage, estimated, status, prompt_estimated,
                      (self._end() - self._t0) * 1000)

    def prompt_recount(self, ending: Ending) -> tuple[str, Recount] | None:
        """For a record whose prompt is the byte estimate, where its exact count comes
        from: (the serving backend's URL, what to ask it and what is known already)."""
        req = self.req
        if not ending.prompt_estimated or req is None or self.endpoint is None \
                or self.route is None or not req.model.prompt_recount:
            return None
        # The backend that served it; before its answer began (a client that left while
        # it generated), Envoy has not said which: any of the model's counts the same.
        url = self._backend or (req.model.backends[0].url if req.model.backends else "")
        ask = tokenize_request(self.endpoint.kind, req.body, self.route.upstream_model)
        return None if ask is None or not url else (url, ask)

    def write(self, ending: Ending, prompt_tokens: int | None = None) -> None:
        """Write the record `conclude` decided on, and owe its settlement; with
        `prompt_tokens`, the backend's count of the prompt (`Recount.total`; never above
        its bound); a prompt left at its byte estimate without one is charged its bound."""
        req, route, principal, endpoint = self.req, self.route, self.principal, self.endpoint
        assert req and route and principal and endpoint
        usage, estimated, status = ending.usage, ending.estimated, ending.status
        price = req.model.price_per_1k_tokens
        if ending.prompt_estimated:
            # The backend's count when it gave one; else the prompt's bound, not its byte
            # estimate: text of ~1 token a byte beats ~4 bytes a token four times over,
            # and a client could cut its streams to pay a quarter of its prompts.
            counted = (req.prompt_bound if prompt_tokens is None
                       else min(prompt_tokens, req.prompt_bound))
            usage = Usage(counted, usage.completion_tokens)
        cost = cost_nano(usage.prompt_tokens, usage.completion_tokens, price)
        if not estimated and max(usage.total_tokens, cost) > MAX_EXACT:
            # A backend's usage past what the ledgers count exactly (10**12 tokens): no
            # backend generates that, and it cannot be settled. Its hold is charged.
            log.error("the backend reported usage past all bounds: charged its hold",
                      extra={"request_id": self.request_id, "prompt_tokens":
                             usage.prompt_tokens, "completion_tokens": usage.completion_tokens})
            self._rec.bound_violation(req.alias)
            usage, estimated = Usage(req.prompt_bound, req.completion_bound), True
            cost = cost_nano(usage.prompt_tokens, usage.completion_tokens, price)
        elif not estimated and 200 <= status < 300 and (
                (req.prompt_ceiling is not None and usage.prompt_tokens > req.prompt_ceiling)
                or (req.prompt_bound > 0 and usage.prompt_tokens < req.prompts)):
            # More prompt tokens than the model's context holds, prompt by prompt (a pair
            # for rerank / score), or none for a prompt: a misreport, not tokens
            # (hostile-backend tester: 10**6 for a short prompt took a $0.40 budget to
            # $500; 0 charged exact). Its hold is charged.
            log.error("the backend reported a prompt count the request cannot have: "
                      "charged the prompt's bound",
                      extra={"request_id": self.request_id, "prompt_tokens":
                             usage.prompt_tokens, "allowed": req.prompt_ceiling})
            self._rec.bound_violation(req.alias)
            usage = Usage(req.prompt_bound, min(usage.completion_tokens, req.completion_bound))
            estimated = True
            cost = cost_nano(usage.prompt_tokens, usage.completion_tokens, price)
        elif usage.completion_tokens > req.completion_bound:
            # More than the max_tokens written upstream let it generate (times every
            # sequence): a backend's misreport, not tokens. What it could generate is
            # charged, so a key's spend stays within its budget.
            log.error("the backend reported more completion tokens than the request "
                      "allowed: charged what it allowed",
                      extra={"request_id": self.request_id, "completion_tokens":
                             usage.completion_tokens, "allowed": req.completion_bound})
            self._rec.bound_violation(req.alias)
            usage, estimated = Usage(usage.prompt_tokens, req.completion_bound), True
            cost = cost_nano(usage.prompt_tokens, usage.completion_tokens, price)
        hold = self._ask.record if self._ask is not None else None
        self._settle = (usage.total_tokens, cost)
        rec = (
            make_record(
                request_id=self.request_id,
                key_id=principal.key_id,
                org=principal.org,
                model=req.alias,
                upstream_model=route.upstream_model,
                # Out of sight before its answer came, the backend Envoy chose is not
                # known: but for a model's only one (the audit compares by backend).
                backend=self._backend or (req.model.backends[0].url if not status
                                          and len(req.model.backends) == 1 else ""),
                usage=usage,
                price=price,
                status=status,
                stream=req.stream,
                estimated=estimated,
                started_at=self._started,
                duration_ms=ending.duration_ms,
                endpoint=endpoint.name,
                key_budget_period=hold.key_budget_period if hold else None,
                org_budget_period=hold.org_budget_period if hold else None,
                sequences=req.sequences,
                prompt_bound=req.prompt_bound,
                completion_bound=req.completion_bound,
            )
        )
        if not status:  # out of sight before the backend answered
            rec = dataclasses.replace(rec, status=LOST)
        self.record = rec
        self._rec.record(rec)
        self._count = (rec, self._t_first - self._t0 if self._t_first else None)
        if self._meter is not None and self._meter.oversize_events:
            self._rec.oversize_events(req.alias, self._meter.oversize_events)

    def _unseen(self) -> int | None:
        """Tokens a cut stream's backend could have generated in its pauses and before
        its abort landed (None: it paused, at no pace to measure); 0 for a stream that
        ended or said `[DONE]`, and no abort's steps after an error event."""
        meter, pace = self._meter, self._pace
        if pace is None or meter is None or meter.ended or meter.done:
            return 0
        unseen = pace.unseen(self._end(), meter.tokens_seen)
        if unseen is None or meter.error_status:  # (generation failed: nothing steps on)
            return unseen
        # A stream Envoy metered reports its events, not which choices they opened, nor
        # its role chunks (clients tester: a cut n=3 stream owed 3 steps, not 9; review:
        # no event is no proof none had opened): each may be running.
        return unseen + pace.abort_lag(self._reported)

    def _cut_status(self, stream: bool) -> int:
        """A response that ended early: 504 if Envoy's timeouts cut it, else 499."""
        now = self._end()
        cut = self._snap.config.envoy.ended_by_gateway(stream, now - self._last_byte,
                                                       now - self._t0)
        return GATEWAY_TIMEOUT if cut else CLIENT_CLOSED

    def sweep_records(self) -> bool:
        """Whether the lost-hold sweep would write this admitted request's record (its
        record-carrying hold is in the store: see Admission.sweep_records)."""
        if self._ask is None or self.principal is None:
            return False
        return self._admission.sweep_records(self._org, self.principal.limits, self._ask)

    @property
    def settle_pending(self) -> bool:
        return self._settle is not None

    async def settle(self) -> None:
        """Settle what admission holds, once owed (after the record, or at zero); then
        count the record in the metrics, unless the settlement corrected a `lost` charge:
        the sweep's lost record was counted already (requests, tokens, cost), and
        counters cannot go down, so the request stays counted once, as that lost charge.
        (A settlement spooled through an outage cannot tell yet: its record is counted.)"""
        pending, self._settle = self._settle, None
        count, self._count = self._count, None
        corrected = False
        try:
            if pending is None or self._ask is None or self.principal is None:
                return
            now = self._rt.clock()
            # Only the correction of the hold that carried the record means the sweep
            # wrote (and counted) a `lost` record: the org's when it landed in the store
            # (admit_all), else the key's. A key's record-less hold claimed by a sweep
            # that had not reached the org's yet counted nothing.
            on_org = self._admission.org_carries_record(self._org)
            done = await self._admission.settle(self.principal.limits, self._ask,
                                                pending[0], pending[1], now)
            corrected = done.corrected and not on_org
            if done.bound_violated and self.req is not None:
                self._rec.bound_violation(self.req.alias)
            if self._org is not None:
                org = await self._admission.settle(*self._org, pending[0], pending[1], now)
                corrected = corrected or (on_org and org.corrected)
        finally:
            if count is not None and not corrected:
                self._rec.count(*count)

    def _usage(self, req: InferenceRequest) -> tuple[Usage, bool]:
        """The upstream's own count when it gave one; else an estimate from what was seen.
        Endpoints that use no tokens (tokenize) count nothing, nor does a request whose
        admission never reached Envoy (it answered 503 or its client left first)."""
        if not self.delivered and not self.responded:
            return Usage(), False
        if self.endpoint is not None and not self.endpoint.kind.metered:
            return Usage(), False
        if self._meter is not None:
            if self._meter.usage is not None:
                return self._meter.usage, False
            if self._meter.refused and not req.hides_tokens and req.prompts == 1:
                # A 4xx error event first: the backend refused the request in its stream
                # and generated nothing, as it would have answered 400 without `stream`.
                # (Not a batch: vLLM starts each prompt at once, and one refused cancels
                # the others, which may have been read by then.)
                return Usage(), False
            if self._meter.unreadable and 200 <= self.status < 300:
                # A whole answer that is not SSE and has no readable usage (compressed,
                # HTML): like a JSON answer without usage, charged its whole hold.
                return Usage(req.prompt_bound, req.completion_bound), True
            if req.hides_tokens:
                # Its chunks do not count what was generated (reasoning or tool calls
                # vLLM holds back): what it could generate.
                return Usage(req.prompt_estimate, req.completion_bound), True
            # What the chunks carried, and what the backend could generate unseen while
            # they paused (policy/stream_pace.py); no more than it can count: an oversize
            # event's bytes are not tokens.
            unseen = self._unseen()
            completion = (req.completion_bound if unseen is None
                          else self._meter.completion_estimate + unseen)
            return Usage(req.prompt_estimate, min(completion, req.completion_bound)), True
        if self._json_body:
            if self._json_tail:
                usage = (tail_usage(self._json_body) or self._json_usage
                         if self.endpoint is not None
                         and self.endpoint.kind in _TRIMMED_USAGE_KINDS else None)
            else:
                generates = self.endpoint is not None and self.endpoint.kind in _GENERATES
                try:
                    obj = loads_lenient(self._json_body)
                    usage = usage_from_obj(obj.get("usage"), generates)
                except (orjson.JSONDecodeError, AttributeError):
                    usage = None
                else:
                    if usage is not None and generates and (
                            usage.completion_tokens < answered_choices(obj)):
                        # Text in the answer, fewer tokens counted: no count (a backend
                        # said 0 for 200 words: hostile-backend retest); the hold.
                        usage = None
            if usage is not None:
                return usage, False
        if self._empty:
            # A success with no body (the client got a 502): like a 2xx answer whose usage
            # cannot be read, the backend may have generated (and counted) its whole hold.
            return Usage(req.prompt_bound, req.completion_bound), True
        if self.status >= 400 and (self._error_body is not None or not self.responded
                                   or self.status not in GATEWAY_CUTS or self._unreached):
            return Usage(), False  # refused (the backend, or Envoy): nothing was generated
        if not req.stream and self.responded and 200 <= self.status < 300:
            # A JSON answer whose usage cannot be read (none, malformed, past the tail
            # kept, or the answer cut short): vLLM sends it once generated, so the
            # backend may have counted its whole hold.
            return Usage(req.prompt_bound, req.completion_bound), True
        if not req.stream:
            # Delivered, and no answer came that could be read: the client left or
            # Envoy's timeout cut it before the answer, or the backend's connection reset
            # after it had the request. vLLM writes a JSON answer only once generated, so
            # it may have generated its whole hold: charged, so a key's budget bounds
            # what is generated (a client timing out on every request paid its prompts
            # alone). Envoy may still have been connecting: it cannot tell. Its prompt
            # as the backend counts it, as a cut stream's (else its bound: `write`).
            return Usage(req.prompt_estimate, req.completion_bound), True
        # A stream that began no answer: its prompt by the backend's count; all it could
        # generate if it writes no chunk for some of it. Cut before any of it reached
        # ext_proc (the client left: the backend's headers may have reached it, and
        # generation begun), what every sequence may generate before the abort lands
        # (streams tester: 0 charged where the backend had generated; real vLLM counted
        # 27 for a stream cut right after its headers). Envoy's own ending (a 504 or 502
        # with no byte from the backend) generated nothing to see.
        completion = (req.completion_bound if req.hides_tokens else 0 if self.responded
                      else min(req.completion_bound, self._new_pace(req).abort_lag(True)))
        return Usage(req.prompt_estimate, completion), True


# A `usage` key whose value is an object, as the usage is. The pattern opens with its
# literal, which the regex engine seeks in C (tens of ms over 64 MiB, however many keys
# or strings spell `usage`); a `usage` key with any other value (a completions answer's
# `top_logprobs` is keyed by token text) is passed over without a copy or a decode: each
# was a 4 KiB decode, seconds on the event loop for a 64 MiB answer of them. (The regex
# this replaced began with the backslashes, so it was tried at every byte.) The
# backslashes before a match: an odd count escapes its quote, so the text is inside a key
# that ends in `"usage`, not that key.
_USAGE_KEY = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*(?=\{)')
_BACKSLASH = 0x5C
_DECODER = json.JSONDecoder()
# A usage object is far shorter than this (its *_details included).
_USAGE_OBJ_BYTES = 4096


def tail_usage(tail: bytes | bytearray) -> Usage | None:
    """The top-level `usage` of a JSON answer from its last bytes: the value after the
    last `"usage":` key there (vLLM writes it after `choices`, near the end). A JSON
    string cannot hold `"usage":` unescaped, so that text is always a key."""
    for m in reversed(list(_USAGE_KEY.finditer(tail))):
        at, slashes = m.start(), 0
        while at > slashes and tail[at - slashes - 1] == _BACKSLASH:
            slashes += 1
        if slashes % 2:
            continue
        text = bytes(tail[m.end():m.end() + _USAGE_OBJ_BYTES]).decode("utf-8", "replace")
        try:
            obj, _ = _DECODER.raw_decode(text)
        except ValueError:
            continue
        usage = usage_from_obj(obj)
        if usage is not None:
            return usage
    return None
