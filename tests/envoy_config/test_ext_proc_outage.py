"""ext_proc fails open in Envoy's configuration, yet nothing reaches a backend without it.

Real Envoy, a real backend that counts what it receives, and a gRPC server that allows
every request at ext_authz but does not serve ext_proc at all (UNIMPLEMENTED). Then the
real services, SIGKILLed with a stream in flight: `envoy.on_metering_loss` decides
whether Envoy serves the rest of it unmetered or cuts it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from authz.runtime.procs import http_ok, spawn, stop, wait_until
from authz.services import protos
from policy.config import Config, load_config
from policy.routing import CLUSTER_HEADER, model_cluster_name
from tests.envoy_config.test_bootstrap import run_envoy
from tests.helpers import PORTS, SECRET, write_policy

pytestmark = pytest.mark.e2e


class _Backend(BaseHTTPRequestHandler):
    posts: list[str] = []

    def do_GET(self) -> None:  # Envoy's health checks
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        type(self).posts.append(self.path)
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


class _AllowAll(protos.AuthorizationServicer):  # type: ignore[misc]
    def Check(self, request: Any, context: Any) -> Any:
        resp = protos.CheckResponse(status=protos.OK_STATUS)
        resp.dynamic_metadata.update({"key_id": "k-main", "org": "acme", "models": []})
        return resp


@pytest.fixture
def no_ext_proc(tmp_path: Path) -> Iterator[Config]:
    backend = ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    protos.add_AuthorizationServicer_to_server(_AllowAll(), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ports = PORTS
    path = write_policy(
        tmp_path, f"http://127.0.0.1:{backend.server_address[1]}",
        listen=f"127.0.0.1:{ports.free_port()}",
        services={"grpc_listen": f"127.0.0.1:{grpc_port}",
                  "http_listen": f"127.0.0.1:{ports.free_port()}"},
        envoy={"admin_listen": f"127.0.0.1:{ports.free_port()}", "decision_timeout_ms": 2000},
    )
    try:
        yield load_config(path)
    finally:
        server.stop(0)
        backend.shutdown()
        backend.server_close()


def _call(cfg: Config, method: str, path: str, body: bytes | None,
          **headers: str) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://{cfg.listen}{path}", data=body, method=method,
                                 headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        assert e.headers["content-type"] == "application/json"
        return e.code, json.loads(e.read())


def test_without_ext_proc_no_request_reaches_the_backend(no_ext_proc: Config,
                                                         tmp_path: Path) -> None:
    cfg = no_ext_proc
    _Backend.posts.clear()
    chat = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}]})
    with run_envoy(cfg, tmp_path):
        down = _call(cfg, "POST", "/v1/chat/completions", chat.encode())
        models = _call(cfg, "GET", "/v1/models", None)
        empty = _call(cfg, "POST", "/v1/chat/completions", b"")
        # This ext_authz strips nothing: a client naming the cluster itself still fails,
        # because the inference route matches only once ext_proc has named it.
        spoofed = _call(cfg, "POST", "/v1/chat/completions", chat.encode(),
                        **{CLUSTER_HEADER: model_cluster_name("demo")})
    for status, body in (down, models, spoofed):
        assert (status, body["error"]["code"]) == (503, "service_unavailable"), body
    # Without a body ext_proc is not asked at all: that is the client's error.
    assert (empty[0], empty[1]["error"]["code"]) == (400, "invalid_request")
    assert "request body" in empty[1]["error"]["message"]
    assert _Backend.posts == []


@pytest.fixture
def services_and_sim(tmp_path: Path, request: pytest.FixtureRequest
                     ) -> Iterator[tuple[Config, subprocess.Popen[bytes]]]:
    """`tokenbooth sim` and `tokenbooth serve` (its process, to kill) on free ports, with
    `envoy.on_metering_loss` set to the test's parameter."""
    ports = PORTS
    sim = f"127.0.0.1:{ports.free_port()}"
    path = write_policy(
        tmp_path, f"http://{sim}", listen=f"127.0.0.1:{ports.free_port()}",
        services={"grpc_listen": f"127.0.0.1:{ports.free_port()}",
                  "http_listen": f"127.0.0.1:{ports.free_port()}"},
        envoy={"admin_listen": f"127.0.0.1:{ports.free_port()}",
               "on_metering_loss": request.param},
    )
    cfg = load_config(path)
    py = [sys.executable, "-m", "authz.cli"]
    with (tmp_path / "procs.log").open("wb") as log:
        procs = [spawn([*py, "sim", "--listen", sim], stdout=log, stderr=log),
                 spawn([*py, "serve", "--config", str(path)], stdout=log, stderr=log)]
    try:
        wait_until(lambda: http_ok(f"http://{sim}/health"), "sim", alive=procs)
        wait_until(lambda: http_ok(f"http://{cfg.services.http_listen}/readyz"), "serve",
                   alive=procs)
        yield cfg, procs[1]
    finally:
        stop(procs)


def _open_stream(conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
    """A chat stream of 40 tokens, 50 ms apart (the simulator's per-request hook)."""
    body = {"model": "demo", "stream": True, "max_tokens": 40,
            "messages": [{"role": "user", "content": "hi"}]}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), headers={
        "authorization": f"Bearer {SECRET}", "content-type": "application/json",
        "x-sim-tpot-ms": "50"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    return resp


def _read_rest(resp: http.client.HTTPResponse) -> tuple[bytes, bool]:
    """What is left of the response, and whether it ended cleanly (not cut)."""
    out = b""
    try:
        while chunk := resp.read1(65536):
            out += chunk
    except (http.client.IncompleteRead, ConnectionError):
        return out, False
    return out, True


@pytest.mark.parametrize("services_and_sim", ["serve", "cut"], indirect=True)
def test_a_stream_in_flight_when_the_metering_dies(
        services_and_sim: tuple[Config, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    cfg, serve = services_and_sim
    with run_envoy(cfg, tmp_path):
        chat = json.dumps({"model": "demo", "max_tokens": 1,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        wait_until(lambda: _call(cfg, "POST", "/v1/chat/completions", chat,
                                 authorization=f"Bearer {SECRET}")[0] == 200, "the backend")
        host, port = cfg.listen.split(":")
        with contextlib.closing(http.client.HTTPConnection(host, int(port), timeout=30)) as c:
            resp = _open_stream(c)
            assert resp.read1(65536).startswith(b"data: ")
            serve.kill()
            serve.wait()
            rest, clean = _read_rest(resp)
        # With the services gone a new request gets Envoy's 503. Under `cut` its body is
        # cut too: the error reply passes through ext_proc, which can no longer answer.
        after = _status_and_body(cfg)
    if cfg.envoy.on_metering_loss == "serve":
        assert clean and rest.rstrip().endswith(b"data: [DONE]"), rest
        status, body = after
        assert status == 503 and body is not None
        assert json.loads(body)["error"]["code"] == "service_unavailable"
    else:
        assert not clean and b"[DONE]" not in rest, rest
        assert after == (503, None)


def _status_and_body(cfg: Config) -> tuple[int, bytes | None]:
    """A chat request's status and body (None: the body was cut)."""
    host, port = cfg.listen.split(":")
    with contextlib.closing(http.client.HTTPConnection(host, int(port), timeout=10)) as c:
        c.request("POST", "/v1/chat/completions", b'{"model": "demo"}', headers={
            "authorization": f"Bearer {SECRET}", "content-type": "application/json"})
        resp = c.getresponse()
        try:
            return resp.status, resp.read()
        except (http.client.IncompleteRead, ConnectionError):
            return resp.status, None
