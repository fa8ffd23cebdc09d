"""Model alias → backend: which Envoy cluster serves a request.

Envoy owns balancing *within* a backend (least request, health checks,
outlier detection); tokenbooth picks *which* backend by weight and names its
cluster in a request header, then asks Envoy to re-route.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from policy.config import Backend, Config, Model

CLUSTER_HEADER = "x-tokenbooth-cluster"
_UNSAFE = re.compile(r"[^a-z0-9]+")


def cluster_name(backend: Backend) -> str:
    """A stable Envoy cluster name for a backend URL (shared by every alias that uses it)."""
    scheme = "https" if backend.tls else "http"
    return f"backend_{scheme}_{_UNSAFE.sub('_', backend.host.lower())}_{backend.port}"


def all_backends(cfg: Config) -> list[Backend]:
    """Every distinct backend in the config, in first-seen order (one cluster each)."""
    seen: dict[str, Backend] = {}
    for model in cfg.models.values():
        for b in model.backends:
            seen.setdefault(cluster_name(b), b)
    return list(seen.values())


@dataclass(frozen=True, slots=True)
class Route:
    alias: str
    upstream_model: str
    backend: Backend
    cluster: str


class WeightedPicker:
    """Weighted choice among a model's backends; `rand` returns a float in [0, 1)."""

    __slots__ = ("_backends", "_cum", "_total")

    def __init__(self, backends: Iterable[Backend]) -> None:
        self._backends = list(backends)
        self._cum: list[int] = []
        total = 0
        for b in self._backends:
            total += b.weight
            self._cum.append(total)
        self._total = total

    def pick(self, rand: Callable[[], float]) -> Backend:
        if len(self._backends) == 1:
            return self._backends[0]
        target = rand() * self._total
        for b, edge in zip(self._backends, self._cum, strict=True):
            if target < edge:
                return b
        return self._backends[-1]


class Router:
    """Resolves aliases for one config generation."""

    def __init__(self, cfg: Config, rand: Callable[[], float]) -> None:
        self._models: dict[str, tuple[Model, WeightedPicker]] = {
            alias: (m, WeightedPicker(m.backends)) for alias, m in cfg.models.items()
        }
        self._rand = rand

    def route(self, alias: str) -> Route | None:
        entry = self._models.get(alias)
        if entry is None:
            return None
        model, picker = entry
        backend = picker.pick(self._rand)
        return Route(alias, model.upstream_model, backend, cluster_name(backend))
