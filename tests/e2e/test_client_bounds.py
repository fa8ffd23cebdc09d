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
from tests.e2e.conftest import Gateway


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
