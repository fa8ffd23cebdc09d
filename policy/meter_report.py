"""What Envoy's stream meter reports at a stream's end (`envoy.stream_metering: envoy`),
and how that becomes the same usage the services' own SSE meter would have found.

The Lua meter (authz/envoy_config/stream_meter.py) splits the stream into events and
counts them; it hands over the usage event raw, so the usage is read here by the same
parser and JSON code as everywhere else (policy/sse.py, policy/stream_usage.py)."""

from __future__ import annotations

from dataclasses import dataclass

from policy.endpoints import Kind
from policy.stream_usage import StreamMeter, meter_for


@dataclass(frozen=True, slots=True)
class MeterReport:
    events: int = 0  # content events the client was sent
    merged_tokens: int = 0  # tokens past one chunk's in events holding merged steps
    oversize_events: int = 0  # events over envoy.max_event_bytes, passed through unread
    oversize_bytes: int = 0
    usage_event: bytes = b""  # the last event with a usage object, raw ("": none)
    error_event: bytes = b""  # the first event that may say generation failed, raw
    error_first: bool = False  # and it was the stream's first event
    done: bool = False  # `data: [DONE]` passed
    ended: bool = False  # the body ended (else the stream was cut)
    unreadable: bool = False  # not an event stream: passed unread
    cut_by_gateway: bool = False  # Envoy's idle or duration timeout cut it
    # The status Envoy sent the client (0: unknown): its own 5xx where the backend failed
    # before the answer reached the client, whatever the backend's headers said.
    client_status: int = 0
    ttft_s: float | None = None  # from the request's start to the first generated text
    last_s: float | None = None  # ... to the last generated text
    end_s: float | None = None  # ... to the stream's end (cut or not)


def meter_from_report(kind: Kind, report: MeterReport, max_event_bytes: int,
                      tokens_per_chunk: int) -> StreamMeter:
    """A meter in the state the services' own would end in, had they read the stream."""
    meter = meter_for(kind, True, max_event_bytes, tokens_per_chunk)
    for event in (report.usage_event, report.error_event):
        if event:  # each read as ext_proc's meter reads it (its counts restored below)
            meter.feed(event)
            meter.finish()
    meter.restore(report.events, report.oversize_events, report.oversize_bytes, report.done,
                  unreadable=report.unreadable and report.ended, ended=report.ended,
                  merged_tokens=report.merged_tokens)
    meter.error_first = bool(report.error_event) and report.error_first
    return meter
