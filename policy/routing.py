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

from policy.config import Backend, Config

CLUSTER_HEADER = "x-tokenbooth-cluster"
# Envoy adds the endpoint that served the response here (read by ext_proc, then removed).
# ext_proc's dynamic metadata key for the chosen cluster (Envoy copies it into CLUSTER_HEADER).
CLUSTER_KEY = "cluster"
# Endpoint metadata namespace that names each backend's configured URL.
BACKEND_METADATA = "tokenbooth"
# Envoy's response-code details of a 502 whose request never reached a backend (a connect
# failure, after its retries; a full circuit breaker): nothing was generated, nothing is
# charged, and a retry may help (the lifecycle and Envoy's local replies read them).
UNREACHED_DETAILS = ("connection_failure", "overflow")
# How Envoy renders that metadata in the `xds.upstream_host_metadata` attribute (text proto).
_BACKEND_IN_METADATA = re.compile(r'key: "backend" value \{ string_value: "((?:[^"\\]|\\.)*)" \}')
_UNSAFE = re.compile(r"[^a-z0-9]+")


def model_cluster_name(alias: str) -> str:
    """A stable, Envoy-safe cluster name for an alias (a short hash keeps it unique)."""
    digest = hashlib.sha256(alias.encode()).hexdigest()[:8]
    return f"model_{_UNSAFE.sub('_', alias.lower())[:40]}_{digest}"


def backend_from_host_metadata(text: str) -> str:
    """The backend URL from Envoy's text rendering of the serving endpoint's metadata."""
    m = _BACKEND_IN_METADATA.search(text)
    return m.group(1) if m else ""


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
