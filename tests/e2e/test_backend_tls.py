"""https backends through real Envoy: a backend whose certificate a private CA signed is
reached with the model's `backend_ca_file`, and refused (503) against the system CAs
without it (real-configs tester: no way to trust a private CA, and nothing said why)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from authz.runtime.procs import http_ok, spawn, stop, wait_until
from tests.e2e.conftest import run_gateway
from tests.helpers import SECRET, free_port
from tests.tls import make_test_ca

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def tls_proxy(cert: Path, key: Path, target_port: int, port: int = 0) -> Iterator[int]:
    """A TLS terminator on `port` (else a free one) in front of 127.0.0.1:`target_port`
    (the sim speaks plain HTTP), on an event loop in a thread of its own."""
    port, loop = port or free_port(), asyncio.new_event_loop()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    writers: set[asyncio.StreamWriter] = set()

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", target_port)
        writers.update((w, uw))
        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    async def shutdown() -> None:
        server.close()
        for w in writers:
            w.close()
        await asyncio.sleep(0.1)  # the transports close

    server = loop.run_until_complete(asyncio.start_server(serve, "127.0.0.1", port, ssl=ctx))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@contextlib.contextmanager
def plain_sim() -> Iterator[int]:
    """`tokenbooth sim` on a free port (plain HTTP: the TLS proxies go in front)."""
    sim_port = free_port()
    sim = spawn([sys.executable, "-m", "authz.cli", "sim", "--listen",
                 f"127.0.0.1:{sim_port}", "--model", "tiny-llama"],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{sim_port}/health"), "sim",
                   alive=[sim])
        yield sim_port
    finally:
        stop([sim])


def test_an_https_backend_signed_by_a_private_ca(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """The certificate names the URL's host alone (not 127.0.0.1, the gateway's own
    address, which clients send as Host): Envoy's auto_sni had checked it against the
    client's Host, so it failed, and a client sending the certificate's name as Host
    made a wrong-named one pass (retest tester)."""
    ca, cert, key = make_test_ca(tmp_path_factory.mktemp("backend-ca"), san="DNS:localhost")
    wrong = tmp_path_factory.mktemp("wrong-name")
    _, wrong_cert, wrong_key = make_test_ca(wrong, san="DNS:wrong.example")
    with plain_sim() as sim_port, tls_proxy(cert, key, sim_port) as port, \
                tls_proxy(wrong_cert, wrong_key, sim_port) as wrong_port:
        backend = [{"url": f"https://localhost:{port}"}]
        models = {"private": {"upstream_model": "tiny-llama", "backends": backend,
                              "backend_ca_file": str(ca)},
                  "system": {"upstream_model": "tiny-llama", "backends": backend},
                  "misnamed": {"upstream_model": "tiny-llama",
                               "backends": [{"url": f"https://localhost:{wrong_port}"}],
                               "backend_ca_file": str(wrong / "ca.crt")}}
        with run_gateway(tmp_path_factory.mktemp("gw-backend-tls"),
                         more_models=models) as gw:
            client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=SECRET,
                                   max_retries=0)

            def ask(model: str, host: str | None = None
                    ) -> openai.types.chat.ChatCompletion:
                return client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}],
                    max_tokens=3, extra_headers={"host": host} if host else None)

            # Health checks over TLS make the cluster healthy; then it serves.
            wait_until(lambda: _answers(ask), "the private-CA backend", timeout=30)
            assert ask("private").usage.completion_tokens == 3  # type: ignore[union-attr]
            assert ask("private", "api.example.com").usage is not None
            for model, host in (("system", None), ("misnamed", None),
                                ("misnamed", "wrong.example")):
                with pytest.raises(openai.APIStatusError) as refused:
                    ask(model, host)  # not the system CAs'; not the URL's name
                assert refused.value.status_code in (502, 503), model


def test_a_ca_file_rotated_in_place_is_read_again(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Reload tester: a `backend_ca_file` in a mounted ConfigMap, rotated by its `..data`
    swap as the backend's certificate changed to another CA's, left the model at 503
    until Envoy restarted (the CA was read once, inline in the cluster). Now it is a
    secret, whose file Envoy watches: no config change is needed."""
    old_ca, old_cert, old_key = make_test_ca(tmp_path_factory.mktemp("ca-old"),
                                             san="DNS:localhost")
    new_ca, new_cert, new_key = make_test_ca(tmp_path_factory.mktemp("ca-new"),
                                             san="DNS:localhost")
    mount = tmp_path_factory.mktemp("configmap")

    def publish(version: str, ca: Path) -> None:
        (mount / version).mkdir()
        (mount / version / "ca.crt").write_bytes(ca.read_bytes())
        (mount / "..data_tmp").symlink_to(version)
        (mount / "..data_tmp").rename(mount / "..data")

    publish("..v1", old_ca)
    (mount / "ca.crt").symlink_to(mount / "..data" / "ca.crt")
    port = free_port()
    with plain_sim() as sim_port:
        models = {"private": {"upstream_model": "tiny-llama",
                              "backends": [{"url": f"https://localhost:{port}"}],
                              "backend_ca_file": str(mount / "ca.crt")}}
        with run_gateway(tmp_path_factory.mktemp("gw-ca-rotation"), more_models=models) as gw:
            client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=SECRET,
                                   max_retries=0)

            def ask(model: str) -> object:
                return client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=3)

            with tls_proxy(old_cert, old_key, sim_port, port):
                wait_until(lambda: _answers(ask), "the backend, old CA", timeout=30)
            with tls_proxy(new_cert, new_key, sim_port, port):
                assert not _answers(ask)  # the new certificate, the old CA in force
                publish("..v2", new_ca)
                wait_until(lambda: _answers(ask), "the backend, rotated CA", timeout=30)


def _answers(ask: object) -> bool:
    try:
        ask("private")  # type: ignore[operator]
    except openai.APIError:
        return False
    return True
