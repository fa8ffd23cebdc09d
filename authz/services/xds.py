"""Envoy's aggregated discovery service (ADS, state of the world): the model clusters.

Per stream and resource type, the servicer tracks what it last sent (version, nonces)
and what Envoy last accepted. A request that answers a nonce of the last sending is an
ACK, or a NACK when it carries `error_detail`: the NACK is logged, Envoy keeps the version
it accepted before, and nothing is re-sent until the config changes. A request with an
older nonce is stale and ignored. A config change pushes to every stream whose version
differs. Versions come from the resources' content, so every replica serving the same
config serves the same versions, and Envoy may reconnect to any of them.

Listeners and clusters go whole in one response, as the protocol requires. Every other
type (here the backend-key secrets) goes one resource per response, as the protocol
allows: Envoy applies or rejects each response as a whole, so one secret it cannot load
(a key file missing) must not keep it from the others (a model added beside it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from authz.services.protos import Msg
from policy.config import Config

log = logging.getLogger("tokenbooth.xds")

SERVICE_NAME = "envoy.service.discovery.v3.AggregatedDiscoveryService"
_CONTROL_PLANE = base_pb2.ControlPlane(identifier="tokenbooth")
# The types whose every response must hold the whole state of the world.
WHOLE_TYPES = frozenset({"type.googleapis.com/envoy.config.listener.v3.Listener",
                         "type.googleapis.com/envoy.config.cluster.v3.Cluster"})


class ResourceSet(Protocol):
    """One resource type as sent (see `envoy_config.xds_resources.TypedResources`)."""

    @property
    def type_url(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def resources(self) -> Mapping[str, Msg]: ...  # name → google.protobuf.Any


Resources = Mapping[str, ResourceSet]  # by type URL
Build = Callable[[Config], Resources]


@dataclass(frozen=True, slots=True)
class _Empty:
    type_url: str
    version: str = "none"
    resources: Mapping[str, Msg] = field(default_factory=dict)


@dataclass(slots=True)
class _Watch:
    """One resource type on one stream."""

    names: frozenset[str]  # empty: every resource of the type (wildcard)
    sent: str = ""  # version last sent
    # The nonces of the last sending, each with the resource it carried ("": all of them).
    nonces: dict[str, str] = field(default_factory=dict)
    acked: str = ""  # version Envoy last accepted


class StreamState:
    """The xDS protocol for one stream, without I/O: requests and config changes in,
    the responses to write out."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.node = ""
        self.watches: dict[str, _Watch] = {}
        self._nonces = itertools.count(1)

    def on_request(self, req: Msg, current: Resources) -> list[Msg]:
        if req.HasField("node") and req.node.id:
            self.node = req.node.id
        names = frozenset(n for n in req.resource_names if n != "*")
        watch = self.watches.get(req.type_url)
        if watch is None:  # the first request for this type on this stream
            watch = self.watches[req.type_url] = _Watch(names, acked=req.version_info)
            return self._responses(req.type_url, watch, current)
        if req.response_nonce not in watch.nonces:
            return []  # stale: answers a response that a newer sending replaced
        watch.acked = req.version_info
        if req.HasField("error_detail"):
            resource = watch.nonces[req.response_nonce]
            # Envoy takes the clusters it can and refuses the others, which keep their
            # last accepted form (or stay absent): not all or nothing (t1 tester).
            log.error("xds: Envoy rejected the config%s: %s (it applies the clusters it "
                      "accepted; those it refused keep their last accepted version, or "
                      "none)", f" ({resource})" if resource else "",
                      req.error_detail.message,
                      extra={"node": self.node, "peer": self.peer, "type_url": req.type_url,
                             "rejected": watch.sent, "kept": watch.acked,
                             "resource": resource})
        else:
            log.debug("xds: ACK", extra={"node": self.node, "type_url": req.type_url,
                                         "version": watch.acked})
        if names != watch.names:  # Envoy wants other resources now
            watch.names = names
            return self._responses(req.type_url, watch, current)
        return []

    def on_change(self, current: Resources) -> list[Msg]:
        return [r for t, w in self.watches.items() if _of(current, t).version != w.sent
                for r in self._responses(t, w, current)]

    def _responses(self, type_url: str, watch: _Watch, current: Resources) -> list[Msg]:
        """The resources `watch` asks for: in one response for a whole-state type, else
        one response each (one empty response when there are none)."""
        rs = _of(current, type_url)
        chosen = {n: a for n, a in rs.resources.items() if not watch.names or n in watch.names}
        log.info("xds: sending version %s (%d resources)", rs.version, len(chosen),
                 extra={"node": self.node, "peer": self.peer, "type_url": type_url})
        groups = ([("", list(chosen.values()))] if type_url in WHOLE_TYPES or not chosen
                  else [(n, [a]) for n, a in chosen.items()])
        watch.sent, watch.nonces = rs.version, {}
        out = []
        for name, resources in groups:
            nonce = str(next(self._nonces))
            watch.nonces[nonce] = name
            out.append(discovery_pb2.DiscoveryResponse(
                version_info=rs.version, resources=resources, type_url=type_url,
                nonce=nonce, control_plane=_CONTROL_PLANE))
        return out


def _of(current: Resources, type_url: str) -> ResourceSet:
    """A type this server does not serve is answered with no resources."""
    return current.get(type_url) or _Empty(type_url)


_CHANGED = object()  # an inbox event: the resources changed
_END = object()  # an inbox event: end the stream


class AggregatedDiscoveryService(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Serves the resources `build` makes from the config; `update` on every reload."""

    def __init__(self, build: Build, cfg: Config) -> None:
        self._build = build
        self._resources = self._timed_build(cfg)
        self._inboxes: set[asyncio.Queue[object]] = set()
        self._streams: set[StreamState] = set()
        self._closed = False

    @property
    def resources(self) -> Resources:
        return self._resources

    def acked_versions(self) -> list[dict[str, str]]:
        """Per open stream: type URL → the version Envoy last accepted."""
        return [{t: w.acked for t, w in s.watches.items()} for s in self._streams]

    async def update(self, cfg: Config) -> bool:
        """Rebuild (in a worker thread: it is CPU-bound) and push what changed. A config
        the builder refuses keeps the last resources."""
        try:
            resources = await asyncio.to_thread(self._timed_build, cfg)
        except Exception:
            log.exception("xds: cannot build resources; Envoy keeps the last ones")
            return False
        return self.publish(resources)

    def publish(self, resources: Resources) -> bool:
        """Swap in `resources`; push to every stream when a version changed."""
        if _versions(resources) == _versions(self._resources):
            return False
        self._resources = resources
        for inbox in self._inboxes:
            inbox.put_nowait(_CHANGED)
        return True

    def close(self) -> None:
        """End every stream (Envoy re-opens it on another replica); refuse new ones."""
        self._closed = True
        for inbox in self._inboxes:
            inbox.put_nowait(_END)

    def _timed_build(self, cfg: Config) -> Resources:
        t0 = time.perf_counter()
        resources = self._build(cfg)
        log.info("xds: resources built in %.1f ms", (time.perf_counter() - t0) * 1e3,
                 extra={"versions": _versions(resources),
                        "resources": sum(len(r.resources) for r in resources.values())})
        return resources

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[Msg], context: grpc.aio.ServicerContext,
    ) -> None:
        if self._closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")
        inbox: asyncio.Queue[object] = asyncio.Queue()
        state = StreamState(context.peer())
        reader = asyncio.create_task(_read(request_iterator, inbox))
        self._inboxes.add(inbox)
        self._streams.add(state)
        try:
            while (event := await inbox.get()) is not _END:
                out = (state.on_change(self._resources) if event is _CHANGED
                       else state.on_request(event, self._resources))
                for response in out:
                    await context.write(response)
        finally:
            self._inboxes.discard(inbox)
            self._streams.discard(state)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            log.info("xds: stream closed", extra={"node": state.node, "peer": state.peer})

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[Msg], context: grpc.aio.ServicerContext,
    ) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "tokenbooth serves state-of-the-world ADS only")


async def _read(requests: AsyncIterator[Msg], inbox: asyncio.Queue[object]) -> None:
    """Requests into the inbox, then the end (also when the stream broke)."""
    try:
        async for req in requests:
            inbox.put_nowait(req)
    finally:
        inbox.put_nowait(_END)


def _versions(resources: Resources) -> dict[str, str]:
    return {t: r.version for t, r in resources.items()}


def add_to_server(service: AggregatedDiscoveryService, server: grpc.aio.Server) -> None:
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(service, server)
