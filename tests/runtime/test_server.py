"""The process around the servicers: side port, readiness, reload, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.envoy_config.names import EXT_AUTHZ
from authz.runtime import snapshot
from authz.runtime.admin import IDLE_S
from authz.runtime.procs import http_ok, wait_until
from policy.keys import fingerprint
from tests.grpc_harness import Running, serve_policy
from tests.helpers import PORTS, SECRET, free_port, write_policy
from tests.redis_server import RedisServer
from tests.services.test_ext_authz import check, denial


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def test_side_port_health_ready_and_metrics(running: Running) -> None:
    base = f"http://127.0.0.1:{running.services.http_port}"
    assert (await asyncio.to_thread(get, f"{base}/healthz"))[0] == 200
    assert (await asyncio.to_thread(get, f"{base}/readyz"))[0] == 200
    await check(running, "GET", "/v1/models", authorization="Bearer sk-tb-unknown")
    status, text = await asyncio.to_thread(get, f"{base}/metrics")
    assert status == 200
    assert ('tokenbooth_decisions_total{decision="deny",reason="invalid_api_key",'
            'service="ext_authz"} 1.0') in text
    assert "tokenbooth_decision_seconds_bucket" in text


async def test_side_port_closes_a_connection_that_never_finishes_its_request(
        running: Running) -> None:
    """Security tester: a connection that sent half its headers stayed open for good (an
    hour, aiohttp's default); thousands of them used up serve's open files, and /readyz
    (the pods' probe), /metrics and new gRPC connections went unanswered."""
    def silent() -> bytes:
        with socket.create_connection(("127.0.0.1", running.services.http_port)) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            s.settimeout(IDLE_S + 20)  # a deadlock breaker, not a timing
            return s.recv(1024)

    assert await asyncio.to_thread(silent) == b""  # closed by the server


async def test_side_port_ignores_a_body_that_claims_a_coding(
        running: Running, caplog: pytest.LogCaptureFixture) -> None:
    """/metrics and /healthz read no body: one that says gzip and is not was decoded all
    the same, and each such request (no key needed) logged aiohttp's traceback."""
    base = f"http://127.0.0.1:{running.services.http_port}"

    def bad_gzip(path: str) -> int:
        req = urllib.request.Request(f"{base}{path}", data=b"not gzip" * 100, method="GET",
                                     headers={"content-encoding": "gzip"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status)

    for path in ("/metrics", "/healthz", "/readyz"):
        assert await asyncio.to_thread(bad_gzip, path) == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_config_reload_applies_good_files_and_refuses_bad_ones(running: Running) -> None:
    new_secret = "sk-tb-test-new-key-0123456789abcdefghijklmnopqrstu"
    path = running.config_path
    data = yaml.safe_load(path.read_text())
    data["keys"].append({"id": "k-new", "org": "acme", "sha256": fingerprint(new_secret)})
    path.write_text(yaml.safe_dump(data))
    deadline = time.monotonic() + 3
    while True:  # the contract: usable within 2 seconds
        resp = await check(running, "GET", "/v1/models", authorization=f"Bearer {new_secret}")
        if resp.status.code == 0:  # type: ignore[attr-defined]
            break
        assert time.monotonic() < deadline, "the new key never became valid"
        await asyncio.sleep(0.1)
    path.write_text("models: [broken\n")
    await asyncio.sleep(1.5)
    # The last good config stays in force.
    resp = await check(running, "GET", "/v1/models", authorization=f"Bearer {new_secret}")
    assert resp.status.code == 0  # type: ignore[attr-defined]
    data["keys"] = [k for k in data["keys"] if k["id"] != "k-new"]
    path.write_text(yaml.safe_dump(data))
    deadline = time.monotonic() + 3
    while True:
        resp = await check(running, "GET", "/v1/models", authorization=f"Bearer {new_secret}")
        if resp.status.code != 0:  # type: ignore[attr-defined]
            break
        assert time.monotonic() < deadline, "the removed key stayed valid"
        await asyncio.sleep(0.1)
    assert denial(resp)[0] == 401
    resp = await check(running, "GET", "/v1/models", authorization=f"Bearer {SECRET}")
    assert resp.status.code == 0  # type: ignore[attr-defined]


async def test_a_config_key_shadowing_a_stored_key_is_said_at_the_reload(
        running: Running, caplog: pytest.LogCaptureFixture) -> None:
    """A key added to the config with a stored key's id: the stored key is refused at
    every use, and the reload said only "config reloaded". Now one error line, then."""
    from authz.state.keys.base import KeyAdmin
    from policy.keyrecord import KeyRecord

    store = running.services.store
    assert isinstance(store, KeyAdmin)
    await store.create(KeyRecord(id="key_shared", org="beta", sha256="1" * 64))
    caplog.set_level(logging.ERROR, "tokenbooth.server")
    path = running.config_path
    data = yaml.safe_load(path.read_text())
    data["keys"].append({"id": "key_shared", "org": "acme", "sha256": "2" * 64})
    path.write_text(yaml.safe_dump(data))
    deadline = time.monotonic() + 5
    while "also a stored key's id" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        await asyncio.sleep(0.1)
    [line] = [r.getMessage() for r in caplog.records if "stored key's id" in r.getMessage()]
    assert "'key_shared'" in line and "'beta'" in line


def test_serve_process_is_ready_then_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    ports = PORTS
    http = f"127.0.0.1:{ports.free_port()}"
    path = write_policy(tmp_path, "http://127.0.0.1:8000",
                        services={"grpc_listen": f"127.0.0.1:{ports.free_port()}",
                                  "http_listen": http})
    proc = subprocess.Popen([sys.executable, "-m", "authz.cli", "serve", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: http_ok(f"http://{http}/readyz"), "serve", alive=[proc])
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "tokenbooth services stopped" in err
    assert "Traceback" not in err
    # Every log line is one JSON object.
    import json

    for line in err.strip().splitlines():
        json.loads(line)


@pytest.mark.parametrize("setting", ["services.grpc_listen", "services.http_listen",
                                     "admin.listen"])
def test_serve_refuses_a_busy_port_in_one_line_naming_the_setting(
    tmp_path: Path, setting: str,
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = f"127.0.0.1:{s.getsockname()[1]}"
        listens = {"services.grpc_listen": f"127.0.0.1:{free_port()}",
                   "services.http_listen": f"127.0.0.1:{free_port()}",
                   "admin.listen": f"127.0.0.1:{free_port()}", setting: busy}
        path = write_policy(
            tmp_path, "http://127.0.0.1:8000",
            services={"grpc_listen": listens["services.grpc_listen"],
                      "http_listen": listens["services.http_listen"]},
            admin={"listen": listens["admin.listen"],
                   "tokens": [{"name": "ops", "sha256": fingerprint("admin-token")}]})
        r = subprocess.run([sys.executable, "-m", "authz.cli", "serve", "--config", str(path)],
                           capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    # The admin API's port has no flag (`--admin-listen` is Envoy's admin port: ops
    # tester, the hint named it and following it changed nothing).
    # Each says every setting that may have put it there (operators tester: the
    # variable's was not named).
    where = {"services.grpc_listen": "services.grpc_listen, --grpc-listen, "
                                     "TOKENBOOTH_GRPC_LISTEN",
             "services.http_listen": "services.http_listen, --http-listen, "
                                     "TOKENBOOTH_HTTP_LISTEN",
             "admin.listen": "admin.listen"}[setting]
    assert r.stderr.strip().splitlines()[-1] == (
        f"tokenbooth: error: {busy} ({where}) is already in use")
    # gRPC's own error line (add_port.cc) is not printed: the port is checked first.
    assert "add_port" not in r.stderr


@pytest.mark.parametrize("token", [SECRET, "sk-tb-not-a-key-of-the-config-00000000"])
def test_serve_refuses_an_api_keys_secret_as_its_admin_token(tmp_path: Path,
                                                             token: str) -> None:
    """$TOKENBOOTH_ADMIN_TOKEN set to a client's key made that key an admin (admin
    review): refused at start, in one line, the token unshown."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000",
                        services={"grpc_listen": f"127.0.0.1:{free_port()}",
                                  "http_listen": f"127.0.0.1:{free_port()}"},
                        admin={"listen": f"127.0.0.1:{free_port()}"})
    r = subprocess.run([sys.executable, "-m", "authz.cli", "serve", "--config", str(path)],
                       capture_output=True, text=True, timeout=30,
                       env={"PATH": "/usr/bin:/bin", "TOKENBOOTH_ADMIN_TOKEN": token})
    assert r.returncode != 0 and "Traceback" not in r.stderr and token not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "tokenbooth: error: $TOKENBOOTH_ADMIN_TOKEN is an API key's secret: an admin "
        "token must be a secret of its own")


async def test_a_look_at_the_config_that_blocks_holds_up_reloads_not_decisions(
        running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reload's look at the file (a stat, every second) runs in a thread of its own,
    as its read does: on a stalled network mount a stat blocks, and on the event loop it
    held every decision (Envoy answers 503 after its decision timeout). The stall is
    played by the stat itself waiting, until a timer ends it after 3 s."""
    stalled, looking, real = threading.Event(), threading.Event(), snapshot._stamp

    def stat(path: Path) -> tuple[int, ...]:
        looking.set()
        stalled.wait(30)
        return real(path)

    monkeypatch.setattr(snapshot, "_stamp", stat)
    timer = threading.Timer(3.0, stalled.set)
    timer.start()
    try:
        assert await asyncio.to_thread(looking.wait, 5), "no look at the config"
        resp = await check(running, "GET", "/v1/models", authorization=f"Bearer {SECRET}")
        assert resp.status.code == 0 and not stalled.is_set()  # type: ignore[attr-defined]
    finally:
        timer.cancel()
        stalled.set()
    # Reloads go on once the file system answers.
    data = yaml.safe_load(running.config_path.read_text())
    data["keys"] = [k for k in data["keys"] if k["id"] != "k-main"]
    running.config_path.write_text(yaml.safe_dump(data))
    await asyncio.to_thread(wait_until, lambda: running.services.runtime.snapshot
                            .keys_by_fingerprint.get(fingerprint(SECRET)) is None,
                            "the reload after the stall")


async def test_an_outage_policy_changed_by_a_reload_applies_at_once(
        tmp_path: Path, own_redis: RedisServer) -> None:
    """`limits.on_store_error` is read where admission needs it: an operator who turns a
    limit to fail_open during a Redis outage gets it at the next request (it was read once
    at start: the reload changed nothing and said nothing)."""
    from tests.services.test_ext_proc import CHAT, Stream, immediate, req_body

    def request(rid: str) -> Any:
        msg = req_body(json.dumps(CHAT).encode(), rid=rid)
        msg.metadata_context.filter_metadata[EXT_AUTHZ].update({"rpm": "5"})
        return msg

    async with serve_policy(tmp_path, state=own_redis.url) as running:
        own_redis.stop()
        status, body = immediate(await Stream(running).send(request("r-closed")))
        assert (status, body["error"]["code"]) == (503, "service_unavailable")
        data = yaml.safe_load(running.config_path.read_text())
        data["limits"] = {"on_store_error": {"requests": "fail_open"}}
        running.config_path.write_text(yaml.safe_dump(data))
        rt = running.services.runtime
        deadline = time.monotonic() + 5
        while rt.snapshot.config.limits.on_store_error.requests != "fail_open":
            assert time.monotonic() < deadline, "the reload never came"
            await asyncio.sleep(0.1)
        answer = await Stream(running).send(request("r-open"))
        assert answer.HasField("request_body"), answer  # admitted under the local limiter
