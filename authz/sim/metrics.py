"""vLLM-named Prometheus metrics of one simulator app (own registry, never the global one)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
)
from prometheus_client.exposition import generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "ModelMetrics", "SimMetrics"]

_M = TypeVar("_M", Gauge, Counter)


class ModelMetrics:
    """Pre-bound label children for one model (no label lookup per request)."""

    __slots__ = ("generation_tokens", "prompt_tokens", "running", "waiting")

    def __init__(self, metrics: SimMetrics, model: str) -> None:
        self.running = metrics.running.labels(model_name=model)
        self.waiting = metrics.waiting.labels(model_name=model)
        self.prompt_tokens = metrics.prompt_tokens.labels(model_name=model)
        self.generation_tokens = metrics.generation_tokens.labels(model_name=model)


class SimMetrics:
    """``vllm:num_requests_running``/``waiting`` gauges and token counters per model.

    prometheus_client appends ``_total`` to counter names, so the counters are declared as
    ``vllm:prompt_tokens`` and exposed as ``vllm:prompt_tokens_total`` (as vLLM does).
    """

    def __init__(self, models: Sequence[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # process_start_time_seconds among them, as vLLM exports it: `audit --vllm` counts
        # only the records of this process's life (replicas tester: a restarted simulator
        # was compared with every record it ever served, and drifted).
        ProcessCollector(registry=self.registry)
        self.running = self._metric(Gauge, "vllm:num_requests_running",
                                    "Number of requests currently running.")
        self.waiting = self._metric(Gauge, "vllm:num_requests_waiting",
                                    "Number of requests waiting to be processed.")
        self.prompt_tokens = self._metric(Counter, "vllm:prompt_tokens",
                                          "Number of prefill tokens processed.")
        self.generation_tokens = self._metric(Counter, "vllm:generation_tokens",
                                              "Number of generation tokens processed.")
        # Creating the children up front also makes every model appear with zero values.
        self.by_model = {model: ModelMetrics(self, model) for model in models}

    def add(self, model: str) -> ModelMetrics:
        """A model served from now on (its series appear with zero values)."""
        self.by_model[model] = ModelMetrics(self, model)
        return self.by_model[model]

    def _metric(self, kind: type[_M], name: str, doc: str) -> _M:
        """A metric labelled by ``model_name`` in this app's registry."""
        return kind(name, doc, ["model_name"], registry=self.registry)

    def render(self) -> bytes:
        """Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
