"""vLLM-named Prometheus metrics of one simulator app (own registry, never the global one)."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "ModelMetrics", "SimMetrics"]


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
        labels = ["model_name"]
        self.running = Gauge(
            "vllm:num_requests_running",
            "Number of requests currently running.",
            labels,
            registry=self.registry,
        )
        self.waiting = Gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            labels,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            labels,
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            labels,
            registry=self.registry,
        )
        # Creating the children up front also makes every model appear with zero values.
        self.by_model = {model: ModelMetrics(self, model) for model in models}

    def render(self) -> bytes:
        """Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
