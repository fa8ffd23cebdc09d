"""µs of CPU for tokenbooth's own decisions on one JSON request, without gRPC.

Run: `.venv/bin/python -m bench.decision_path [--n 5000] [--profile]`. The services of
`tokenbooth serve` start in this process on `make bench`'s B-memory config (every limit
and a budget configured, embedded durable state, JSONL records); each request is then
driven through the real servicers with messages parsed from bytes, as gRPC hands them
over and as Envoy sends them on the inference path: the Check, the request body (with
ext_authz's metadata), the whole JSON answer (issue 19's lever: one message). So the
figure is B's work over F's, less the plumbing of larger messages. `--profile` prints
cProfile's top functions by own time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from authz.envoy_config.names import EXT_AUTHZ, EXT_PROC
from authz.runtime.overrides import Overrides
from authz.runtime.server import Services
from authz.runtime.snapshot import Runtime
from authz.services.ext_authz import AuthorizationService
from authz.services.keyauth import KeyAuthority
from authz.sim.responses import response
from authz.state.usage.records import USAGE_FILE, read_records
from bench.gateways import ALIAS, SECRET, UPSTREAM_MODEL, write_policy
from bench.run import request_body

HOST_METADATA = ('filter_metadata { key: "tokenbooth" value { fields { key: "backend" '
                 'value { string_value: "http://127.0.0.1:1" } } } }')


class Replay:
    """grpc.aio's ServicerContext as the servicer loop uses it: `read` hands over the
    messages in turn, then EOF; `write` keeps the answers."""

    def __init__(self, msgs: list[bytes]) -> None:
        self._msgs: Iterator[bytes] = iter(msgs)
        self.answers: list[ep.ProcessingResponse] = []

    async def read(self) -> Any:
        raw = next(self._msgs, None)
        return grpc.aio.EOF if raw is None else ep.ProcessingRequest.FromString(raw)

    async def write(self, msg: ep.ProcessingResponse) -> None:
        self.answers.append(msg)


def check_bytes(rid: str) -> bytes:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path = "POST", "/v1/chat/completions"
    for k, v in {"authorization": f"Bearer {SECRET}", "x-request-id": rid,
                 "content-type": "application/json"}.items():
        http.headers[k] = v
    return bytes(req.SerializeToString())


def exchange_bytes(rid: str, principal: Any) -> list[bytes]:
    """The inference path's ext_proc messages for one JSON request."""
    body = ep.ProcessingRequest(request_body=ep.HttpBody(body=request_body("json"),
                                                         end_of_stream=True))
    body.attributes[EXT_PROC].update({"request.path": "/v1/chat/completions",
                                      "request.method": "POST", "request.id": rid})
    body.metadata_context.filter_metadata[EXT_AUTHZ].CopyFrom(principal)
    answer = ep.ProcessingRequest(response_body=ep.HttpBody(
        body=response("chat", UPSTREAM_MODEL, [64], 12, 64), end_of_stream=True))
    answer.attributes[EXT_PROC].update({"response.code": 200,
                                        "xds.upstream_host_metadata": HOST_METADATA})
    return [bytes(body.SerializeToString()), bytes(answer.SerializeToString())]


async def main(n: int, profile: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="tb-decisions-") as tmp:
        await run(Path(tmp), n, profile)


async def run(tmp: Path, n: int, profile: bool) -> None:
    path = write_policy(tmp, "http://127.0.0.1:1")
    text = path.read_text()
    for kind in ("grpc_listen", "http_listen"):  # ports of the process's own choice
        text = text.replace(text.split(f"{kind}: ")[1].split("\n")[0], "127.0.0.1:0", 1)
    path.write_text(text)
    services = Services(Runtime.from_file(path, Overrides()), grace_s=0.5)
    await services.start()
    assert services.store is not None
    authz = AuthorizationService(KeyAuthority(services.runtime, services.store),
                                 services.metrics)
    proc = services._ext_proc  # the running servicer itself
    assert proc is not None

    async def one(i: int) -> None:
        rid = f"{i:08d}-0000-4000-8000-000000000000"
        ok = await authz.Check(external_auth_pb2.CheckRequest.FromString(check_bytes(rid)),
                               None)
        assert ok.status.code == 0, ok
        ctx = Replay(exchange_bytes(rid, ok.dynamic_metadata))
        await proc.Process(None, ctx)  # type: ignore[arg-type]
        last = ctx.answers[-1]
        assert not last.HasField("immediate_response"), last

    warm = min(n // 10, 300)
    for i in range(warm):
        await one(-1 - i)
    prof = cProfile.Profile() if profile else None
    c0, w0 = time.process_time(), time.perf_counter()
    if prof is not None:
        prof.enable()
    for i in range(n):
        await one(i)
    await asyncio.sleep(0)  # the settlements' tasks
    if prof is not None:
        prof.disable()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    await services.stop()
    # Every request ends in one record: the harness measured the whole path.
    recorded = sum(1 for _ in read_records(tmp / "data" / USAGE_FILE))
    if recorded != warm + n:
        raise SystemExit(f"{recorded} records for {warm + n} requests")
    print(f"\ntokenbooth's decisions for one JSON request ({ALIAS}, B-memory config), "
          f"{n} requests: {cpu / n * 1e6:.1f} µs CPU, {wall / n * 1e6:.1f} µs wall "
          f"(the Check + request body + whole answer, no gRPC); {recorded} records")
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(35)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    asyncio.run(main(args.n, args.profile))
