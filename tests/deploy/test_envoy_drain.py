"""The image's preStop hook (deploy/docker/envoy-drain) against the real Envoy: /ready
turns 503, connections are told to close, and it waits for requests in flight."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from policy.config import Config
from tests.deploy.tools import DEPLOY
from tests.envoy_config.test_bootstrap import run_envoy, running_config

HOOK = DEPLOY / "docker" / "envoy-drain"


def drain(cfg: Config, timeout_s: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HOOK), "--admin", cfg.envoy.admin_listen,
         "--timeout", str(timeout_s), "--poll", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def ready_status(cfg: Config) -> int:
    try:
        with urllib.request.urlopen(f"http://{cfg.envoy.admin_listen}/ready", timeout=2) as r:
            status: int = r.status
    except urllib.error.HTTPError as e:
        return e.code
    return status


def connect(cfg: Config) -> socket.socket:
    host, port = cfg.listen.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


@pytest.mark.e2e
def test_drain_waits_for_requests_in_flight(tmp_path: Path) -> None:
    cfg = running_config(None)
    with run_envoy(cfg, tmp_path):
        assert ready_status(cfg) == 200
        # A request in flight: headers sent, the body still to come (the buffer filter
        # holds it, so it stays active until the client gives up).
        inflight = connect(cfg)
        inflight.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\n"
                         b"content-type: application/json\r\ncontent-length: 100\r\n\r\n")
        time.sleep(0.3)
        hook = drain(cfg, timeout_s=30)
        try:
            time.sleep(1.0)
            assert hook.poll() is None, hook.communicate()
            assert ready_status(cfg) == 503  # readiness fails: no new traffic is sent here
            # A keep-alive client is told to go elsewhere.
            with connect(cfg) as late:
                late.sendall(b"GET /v1/models HTTP/1.1\r\nhost: t\r\n\r\n")
                head = late.recv(65536).split(b"\r\n\r\n")[0].lower()
            assert b"connection: close" in head
            inflight.close()
            hook.communicate(timeout=5)
            assert hook.returncode == 0
        finally:
            inflight.close()
            if hook.returncode is None:
                hook.kill()
                hook.communicate()


@pytest.mark.e2e
def test_drain_gives_up_at_its_timeout(tmp_path: Path) -> None:
    cfg = running_config(None)
    with run_envoy(cfg, tmp_path), connect(cfg) as inflight:
        inflight.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: t\r\n"
                         b"content-length: 100\r\n\r\n")
        time.sleep(0.3)
        started = time.monotonic()
        _, err = drain(cfg, timeout_s=1).communicate(timeout=10)
        assert time.monotonic() - started < 5
    assert "1 request(s) still in flight" in err


def test_drain_without_envoy_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, str(HOOK), "--admin", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 1
    assert "unreachable" in r.stderr
