"""`GET /health` through the real Envoy: 200 with no key, answered by Envoy itself."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.request

import pytest

from tests.e2e.conftest import Gateway
from tests.helpers import SECRET

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
                    b"GET /health HTTP/1.0\r\nHost: lb\r\n\r\n",
                    b"OPTIONS /health HTTP/1.0\r\n\r\n"):  # HAProxy's default check
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


def test_head_answers_as_get_without_a_body(gateway: Gateway) -> None:
    """HEAD is the GET's status and headers with no body (RFC 9110; `curl -I`, uptime
    monitors): on /health with no key, on the models endpoints with the GET's key
    checks. A path with no GET still answers 405 (`allow` names the methods)."""
    host, port = gateway.base_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    auth = {"Authorization": f"Bearer {SECRET}"}
    try:
        for path, headers, status in (("/health", {}, 200), ("/v1/models", auth, 200),
                                      ("/v1/models/demo", auth, 200),
                                      ("/v1/models/nope", auth, 404), ("/v1/models", {}, 401),
                                      ("/v1/chat/completions", auth, 405)):
            conn.request("HEAD", path, headers=headers)
            resp = conn.getresponse()
            assert (path, resp.status, resp.read()) == (path, status, b"")
            if path == "/v1/models" and status == 200:
                conn.request("GET", path, headers=headers)  # the same connection
                get = conn.getresponse()
                body = get.read()
                assert get.status == 200 and json.loads(body)["object"] == "list"
                assert resp.headers["content-type"] == get.headers["content-type"]
                assert resp.headers["content-length"] == str(len(body))
            if status == 405:
                assert resp.headers["allow"] == "POST"
    finally:
        conn.close()
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:  # the 405 on a GET names HEAD too
        conn.request("POST", "/v1/models", headers=auth, body=b"{}")
        resp = conn.getresponse()
        resp.read()
        assert (resp.status, resp.headers["allow"]) == (405, "GET, HEAD")
    finally:
        conn.close()


def test_other_methods_on_health_are_a_405_naming_those_it_answers(
        gateway: Gateway) -> None:
    """OPTIONS is answered (HAProxy's `option httpchk` sends it unless told otherwise);
    any other method is, as on every other path, a 405 with `allow`, OpenAI-shaped, at
    once (a PUT's body is not read first)."""
    host, port = gateway.base_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("OPTIONS", "/health")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"")
        for method, body in (("POST", b"{}"), ("PUT", b"x" * 60_000), ("DELETE", None),
                             ("FOO", None)):
            conn.request(method, "/health", body=body)
            resp = conn.getresponse()
            answer = resp.read()
            assert (method, resp.status) == (method, 405)
            assert resp.headers["allow"] == "GET, HEAD, OPTIONS"
            assert json.loads(answer)["error"]["code"] == "method_not_allowed"
            if resp.will_close:
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
    finally:
        conn.close()
