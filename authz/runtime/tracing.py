"""OpenTelemetry traces: one span per ext_authz Check and per ext_proc stream, each a
child of the request's trace (`traceparent`), exported by OTLP when
OTEL_EXPORTER_OTLP_ENDPOINT is set.

Start-up never waits on the collector: the exporter connects lazily from a
background thread, every export is bounded, and shutdown gives up after a
short flush. Without the variable there is no tracer and no per-request cost.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("tokenbooth.tracing")
_PROPAGATOR = TraceContextTextMapPropagator()
EXPORT_TIMEOUT_MS = 2000


def make_provider(processor: SpanProcessor | None = None) -> TracerProvider | None:
    """A provider exporting to OTLP when configured (or to `processor`, for tests)."""
    if processor is None:
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if not endpoint:
            return None
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_MS / 1000)
        processor = BatchSpanProcessor(exporter, export_timeout_millis=EXPORT_TIMEOUT_MS,
                                       schedule_delay_millis=1000)
        log.info("exporting traces by OTLP", extra={"endpoint": endpoint})
    name = os.environ.get("OTEL_SERVICE_NAME", "tokenbooth")
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(processor)
    return provider


def tracer_of(provider: TracerProvider | None) -> Tracer | None:
    return provider.get_tracer("tokenbooth") if provider is not None else None


def parent_context(headers: Mapping[str, str]) -> otel_context.Context:
    """The request's trace context from its `traceparent` (empty when absent)."""
    tp = headers.get("traceparent")
    return _PROPAGATOR.extract({"traceparent": tp}) if tp else otel_context.Context()
