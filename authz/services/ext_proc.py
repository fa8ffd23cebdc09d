"""ext_proc: the servicer loop. One gRPC stream per HTTP request: `exchange` translates
each message, a `Lifecycle` decides; refusals become ImmediateResponses here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import grpc
from opentelemetry.trace import Span, SpanKind, Tracer

from authz.runtime.metrics import Metrics
from authz.runtime.recorder import Recorder
from authz.runtime.snapshot import Runtime
from authz.runtime.tracing import parent_context, span_attributes
from authz.services import protos
from authz.services.exchange import handle
from authz.services.lifecycle import EARLY_REPORT_S, Ending, Lifecycle, OrgLimitsOf
from authz.services.meter_reports import MeterReports
from authz.services.prompt_counter import PromptCounter, backend_headers
from authz.services.refusals import log_refusal
from authz.services.stalls import Stalls
from authz.state.limits.admission import Admission
from policy.errors import ApiError
from policy.meter_report import MeterReport
from policy.prompt_count import Recount

log = logging.getLogger("tokenbooth.ext_proc")

_INTERNAL = ApiError(500, "internal_error", "The gateway failed to process this request.")
# A stream that ends this close to the end of the stop's grace period was cancelled by it.
STOP_TOLERANCE_S = 0.05


class ExternalProcessorService(protos.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, runtime: Runtime, recorder: Recorder, metrics: Metrics,
                 admission: Admission, tracer: Tracer | None = None,
                 org_limits: OrgLimitsOf | None = None,
                 reports: MeterReports | None = None) -> None:
        self._tracer = tracer
        self._reports = reports or MeterReports()
        self._org_limits = org_limits
        self._rt = runtime
        self._recorder = recorder
        self._admission = admission
        self._settling: set[asyncio.Future[None]] = set()
        # Tasks that wait before a record (a stream's meter report, a prompt count): a
        # hurried stop cancels them and leaves their holds to the lost-hold sweep.
        self._waiting: set[asyncio.Future[None]] = set()
        self._hurried = False
        self._left: set[str] = set()  # the requests a hurried stop left to the sweep
        self._counter = PromptCounter()
        self._metrics = metrics
        self._seconds = metrics.decision_seconds.labels("ext_proc")
        self._cut_at: float | None = None  # when the stopping server cancels its streams
        self.stalls = Stalls()

    def stopping(self, grace_s: float) -> None:
        """The server stops: the streams still open in `grace_s` it will cancel."""
        self._cut_at = time.monotonic() + grace_s

    def hurry(self) -> None:
        """A second stop signal: stop waiting. A request with no record yet gets none
        here: its hold stays in the store (the journal of `state: memory`, or Redis),
        where the lost-hold sweep charges it in full with its `lost` record (at the next
        start, or in any replica once its lease ends), as for a replica killed. Nothing
        that has begun a record or a settlement is cut: those finish (see `drain`)."""
        self._hurried = True
        # The streams the stop cancels now are served on out of sight (as past the grace):
        # one this process records (`_leave`) is charged its whole hold, not what was seen.
        self._cut_at = time.monotonic()
        for task in list(self._waiting):
            task.cancel()

    @property
    def unfinished(self) -> int:
        """Records and settlements still under way (after `drain`: those it gave up on)."""
        return len(self._settling)

    @property
    def left_to_sweep(self) -> int:
        """How many requests a hurried stop left unrecorded (their holds: the sweep's)."""
        return len(self._left)

    def _leave(self, life: Lifecycle) -> bool:
        """Whether a hurried stop leaves this admitted, unrecorded request to the sweep."""
        if not self._hurried or not life.admitted or life.record is not None:
            return False
        if not life.sweep_records():
            # Its hold is in no store (admitted while the store was away): no sweep will
            # ever record it, so this process does, without waiting (see `_recount_owed`).
            return False
        self._left.add(life.request_id)
        return True

    def _out_of_sight(self, life: Lifecycle, opened: float,
                      forwarded: float | None = None) -> bool:
        """Whether a stream that ended early was served on out of the services' sight
        (with on_metering_loss: serve, Envoy serves the rest of a response unmetered):
        the stopping server cancelled it, or it ends as this process wakes from standing
        still past Envoy's message timeout while the response ran (Envoy gave up on it),
        or after the request went to the backend (`forwarded`: when its body's answer
        was written) and before its answer came (a JSON answer, served whole by Envoy:
        overload tester). Else the client or Envoy went away."""
        envoy = self._rt.snapshot.config.envoy
        if envoy.on_metering_loss != "serve":
            return False
        if self._cut_at is not None and time.monotonic() >= self._cut_at - STOP_TOLERANCE_S:
            return True
        timeout = envoy.decision_timeout_ms / 1000
        if life.responded:
            return self.stalls.just_woke(opened, timeout)
        # (A gap before the request was forwarded is one Envoy gave up on it in: a 503.)
        return forwarded is not None and self.stalls.just_woke(forwarded, timeout)

    async def Process(
        self,
        request_iterator: AsyncIterator[protos.Msg],
        context: grpc.aio.ServicerContext,
    ) -> None:
        # context.read()/write() rather than iterating and yielding: measured ~10% less
        # CPU per message with grpc.aio (and each message is most of the cost).
        life = Lifecycle(self._rt, self._recorder, self._admission, self._org_limits,
                         self._reports)
        self.stalls.start()
        opened = time.monotonic()
        span: Span | None = None
        forwarded: float | None = None  # when the request went on to the backend
        start_ns = time.time_ns()
        read, write, eof = context.read, context.write, grpc.aio.EOF
        try:
            while (msg := await read()) is not eof:
                t0 = time.perf_counter()
                try:
                    resp = await handle(life, msg)
                except Exception as e:  # every error ends in one answer
                    resp = self._error_answer(life, e)
                self._seconds.observe(time.perf_counter() - t0)
                # A stream the request never reached (a local reply, such as ext_authz's
                # refusal, passing through the response phase) is no span of its own:
                # unidentified, it began a trace of its own (observability tester).
                if span is None and self._tracer is not None and life.request_id:
                    span = self._tracer.start_span(
                        "ext_proc", kind=SpanKind.SERVER, start_time=start_ns,
                        context=parent_context(
                            {"traceparent": life.traceparent} if life.traceparent else {},
                            life.request_id),
                    )
                await write(resp)
                if life.admitted and not life.delivered:
                    life.delivered, forwarded = True, time.monotonic()
                if life.recount_owed is not None and self._recount_owed(life, span):
                    span = None  # the recount ends it
                if life.settle_pending:
                    await self._settle_apart(life)
                if resp.HasField("immediate_response") or _last(msg) or life.handed_over:
                    return
        finally:
            if self._leave(life):
                pass  # a hurried stop: left to the lost-hold sweep
            elif life.handed_over:
                # Envoy meters the rest: the record and settlement wait for its report.
                self._apart(self._after_report(life, span), waits=True)
                span = None
            elif life.stream_ended_early():
                # Ended before its response headers came: Envoy's meter may have seen
                # the answer begin, and its report says what the client got.
                oos = self._out_of_sight(life, opened, forwarded)
                self._apart(self._after_report(life, span, oos), waits=True)
                span = None
            # The stream ended: normally after the response, else the client or
            # Envoy went away mid-request, or the rest is served out of sight (this
            # server stopped, or stood still, with the stream open: charged whole).
            # Either way, exactly one record.
            elif not life.finished and self._end_early(life, opened, span, forwarded):
                span = None  # the recount ends it
            # A record decided with the last answer, whose write was cancelled (Envoy
            # resets the stream as soon as it has that answer) before its recount began.
            elif life.recount_owed is not None and self._recount_owed(life, span):
                span = None
            # A cancelled stream (client gone) must still settle (normally the loop above
            # has settled already and there is nothing to do).
            if life.settle_pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await self._settle_apart(life)
            if span is not None:
                _end_span(span, life)

    def _end_early(self, life: Lifecycle, opened: float, span: Span | None,
                   forwarded: float | None = None) -> bool:
        """The record of a request that ended before its response did (see
        `_recount_owed`): True when a recount is under way."""
        life.finish(aborted=True, out_of_sight=self._out_of_sight(life, opened, forwarded))
        return self._recount_owed(life, span)

    def _recount_owed(self, life: Lifecycle, span: Span | None) -> bool:
        """A record whose prompt is left at its byte estimate: the backend counts it first
        (its /tokenize), in a task of its own that then writes the record and settles:
        True when that is under way (it ends the span)."""
        owed, life.recount_owed = life.recount_owed, None
        if owed is None or self._leave(life):  # a hurried stop: the sweep's
            return False
        ending, url, recount = owed
        if self._hurried:  # not left to the sweep (`_leave`), and no wait: the bound
            life.write(ending)
            return False
        headers = backend_headers(self._rt.snapshot.config, url,
                                  self._rt.settings.backend_keys)
        if headers is None:  # the backend's key cannot be read here: the bound
            life.write(ending)
            return False
        self._apart(self._recount(life, ending, url, recount, headers, span), waits=True)
        return True

    async def _recount(self, life: Lifecycle, ending: Ending, url: str, recount: Recount,
                       headers: dict[str, str], span: Span | None) -> None:
        """The backend's count of a cut request's prompt (each prompt of a batch at once),
        then its record and settlement (the prompt's bound when the backend cannot say)."""
        try:
            try:
                answers = await asyncio.gather(
                    *(self._counter.count(url, ask, headers) for ask in recount.asks))
            except asyncio.CancelledError:  # the server stopping: the bound, settled
                if not self._leave(life):  # (a hurried stop: the sweep's)
                    life.write(ending)
                    await self._settle_apart(life)
                raise
            counts = [n for n in answers if n is not None]
            life.write(ending, recount.total(counts) if len(counts) == len(answers) else None)
            await self._settle_apart(life)  # once written, never cut by a hurried stop
        finally:
            if span is not None:
                _end_span(span, life)

    async def drain(self, timeout_s: float) -> None:
        """Let the records and settlements still under way finish (at most `timeout_s`),
        those they start meanwhile too (a stream's report brings its prompt count, which
        then writes the record), then close the backend session. Called once the gRPC
        server has stopped: streams Envoy metered whose report did not come by then get
        none (`MeterReports.close`) and are recorded now."""
        self._reports.close()
        deadline = time.monotonic() + timeout_s
        while self._settling and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._settling), timeout=left)
        await self._counter.close()

    async def _settle_apart(self, life: Lifecycle) -> None:
        """Settle as a task of its own: Envoy resets the stream right after the last
        answer, and a cancelled settlement (waiting on Redis, a reconnect, a script
        reload) would leave its hold to be charged in full when the lease ends."""
        await asyncio.shield(self._apart(life.settle()))

    def _apart(self, work: Coroutine[Any, Any, None], waits: bool = False,
               ) -> asyncio.Future[None]:
        """`work` as a task the stop drains; `waits`: one a hurried stop cancels (it
        waits before its record: see `hurry`)."""
        task = asyncio.ensure_future(work)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        if waits:
            self._waiting.add(task)
            task.add_done_callback(self._waiting.discard)
        return task

    async def _after_report(self, life: Lifecycle, span: Span | None,
                            early: bool | None = None) -> None:
        """A stream Envoy metered: its report (or none by the time the stream must have
        ended), then the record and the settlement. `early`: its ext_proc stream ended
        before the response headers came (`Lifecycle.stream_ended_early`), and whether
        it goes on out of sight: a report then comes at once if at all, or at its end."""
        wait = life.report_wait_s()
        if early is False:
            wait = min(wait, EARLY_REPORT_S)

        def take(report: MeterReport | None) -> None:
            if early is None:
                life.take_report(report)
            else:
                life.take_early_report(report, early)

        try:
            try:
                report = await self._reports.wait(life.request_id, wait)
            except asyncio.CancelledError:
                if self._hurried and not self._leave(life):  # (left: the sweep's, counted)
                    # A hurried stop, its hold in no store: recorded here, its whole hold.
                    take(None)
                    if life.recount_owed is not None:  # hurried: the prompt's bound, now
                        self._recount_owed(life, None)
                    self._apart(life.settle())
                raise
            if report is None and early is None:
                why = ("the services stopped before Envoy's report on a stream it metered "
                       "came" if self._reports.closed
                       else "no meter report for a stream Envoy metered")
                log.error("%s: charged what it could generate (its completion bound)", why,
                          extra={"request_id": life.request_id})
            take(report)
            if life.recount_owed is not None and self._recount_owed(life, span):
                span = None  # the recount writes, settles and ends it
                return
            await self._settle_apart(life)
        finally:
            if span is not None:
                _end_span(span, life)

    def _error_answer(self, life: Lifecycle, e: Exception) -> protos.Msg:
        """The one place an error becomes ext_proc's answer: an OpenAI-shaped
        ImmediateResponse (a refusal as it is; anything else as a 500)."""
        if isinstance(e, ApiError):
            self._metrics.decisions.labels("ext_proc", "deny", e.code).inc()
            log_refusal(log, e, life.request_id, life.principal, life.alias)
            err = e
        else:
            log.exception("ext_proc failed", extra={"request_id": life.request_id})
            err = _INTERNAL
        life.answered_locally(err.status)
        return protos.immediate_error(err)


def _last(msg: protos.Msg) -> bool:
    """This answer is the stream's last (no response trailers are sent): end the stream
    now, so its status goes out before Envoy resets it. A read still pending at the reset,
    or a status sent after it, leaks native memory in grpc.aio (grpc/grpc#43360)."""
    return msg.WhichOneof("request") == "response_body" and bool(
        msg.response_body.end_of_stream)


def _end_span(span: Span, life: Lifecycle) -> None:
    span.set_attribute("tokenbooth.request_id", life.request_id)
    if life.principal is not None:
        span.set_attribute("tokenbooth.key_id", life.principal.key_id)
        span.set_attribute("tokenbooth.org", life.principal.org)
    if life.req is not None:
        span.set_attribute("tokenbooth.model", life.req.alias)
    if life.status:
        span.set_attribute("http.response.status_code", life.status)
    if life.record is not None:
        span.set_attributes(span_attributes(life.record))
    span.end()
