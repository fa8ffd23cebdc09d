"""What `tokenbooth serve` hands Envoy over ADS: one cluster per model alias (CDS), and
the secrets of backends with an API key and the CAs of https backends (SDS), each naming
where Envoy reads the key or the CAs (its environment, a file), never the key.

Each cluster carries its endpoints inline (`load_assignment`), as the static bootstrap
did, rather than over EDS: backends may be DNS names (STRICT_DNS clusters resolve them
in Envoy), which EDS cannot carry, and one resource type means one version and one
ACK per change. Envoy compares each cluster's content, so an update re-creates only
the clusters that changed; their connections drain, requests in flight finish.

The clusters are the typed envoy-data-plane messages of `clusters.py`, serialized once
per config change into the official `google.protobuf.Any` for the wire. Versions are a
hash of those bytes: replicas with the same config serve the same versions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import Secret
from google.protobuf import any_pb2

from authz.envoy_config.bootstrap import proto_name
from authz.envoy_config.clusters import ca_secret, credential_secret, model_cluster
from authz.envoy_config.common import pack
from policy.config import Config

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105
_VERSION_CHARS = 16


@dataclass(frozen=True, slots=True)
class TypedResources:
    """One resource type as sent: name → packed resource (sorted by name), and a version
    derived from their bytes."""

    type_url: str
    version: str
    resources: Mapping[str, Any]  # name → google.protobuf.Any (official)


def model_clusters(cfg: Config, static_secrets: bool = False) -> list[Cluster]:
    """The typed clusters, one per alias, sorted by alias."""
    return [model_cluster(alias, m, static_secrets, cfg.whole_answer_limit)
            for alias, m in sorted(cfg.models.items())]


def backend_secrets(cfg: Config) -> list[Secret]:
    """One secret per distinct key source of the backends, and one per CA file https
    backends are checked against, sorted by name."""
    found = {s.name: s for m in cfg.models.values() for b in m.backends
             if (s := credential_secret(b)) is not None}
    found.update((s.name, s) for m in cfg.models.values()
                 if any(b.tls for b in m.backends) and (s := ca_secret(m.backend_ca_file)))
    return [found[n] for n in sorted(found)]


def resource_set(type_url: str, named: Mapping[str, bytes]) -> TypedResources:
    """Packs serialized resources; the version hashes the type, names and bytes."""
    digest = hashlib.sha256(type_url.encode())
    packed: dict[str, Any] = {}
    for name in sorted(named):
        value = named[name]
        digest.update(b"\0%d:%s\0" % (len(name), name.encode()))
        digest.update(b"%d:" % len(value) + value)
        packed[name] = any_pb2.Any(type_url=type_url, value=value)
    return TypedResources(type_url, digest.hexdigest()[:_VERSION_CHARS], packed)


def build_resources(cfg: Config) -> dict[str, TypedResources]:
    """Every resource type tokenbooth serves over ADS, by type URL (CPU-bound: ~4 ms per
    cluster, so callers on an event loop run it in a thread)."""
    clusters = {c.name: pack(c).value for c in model_clusters(cfg)}
    secrets = {s.name: pack(s).value for s in backend_secrets(cfg)}
    return {CLUSTER_TYPE: resource_set(CLUSTER_TYPE, clusters),
            SECRET_TYPE: resource_set(SECRET_TYPE, secrets)}


def model_cluster_dicts(cfg: Config) -> list[dict[str, Any]]:
    """The clusters in the bootstrap's proto-JSON form, their secrets static."""
    return [c.to_dict(casing=proto_name) for c in model_clusters(cfg, static_secrets=True)]


def with_static_models(bootstrap: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """A rendered bootstrap (`bootstrap.render_dict`) with the model clusters made static
    and no ADS: for an Envoy run without tokenbooth's services (benchmarks, checks)."""
    out = {k: v for k, v in bootstrap.items() if k != "dynamic_resources"}
    static = out["static_resources"]
    secrets = [s.to_dict(casing=proto_name) for s in backend_secrets(cfg)]
    out["static_resources"] = {**static,
                               "clusters": [*static["clusters"], *model_cluster_dicts(cfg)],
                               **({"secrets": secrets} if secrets else {})}
    return out
