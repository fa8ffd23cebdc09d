"""ADS (StreamAggregatedResources) over a real gRPC socket with xds-protos messages:
the initial response, ACK, NACK, stale nonces, pushes on config change, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from authz.envoy_config.xds_resources import CLUSTER_TYPE, build_resources
from authz.services.xds import AggregatedDiscoveryService, add_to_server
from policy.config import Config, parse_config
from policy.routing import model_cluster_name
from tests.grpc_harness import Running
from tests.helpers import policy_dict


class Ads:
    """One ADS stream, as Envoy drives it: requests in, responses collected."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._requests: asyncio.Queue[Any] = asyncio.Queue()
        self.responses: asyncio.Queue[Any] = asyncio.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        self.call = stub.StreamAggregatedResources(self._outgoing())
        self._reader = asyncio.create_task(self._collect())

    async def _outgoing(self) -> AsyncIterator[Any]:
        while (req := await self._requests.get()) is not None:
            yield req

    async def _collect(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for resp in self.call:
                self.responses.put_nowait(resp)

    def send(self, version: str = "", nonce: str = "", error: str | None = None,
             type_url: str = CLUSTER_TYPE, names: tuple[str, ...] = ()) -> None:
        req = discovery_pb2.DiscoveryRequest(
            version_info=version, response_nonce=nonce, type_url=type_url,
            resource_names=names)
        req.node.id = "test-envoy"
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._requests.put_nowait(req)

    async def recv(self, within: float = 5.0) -> Any:
        return await asyncio.wait_for(self.responses.get(), within)

    async def nothing_within(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        assert self.responses.empty(), self.responses.get_nowait()

    async def close(self) -> None:
        self._requests.put_nowait(None)
        self.call.cancel()
        await self._reader


@contextlib.asynccontextmanager
async def ads(channel: grpc.aio.Channel) -> AsyncIterator[Ads]:
    stream = Ads(channel)
    try:
        yield stream
    finally:
        await stream.close()


def cluster_names(resp: Any) -> list[str]:
    out = []
    for res in resp.resources:
        assert res.type_url == CLUSTER_TYPE
        c = cluster_pb2.Cluster()
        assert res.Unpack(c)
        out.append(c.name)
    return out


def config(**models: Any) -> Config:
    d = policy_dict("http://127.0.0.1:8000")
    d["models"] = {**d["models"], **models}  # type: ignore[dict-item]
    return parse_config(d, "test.yaml")


NEW_MODEL = {"upstream_model": "tiny-llama", "max_tokens": 64,
             "backends": [{"url": "http://127.0.0.1:8001", "weight": 2}]}


@contextlib.asynccontextmanager
async def ads_server(cfg: Config) -> AsyncIterator[tuple[AggregatedDiscoveryService,
                                                         grpc.aio.Channel]]:
    """Only the ADS servicer on a free port, for tests that publish directly."""
    svc = AggregatedDiscoveryService(build_resources, cfg)
    server = grpc.aio.server()
    add_to_server(svc, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield svc, channel
    finally:
        svc.close()
        await channel.close()
        await server.stop(1)


# --- through the whole `serve` (tests/grpc_harness.py) ------------------------------


async def test_initial_response_and_ack(running: Running) -> None:
    cfg = running.services.runtime.snapshot.config
    want = build_resources(cfg)[CLUSTER_TYPE]
    async with ads(running.channel) as s:
        s.send()
        first = await s.recv()
        assert first.type_url == CLUSTER_TYPE
        assert first.version_info == want.version
        assert sorted(cluster_names(first)) == sorted(
            model_cluster_name(a) for a in ("demo", "other"))
        assert first.nonce and first.control_plane.identifier == "tokenbooth"
        s.send(version=first.version_info, nonce=first.nonce)  # ACK
        await s.nothing_within(0.3)


async def test_a_config_change_is_pushed_and_a_bad_one_is_not(running: Running) -> None:
    path = running.config_path
    async with ads(running.channel) as s:
        s.send()
        first = await s.recv()
        s.send(version=first.version_info, nonce=first.nonce)
        data = yaml.safe_load(path.read_text())
        data["models"]["added"] = NEW_MODEL
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        pushed = await s.recv(within=3)  # the services re-read the file every second
        assert pushed.version_info != first.version_info
        assert model_cluster_name("added") in cluster_names(pushed)
        s.send(version=pushed.version_info, nonce=pushed.nonce)
        path.write_text("models: [not, a, mapping]\n")
        await s.nothing_within(2.2)  # refused by the services: nothing to push
    assert running.services.runtime.snapshot.aliases == ("added", "demo", "other")


async def test_stop_ends_the_streams_at_once(tmp_path: Path) -> None:
    """ADS streams never end on their own; shutdown must not wait its grace period."""
    from tests.grpc_harness import serve_policy

    async with serve_policy(tmp_path) as r:
        r.services.grace_s = 30
        s = Ads(r.channel)
        s.send()
        await s.recv()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await r.services.stop()
        assert loop.time() - t0 < 5
        await asyncio.wait_for(s._reader, 5)  # the stream ended
        await s.close()


# --- the servicer alone ----------------------------------------------------------------


async def test_nack_is_logged_and_the_accepted_version_stays(
        caplog: pytest.LogCaptureFixture) -> None:
    async with ads_server(config()) as (svc, channel), ads(channel) as s:
        s.send()
        v1 = await s.recv()
        s.send(version=v1.version_info, nonce=v1.nonce)
        await svc.update(config(added=NEW_MODEL))
        v2 = await s.recv()
        caplog.set_level(logging.ERROR, logger="tokenbooth.xds")
        s.send(version=v1.version_info, nonce=v2.nonce, error="cluster: bad field")
        await s.nothing_within(0.3)  # the rejected version is not sent again
        assert svc.acked_versions() == [{CLUSTER_TYPE: v1.version_info}]
        [rec] = [r for r in caplog.records if r.name == "tokenbooth.xds"]
        assert "cluster: bad field" in rec.getMessage()
        assert rec.__dict__["rejected"] == v2.version_info
        assert rec.__dict__["kept"] == v1.version_info
        assert rec.__dict__["node"] == "test-envoy"
        # The next change is sent as usual.
        await svc.update(config(added={**NEW_MODEL, "backends": [{"url": "http://h:1"}]}))
        v3 = await s.recv()
        assert v3.version_info not in (v1.version_info, v2.version_info)


async def test_stale_nonces_are_ignored_and_unchanged_configs_not_pushed() -> None:
    async with ads_server(config()) as (svc, channel), ads(channel) as s:
        s.send()
        v1 = await s.recv()
        assert not await svc.update(config())  # same content, same version: no push
        await svc.update(config(added=NEW_MODEL))
        v2 = await s.recv()
        s.send(version=v1.version_info, nonce=v1.nonce)  # ACK of the replaced response
        s.send(version=v1.version_info, nonce=v1.nonce, error="late")
        await s.nothing_within(0.3)
        assert svc.acked_versions() == [{CLUSTER_TYPE: ""}]
        s.send(version=v2.version_info, nonce=v2.nonce)
        await asyncio.sleep(0.1)
        assert svc.acked_versions() == [{CLUSTER_TYPE: v2.version_info}]


async def test_every_stream_gets_the_push_and_replicas_agree() -> None:
    async with ads_server(config()) as (a, ch_a), ads_server(config()) as (b, ch_b), \
            ads(ch_a) as s1, ads(ch_a) as s2, ads(ch_b) as s3:
        for s in (s1, s2, s3):
            s.send()
        firsts = [await s.recv() for s in (s1, s2, s3)]
        assert len({r.version_info for r in firsts}) == 1
        assert len({tuple(x.SerializeToString() for x in r.resources) for r in firsts}) == 1
        await a.update(config(added=NEW_MODEL))
        await b.update(config(added=NEW_MODEL))
        pushed = [await s.recv() for s in (s1, s2, s3)]
        assert len({r.version_info for r in pushed}) == 1


async def test_named_and_unknown_types() -> None:
    """A named subscription gets only those names; a type not served, none."""
    async with ads_server(config()) as (_, channel), ads(channel) as s:
        s.send(names=(model_cluster_name("demo"),))
        assert cluster_names(await s.recv()) == [model_cluster_name("demo")]
        listeners = "type.googleapis.com/envoy.config.listener.v3.Listener"
        s.send(type_url=listeners)
        empty = await s.recv()
        assert (empty.type_url, list(empty.resources)) == (listeners, [])


async def test_delta_is_unimplemented() -> None:
    async with ads_server(config()) as (_, channel):
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = stub.DeltaAggregatedResources(iter([discovery_pb2.DeltaDiscoveryRequest()]))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in call:
                pass
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_secrets_go_one_per_response_and_each_is_answered_alone(
        caplog: pytest.LogCaptureFixture) -> None:
    """Envoy applies or rejects a response whole: a key it cannot load (a file missing)
    must not keep the other secrets from it. Each secret is a response of its own, and
    an ACK or NACK of any response of the last sending counts; one of an older sending
    is stale."""
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

    from authz.envoy_config.xds_resources import SECRET_TYPE

    def keyed(source: str) -> dict[str, Any]:
        return {**NEW_MODEL, "backends": [{"url": "http://127.0.0.1:8001",
                                           "api_key_file": source}]}

    cfg = config(a=keyed("/run/a.key"), b=keyed("/run/b.key"))
    names = tuple(sorted(build_resources(cfg)[SECRET_TYPE].resources))
    assert len(names) == 2
    async with ads_server(cfg) as (svc, channel), ads(channel) as s:
        s.send(type_url=SECRET_TYPE, names=names)
        first, second = await s.recv(), await s.recv()
        for resp, name in zip((first, second), names, strict=True):
            [res] = resp.resources
            secret = secret_pb2.Secret()
            assert res.Unpack(secret) and secret.name == name
        assert first.nonce != second.nonce
        assert first.version_info == second.version_info
        caplog.set_level(logging.ERROR, logger="tokenbooth.xds")
        s.send(type_url=SECRET_TYPE, names=names, nonce=first.nonce,
               error="Failed to load /run/a.key")
        s.send(type_url=SECRET_TYPE, names=names, nonce=second.nonce,
               version=second.version_info)
        await s.nothing_within(0.3)
        [rec] = [r for r in caplog.records if r.name == "tokenbooth.xds"]
        assert rec.__dict__["resource"] == names[0]
        assert svc.acked_versions() == [{SECRET_TYPE: second.version_info}]
        # Envoy asks for one more secret (a model added): all requested are sent again,
        # and the last sending's nonces replace the older ones.
        await svc.update(config(a=keyed("/run/a.key"), b=keyed("/run/b.key"),
                                c=keyed("/run/c.key")))
        third_names = tuple(sorted(build_resources(
            config(a=keyed("/run/a.key"), b=keyed("/run/b.key"),
                   c=keyed("/run/c.key")))[SECRET_TYPE].resources))
        pushed = [await s.recv() for _ in names]  # the change: what is asked, again
        s.send(type_url=SECRET_TYPE, names=third_names, nonce=pushed[-1].nonce,
               version=pushed[-1].version_info)
        again = [await s.recv() for _ in third_names]
        assert [len(r.resources) for r in again] == [1, 1, 1]
        s.send(type_url=SECRET_TYPE, names=(), nonce=pushed[0].nonce, error="stale")
        await s.nothing_within(0.3)
        assert len([r for r in caplog.records if r.name == "tokenbooth.xds"]) == 1
