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

    def lost(self, rec: UsageRecord) -> None:
        """The record of a hold whose replica died, settled at its full hold."""
        self._m.lost_holds.inc()
        self.record(rec)

    def spooled(self) -> None:
        """A settlement went to the disk spool: the limit store did not answer."""
        self._m.settlements_spooled.inc()

    def record(self, rec: UsageRecord) -> None:
        try:
            self._sink.write(rec)
        except OSError as e:
            # Never lose silently: the log line below still carries every field.
            log.error("usage record not stored: %s", e, extra={"record": rec.to_dict()})
        m = self._m
        m.requests.labels(rec.model, rec.endpoint, str(rec.status)).inc()
        m.latency.labels(rec.model, rec.endpoint).observe(rec.duration_ms / 1000)
        m.tokens.labels(rec.model, "input").inc(rec.prompt_tokens)
        m.tokens.labels(rec.model, "output").inc(rec.completion_tokens)
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
