"""OpenTelemetry traces: one span per ext_authz Check and per ext_proc stream, each a
child of the request's trace (`traceparent`), exported by OTLP when the settings name
a collector (OTEL_EXPORTER_OTLP_ENDPOINT, read by the CLI).

Start-up never waits on the collector: the exporter connects lazily from a
background thread, every export is bounded, and shutdown gives up after a
short flush. Without a collector there is no tracer and no per-request cost.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from authz.runtime.settings import DEFAULT_SERVICE_NAME

log = logging.getLogger("tokenbooth.tracing")
_PROPAGATOR = TraceContextTextMapPropagator()
EXPORT_TIMEOUT_MS = 2000


def otlp_provider(endpoint: str | None, service_name: str) -> TracerProvider | None:
    """A provider exporting to the OTLP collector at `endpoint`; None without one."""
    if not endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_MS / 1000)
    processor = BatchSpanProcessor(exporter, export_timeout_millis=EXPORT_TIMEOUT_MS,
                                   schedule_delay_millis=1000)
    log.info("exporting traces by OTLP", extra={"endpoint": endpoint})
    return make_provider(processor, service_name)


def make_provider(processor: SpanProcessor,
                  service_name: str = DEFAULT_SERVICE_NAME) -> TracerProvider:
    """A provider handing every span to `processor` (tests pass an in-memory one)."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(processor)
    return provider


def tracer_of(provider: TracerProvider | None) -> Tracer | None:
    return provider.get_tracer("tokenbooth") if provider is not None else None


def parent_context(headers: Mapping[str, str]) -> otel_context.Context:
    """The request's trace context from its `traceparent` (empty when absent)."""
    tp = headers.get("traceparent")
    return _PROPAGATOR.extract({"traceparent": tp}) if tp else otel_context.Context()
