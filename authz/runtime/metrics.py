"""Prometheus metrics (contract §6), in a registry owned by the process, not a global."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "inference_requests", "Admitted inference requests by outcome",
            ("model", "endpoint", "status"), registry=r,
        )
        self.latency = Histogram(
            "inference_latency_seconds", "Request duration as seen by the gateway",
            ("model", "endpoint"), buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.tokens = Counter(
            "tokens_processed", "Tokens metered, by type (input|output)",
            ("model", "type"), registry=r,
        )
        self.decisions = Counter(
            "tokenbooth_decisions", "Admission decisions",
            ("service", "decision", "reason"), registry=r,
        )
        self.decision_seconds = Histogram(
            "tokenbooth_decision_seconds", "Time to answer one Envoy message",
            ("service",), buckets=_DECISION_BUCKETS, registry=r,
        )
        # Money (issue 12): each should stay at zero; the audit explains a non-zero one.
        self.hold_bound_violations = Counter(
            "tokenbooth_hold_bound_violations",
            "Settlements whose real cost passed the admission hold (charged all the same)",
            ("model",), registry=r,
        )
        self.lost_holds = Counter(
            "tokenbooth_lost_holds",
            "Holds whose replica died, settled at the full hold with an estimated record",
            registry=r,
        )
        self.settlements_spooled = Counter(
            "tokenbooth_settlements_spooled",
            "Settlements that could not reach the limit store and were spooled to disk",
            registry=r,
        )
