"""OpenTelemetry traces and metrics: one span per ext_authz Check and per ext_proc
stream, each a child of the request's trace (`traceparent`), and the GenAI histograms
of the metrics registry (authz/runtime/metrics.py), exported by OTLP when the settings
name a collector (OTEL_EXPORTER_OTLP_ENDPOINT, read by the CLI).

The metrics go from the Prometheus registry, where each record is counted once, to
OTLP data points every 15 s: measured, the SDK's own instruments would have cost ~45 µs
of CPU per record (attribute cleaning and hashing on every call) for the same numbers.

Start-up never waits on the collector: the exporters connect lazily from background
threads, every export is bounded, and shutdown gives up after a short flush. Without a
collector there is no tracer, no metrics export and no per-request cost.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, cast

from opentelemetry import context as otel_context
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
    Tracer,
    set_span_in_context,
    use_span,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from authz.runtime.metrics import GENAI_METRICS, PROVIDER, Metrics, error_type, operation_name
from authz.runtime.settings import DEFAULT_SERVICE_NAME
from policy.config import redacted
from policy.usage import UsageRecord

log = logging.getLogger("tokenbooth.tracing")
_PROPAGATOR = TraceContextTextMapPropagator()
EXPORT_TIMEOUT_MS = 2000
METRIC_EXPORT_INTERVAL_S = 15.0


def otlp_provider(endpoint: str | None, service_name: str) -> TracerProvider | None:
    """A provider exporting to the OTLP collector at `endpoint`; None without one."""
    if not endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_MS / 1000)
    processor = BatchSpanProcessor(exporter, export_timeout_millis=EXPORT_TIMEOUT_MS,
                                   schedule_delay_millis=1000)
    log.info("exporting traces by OTLP", extra={"endpoint": redacted(endpoint)})
    return make_provider(processor, service_name)


def make_provider(processor: SpanProcessor,
                  service_name: str = DEFAULT_SERVICE_NAME) -> TracerProvider:
    """A provider handing every span to `processor` (tests pass an in-memory one)."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}),
                              id_generator=RequestIdGenerator())
    provider.add_span_processor(processor)
    return provider


def tracer_of(provider: TracerProvider | None) -> Tracer | None:
    return provider.get_tracer("tokenbooth") if provider is not None else None


def otlp_metric_exporter(endpoint: str | None) -> MetricExporter | None:
    """An OTLP metric exporter to the collector at `endpoint`; None without one."""
    if not endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    log.info("exporting metrics by OTLP", extra={"endpoint": redacted(endpoint)})
    return OTLPMetricExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_MS / 1000)


class RegistryExport:
    """The GenAI histograms of `metrics`' registry, exported by `exporter` under their
    semantic-convention names and attributes (cumulative) every `interval_s`, from a
    thread of its own; `shutdown` exports the last values."""

    def __init__(self, metrics: Metrics, exporter: MetricExporter,
                 service_name: str = DEFAULT_SERVICE_NAME,
                 interval_s: float = METRIC_EXPORT_INTERVAL_S) -> None:
        self._metrics = metrics
        self._exporter = exporter
        self._resource = Resource.create({"service.name": service_name})
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otlp-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Bounded: one last export (its timeout) and the exporter's shutdown."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(EXPORT_TIMEOUT_MS / 1000 + 1)
        self._exporter.shutdown(timeout_millis=EXPORT_TIMEOUT_MS)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.export()
        self.export()

    def export(self) -> None:
        """One export of the current values (none before the first record)."""
        try:
            data = self.collect()
            if data.resource_metrics[0].scope_metrics[0].metrics:
                self._exporter.export(data, timeout_millis=EXPORT_TIMEOUT_MS)
        except Exception:  # the thread must outlive any one failure
            log.exception("metrics export failed")

    def collect(self) -> MetricsData:
        now = time.time_ns()
        metrics = []
        for spec, hist in zip(GENAI_METRICS, self._metrics.genai, strict=True):
            names = spec.labels
            points = [_data_point(s, names, now) for s in _histogram_series(hist.collect())]
            if points:
                metrics.append(Metric(spec.name, spec.description, spec.unit, Histogram(
                    points, AggregationTemporality.CUMULATIVE)))
        scope = ScopeMetrics(InstrumentationScope("tokenbooth"), metrics, "")
        return MetricsData([ResourceMetrics(self._resource, [scope], "")])


def _histogram_series(families: Any) -> list[dict[str, Any]]:
    """A Prometheus histogram's samples, grouped by label set."""
    series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for family in families:
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            one = series.setdefault(tuple(sorted(labels.items())),
                                    {"labels": labels, "buckets": []})
            kind = sample.name.rsplit("_", 1)[-1]
            if kind == "bucket":
                one["buckets"].append((float(sample.labels["le"]), sample.value))
            else:  # count, sum, created
                one[kind] = sample.value
    return list(series.values())


def _data_point(series: dict[str, Any], names: Mapping[str, str], now_ns: int
                ) -> HistogramDataPoint:
    """An OTLP data point from one series: its labels as attributes (`names`; an empty
    value, as a success's `error_type`, is none), per-bucket counts from Prometheus'
    cumulative ones."""
    buckets = sorted(series["buckets"])
    counts = [int(c - prev) for (_, c), (_, prev) in zip(buckets, [(0, 0.0), *buckets],
                                                          strict=False)]
    attrs = {names[k]: v for k, v in series["labels"].items() if v}
    return HistogramDataPoint(
        attributes=attrs, start_time_unix_nano=int(series.get("created", 0) * 1e9),
        time_unix_nano=now_ns, count=int(series.get("count", 0)),
        sum=series.get("sum", 0.0), bucket_counts=counts,
        explicit_bounds=[b for b, _ in buckets if math.isfinite(b)],
        # Prometheus histograms keep no min or max: left unset in the OTLP message.
        min=cast(float, None), max=cast(float, None))


def span_attributes(rec: UsageRecord) -> dict[str, str | int]:
    """A request span's GenAI attributes, from its usage record: operation, provider,
    models, token usage, and `error.type` on a failure."""
    attrs: dict[str, str | int] = {
        "gen_ai.operation.name": operation_name(rec.endpoint),
        "gen_ai.provider.name": PROVIDER,
        "gen_ai.request.model": rec.model,
        "gen_ai.response.model": rec.upstream_model,
        "gen_ai.usage.input_tokens": rec.prompt_tokens,
        "gen_ai.usage.output_tokens": rec.completion_tokens}
    err = error_type(rec.status)
    if err:
        attrs["error.type"] = err
    return attrs


def parent_context(headers: Mapping[str, str], request_id: str = "") -> otel_context.Context:
    """The request's trace context from its `traceparent`; without one, the request's own
    trace (`request_ids`): its Check's span, the parent of its ext_proc span. (Without a
    `traceparent` the two spans of one request began two traces, joined by nothing but
    an attribute: observability tester.)"""
    tp = headers.get("traceparent")
    if tp:
        return _PROPAGATOR.extract({"traceparent": tp})
    if not request_id:
        return otel_context.Context()
    trace_id, span_id = request_ids(request_id)
    root = SpanContext(trace_id, span_id, is_remote=True,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return set_span_in_context(NonRecordingSpan(root))


def request_ids(request_id: str) -> tuple[int, int]:
    """The trace id and root span id of a request that came without a `traceparent`,
    from its request id (Envoy's `x-request-id`), so both services name the same ones."""
    digest = hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:16], "big") or 1, int.from_bytes(digest[16:24], "big") or 1


@contextlib.contextmanager
def request_root(tracer: Tracer, name: str, headers: Mapping[str, str],
                 request_id: str) -> Iterator[Span]:
    """A request's first span (its Check): the child of its `traceparent`; without one,
    the root of the request's own trace, with the ids `request_ids` gives."""
    if headers.get("traceparent") or not request_id:
        with tracer.start_as_current_span(name, context=parent_context(headers),
                                          kind=SpanKind.SERVER) as span:
            yield span
        return
    token = _ROOT_IDS.set(request_ids(request_id))
    try:
        span = tracer.start_span(name, context=otel_context.Context(), kind=SpanKind.SERVER)
    finally:
        _ROOT_IDS.reset(token)
    with use_span(span, end_on_exit=True):
        yield span


# The ids `RequestIdGenerator` gives the span being started now (`request_root`).
_ROOT_IDS: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "tokenbooth_root_ids", default=None)


class RequestIdGenerator(RandomIdGenerator):
    """Random ids, but a request root's from `request_root`."""

    def generate_trace_id(self) -> int:
        ids = _ROOT_IDS.get()
        return ids[0] if ids is not None else super().generate_trace_id()

    def generate_span_id(self) -> int:
        ids = _ROOT_IDS.get()
        return ids[1] if ids is not None else super().generate_span_id()
