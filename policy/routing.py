"""Model alias → Envoy cluster: one cluster per alias, its backends as weighted endpoints.

Envoy balances among an alias's backends by their weights (least request),
and its health checks and outlier detection take failing ones out, so a dead
backend never receives a request while another can serve it. tokenbooth only
names the alias's cluster in a request header and asks Envoy to re-route.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from policy.config import Backend, Config, Model

CLUSTER_HEADER = "x-tokenbooth-cluster"
# Envoy adds the endpoint that served the response here (read by ext_proc, then removed).
UPSTREAM_HEADER = "x-tokenbooth-upstream"
_UNSAFE = re.compile(r"[^a-z0-9]+")


def model_cluster_name(alias: str) -> str:
    """A stable, Envoy-safe cluster name for an alias (a short hash keeps it unique)."""
    digest = hashlib.sha256(alias.encode()).hexdigest()[:8]
    return f"model_{_UNSAFE.sub('_', alias.lower())[:40]}_{digest}"


def backend_url_of(upstream_host_name: str, model: Model) -> str:
    """The configured backend URL for the endpoint Envoy reports (`host:port`)."""
    for b in model.backends:
        if authority(b) == upstream_host_name:
            return b.url
    return upstream_host_name


def authority(backend: Backend) -> str:
    """host[:port] as written in the backend's URL: the endpoint's hostname in Envoy."""
    return backend.url.split("://", 1)[1]


@dataclass(frozen=True, slots=True)
class Route:
    alias: str
    upstream_model: str
    cluster: str


class Router:
    """Resolves aliases for one config generation."""

    def __init__(self, cfg: Config) -> None:
        self._routes = {
            alias: Route(alias, m.upstream_model, model_cluster_name(alias))
            for alias, m in cfg.models.items()
        }

    def route(self, alias: str) -> Route | None:
        return self._routes.get(alias)
