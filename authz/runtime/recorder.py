"""The end of a request: one usage record, its metrics and one log line."""

from __future__ import annotations

import logging

from authz.runtime.metrics import Metrics
from authz.state.usage.records import UsageSink
from policy.usage import UsageRecord

log = logging.getLogger("tokenbooth.usage")


class Recorder:
    def __init__(self, sink: UsageSink, metrics: Metrics) -> None:
        self._sink = sink
        self._m = metrics

    def bound_violation(self, model: str) -> None:
        """A settlement passed its hold (charged all the same; logged by Admission)."""
        self._m.hold_bound_violations.labels(model).inc()

    def oversize_events(self, model: str, n: int) -> None:
        """A stream carried `n` events over the size limit (passed through unread)."""
        self._m.oversize_events.labels(model).inc(n)

    def lost(self, rec: UsageRecord) -> None:
        """The record of a hold whose replica died, settled at its full hold."""
        self._m.lost_holds.inc()
        self.record(rec)
        self.count(rec)

    def spooled(self) -> None:
        """A settlement went to the disk spool: the limit store did not answer."""
        self._m.settlements_spooled.inc()

    def count(self, rec: UsageRecord, ttft_s: float | None = None) -> None:
        """Count `rec` in the metrics, once per request: a request's own record after its
        settlement (one whose settlement corrected a `lost` charge was counted as that
        lost record already: see Lifecycle.settle). `ttft_s`: a stream's time to its
        first content chunk, for the TTFT and per-output-token histograms."""
        self._m.observe(rec, ttft_s)

    def record(self, rec: UsageRecord) -> None:
        """Store `rec` and log it (its metrics: `count`)."""
        try:
            self._sink.write(rec)
        except (OSError, ValueError) as e:  # ValueError: the log was closed (a late end)
            # Never lose silently: the log line below still carries every field.
            log.error("usage record not stored: %s", e, extra={"record": rec.to_dict()})
        log.info(
            "request done",
            extra={
                "request_id": rec.request_id,
                "org": rec.org,
                "key_id": rec.key_id,
                "model": rec.model,
                "status": rec.status,
                "prompt_tokens": rec.prompt_tokens,
                "completion_tokens": rec.completion_tokens,
                "cost_usd": rec.cost_usd,
                "estimated": rec.estimated,
                "duration_ms": rec.duration_ms,
            },
        )
