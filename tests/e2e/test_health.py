"""`GET /health` through the real Envoy: 200 with no key, answered by Envoy itself."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest

from tests.e2e.conftest import Gateway

pytestmark = pytest.mark.e2e


def get(url: str, headers: dict[str, str]) -> tuple[int, str | None, bytes]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers["server"], r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers["server"], e.read()


def test_health_answers_200_without_a_key(gateway: Gateway) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-tb-not-a-key"}):
        assert get(f"{gateway.base_url}/health", headers) == (200, "envoy", b"")
    # Any other path still needs a key.
    status, _, _ = get(f"{gateway.base_url}/v1/models", {})
    assert status == 401


def test_an_http_1_0_health_check_is_answered(gateway: Gateway) -> None:
    """Load balancers' HTTP checks (HAProxy's `option httpchk`) speak HTTP/1.0, often
    with no Host header: Envoy answers them (it refused them with 426)."""
    host, port = gateway.base_url.removeprefix("http://").rsplit(":", 1)
    for request in (b"GET /health HTTP/1.0\r\n\r\n",
                    b"GET /health HTTP/1.0\r\nHost: lb\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(request)
            answer = b""
            while chunk := s.recv(4096):  # HTTP/1.0: the server closes after the answer
                answer += chunk
        assert answer.startswith(b"HTTP/1.0 200 ") or answer.startswith(b"HTTP/1.1 200 "), answer
    # Still a key for anything else, in either version.
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /v1/models HTTP/1.0\r\n\r\n")
        assert s.recv(4096).split(b"\r\n", 1)[0].endswith(b" 401 Unauthorized")
