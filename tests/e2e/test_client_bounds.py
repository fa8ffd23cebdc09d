"""What a client without a key can make the gateway hold or write, through the real
Envoy: HTTP/2 streams per connection and flow-control windows, and the length of the
access log line its request leaves."""

from __future__ import annotations

import json
import socket
import time

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx

from authz.envoy_config.http_filters import (
    H2_CONNECTION_WINDOW_BYTES,
    H2_MAX_CONCURRENT_STREAMS,
    H2_STREAM_WINDOW_BYTES,
    LOG_PATH_CHARS,
    LOG_USER_AGENT_CHARS,
)
from tests.e2e.conftest import SECRET, Gateway


def _server_settings(base_url: str) -> tuple[dict[int, int], int]:
    """The SETTINGS Envoy sends an h2c (prior knowledge) client, and the connection
    window it opens (its first WINDOW_UPDATE on stream 0 over the 65,535 default)."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    settings: dict[int, int] = {}
    window = 65535
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + 5
        got_settings = got_window = False
        while not (got_settings and got_window) and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    settings.update({k: v.new_value for k, v in event.changed_settings.items()})
                    got_settings = True
                elif isinstance(event, h2.events.WindowUpdated) and event.stream_id == 0:
                    window += event.delta
                    got_window = True
            sock.sendall(conn.data_to_send())
    return settings, window


def test_http2_streams_and_windows_are_bounded(gateway: Gateway) -> None:
    # Envoy's defaults (1.40): 1024 streams, 256 MiB windows.
    settings, window = _server_settings(gateway.base_url)
    assert settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == \
        H2_MAX_CONCURRENT_STREAMS == 100
    assert settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] == H2_STREAM_WINDOW_BYTES
    assert window == H2_CONNECTION_WINDOW_BYTES


def test_access_log_line_is_bounded_for_a_client_without_a_key(gateway: Gateway) -> None:
    marker = f"dos-{time.monotonic_ns()}"
    path = f"/v1/{marker}/" + "p" * 6000
    agent = "U" * 6000
    with httpx.Client(base_url=gateway.base_url, timeout=10) as c:
        r = c.get(path, headers={"user-agent": agent})
    assert r.status_code == 401
    request_id = r.headers["x-request-id"]
    line = _access_log_line(gateway, request_id)
    assert line["path"] == path[:LOG_PATH_CHARS]
    assert line["user_agent"] == agent[:LOG_USER_AGENT_CHARS]
    assert line["status"] == 401
    assert len(json.dumps(line)) < 2 * (LOG_PATH_CHARS + LOG_USER_AGENT_CHARS)


def _access_log_line(gateway: Gateway, request_id: str) -> dict[str, object]:
    """Envoy's access log line of one request (stdout is flushed within a few seconds)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for raw in (gateway.logs / "envoy.log").read_text(errors="replace").splitlines():
            if request_id in raw and raw.startswith("{"):
                line: dict[str, object] = json.loads(raw)
                if line.get("request_id") == request_id:
                    return line
        time.sleep(0.2)
    raise AssertionError(f"no access log line for {request_id}")


def _exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send one HTTP/1.1 request; the response's head, its body read when Content-Length
    frames it."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_a_bad_request_keeps_the_connection_a_malformed_one_closes_it(
        gateway: Gateway) -> None:
    """Client-libraries tester: every 400 of the gateway's own closed the HTTP/1.1
    connection (Envoy's default after a local 400), so a client sending bad bodies
    reconnected for each. It stays open now; a request Envoy's parser cannot read (two
    Content-Lengths: a smuggling shape), or one refused before its body was read, still
    closes it."""
    host, port = gateway.base_url.removeprefix("http://").split(":")
    body = b'{"model":"demo","messages":[{"role":"user","content":"hi"}],"max_tokens":0}'
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
               b"Authorization: Bearer " + SECRET.encode() + b"\r\n"
               b"Content-Type: application/json\r\nContent-Length: "
               + str(len(body)).encode() + b"\r\n\r\n" + body)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for _ in range(3):  # one connection: each answered, none closing it
            head = _exchange(sock, request)
            assert head.startswith(b"HTTP/1.1 400 ") and b"connection: close" not in head
        smuggle = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                   b"Content-Length: 3\r\n\r\n{}")
        head = _exchange(sock, smuggle)
        assert head.startswith(b"HTTP/1.1 400 ")
        sock.settimeout(5)
        assert sock.recv(1) == b""  # closed
    # Refused before its body was read (a path Envoy will not normalize): closed, so the
    # body is never read as a request of its own.
    inner = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/mo%00dels HTTP/1.1\r\nHost: x\r\nContent-Length: "
                     + str(len(inner)).encode() + b"\r\n\r\n" + inner)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 400 ")
