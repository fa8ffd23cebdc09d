"""µs of CPU per ext_authz Check, cached and uncached, per key store.

Run: `.venv/bin/python -m bench.check_path [--n 20000]`. It starts its own
redis-server on a free port. The Check is driven in-process through the real
servicer with a CheckRequest parsed from bytes (as gRPC hands it over), so
the numbers are the decision's cost without the gRPC plumbing; `grpc` rows
add a real grpc.aio round trip on loopback for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authz.runtime.metrics import Metrics
from authz.runtime.overrides import Overrides
from authz.runtime.server import Services
from authz.runtime.snapshot import Runtime
from authz.services.ext_authz import AuthorizationService
from authz.services.keyauth import KeyAuthority
from authz.state.keys.keyring import KeyringStore
from authz.state.keys.redis_store import RedisKeyStore
from policy.keyrecord import KeyRecord
from policy.keys import fingerprint, new_secret
from tests.helpers import SECRET, write_policy
from tests.redis_server import RedisServer


def check_bytes(secret: str) -> bytes:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path = "POST", "/v1/chat/completions"
    for k, v in {"authorization": f"Bearer {secret}", "x-request-id": "r" * 36,
                 "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}.items():
        http.headers[k] = v
    return bytes(req.SerializeToString())


async def measure(n: int, step: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    for _ in range(min(n // 10, 500)):
        await step()  # warm up
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        await step()
    return ((time.process_time() - c0) / n * 1e6, (time.perf_counter() - w0) / n * 1e6)


async def main(n: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tb-bench-"))
    redis = RedisServer(tmp)
    redis.start()
    rows: list[tuple[str, float, float]] = []
    try:
        path = write_policy(tmp, "http://127.0.0.1:8000",
                            services={"grpc_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0"})
        rt = Runtime.from_file(path, Overrides())
        secret = new_secret()
        rec = KeyRecord(id="bench", org="o", sha256=fingerprint(secret))
        keyring = KeyringStore(tmp / "kr")
        await keyring.start()
        await keyring.create(rec)
        rstore = RedisKeyStore(redis.url)
        await rstore.start()
        await rstore.create(rec)

        def servicer(store: Any) -> AuthorizationService:
            return AuthorizationService(KeyAuthority(rt, store), Metrics())

        cases: list[tuple[str, Any, str, Callable[[], None] | None]] = [
            ("static key (config)", None, SECRET, None),
            ("keyring", keyring, secret, None),
            ("redis, cached", rstore, secret, None),
            ("redis, uncached (1 GET)", rstore, secret, rstore.invalidate),
        ]
        for name, store, key, before in cases:
            svc = servicer(store)
            raw = check_bytes(key)

            async def step(svc: Any = svc, raw: bytes = raw, before: Any = before) -> None:
                if before is not None:
                    before()
                resp = await svc.Check(external_auth_pb2.CheckRequest.FromString(raw), None)
                assert resp.status.code == 0
            rows.append((name, *await measure(n, step)))

        # The same Check over a real grpc.aio socket: the plumbing for comparison.
        services = Services(rt, grace_s=0.5)
        await services.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{services.grpc_port}") as ch:
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            req = external_auth_pb2.CheckRequest.FromString(check_bytes(SECRET))

            async def rpc() -> None:
                await stub.Check(req)
            cpu, wall = await measure(max(n // 5, 1000), rpc)
            rows.append(("static key over grpc.aio (client+server CPU)", cpu, wall))
        await services.stop()
        await keyring.close()
        await rstore.close()
    finally:
        redis.stop()
    print(f"\next_authz Check path, {n} calls each (one process; µs per Check)\n")
    print(f"| {'case':<46} | {'CPU µs':>8} | {'wall µs':>8} |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 10}|")
    for name, cpu, wall in rows:
        print(f"| {name:<46} | {cpu:>8.1f} | {wall:>8.1f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=20000)
    asyncio.run(main(ap.parse_args().n))
