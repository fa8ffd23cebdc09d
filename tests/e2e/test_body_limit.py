"""The request-size limit through the real Envoy, and what a client without a key makes
it hold: bodies around `max_request_body_bytes` (one byte under, at, over, far over),
with content-length and chunked, sent at once or trickled past the limit, over HTTP/1.1
and HTTP/2 (h2c). The 413 is exact whatever the framing or pace. Measured with Envoy 1.40 and
ext_authz moved in front of the body limit: the far-over bodies sent at once over
HTTP/1.1 stalled (no answer within 30 s, the request timeout is 5 minutes), so the body
limit stays first (see `body_limit` in authz/envoy_config/http_filters.py)."""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest

from tests.e2e.conftest import Gateway, run_gateway
from tests.helpers import SECRET

pytestmark = pytest.mark.e2e

# Not a power of two, and small enough that "far over" is cheap.
LIMIT = 200_000
FAR_OVER = 8 * LIMIT
# A trickled body: all but this many bytes at once, then the rest a few bytes at a time.
TRICKLE_TAIL = 64
TRICKLE_STEP = 8
TRICKLE_PAUSE_S = 0.02


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("body-limit"),
                     max_request_body_bytes=LIMIT) as g:
        yield g


def chat_body(size: int) -> bytes:
    """A valid chat request of exactly `size` bytes (one long word: few tokens)."""
    base = {"model": "demo", "max_tokens": 1, "messages": [{"role": "user", "content": ""}]}
    pad = size - len(json.dumps(base).encode())
    assert pad >= 0
    base["messages"][0]["content"] = "a" * pad  # type: ignore[index]
    body = json.dumps(base).encode()
    assert len(body) == size
    return body


@dataclass(frozen=True)
class Upload:
    """How a body is sent: its framing, and whether its tail trickles in."""
    chunked: bool
    trickle: bool

    def parts(self, body: bytes) -> list[bytes]:
        if not self.trickle:
            return [body]
        head, tail = body[:-TRICKLE_TAIL], body[-TRICKLE_TAIL:]
        return [head, *(tail[i:i + TRICKLE_STEP] for i in range(0, len(tail), TRICKLE_STEP))]


def _addr(gw: Gateway) -> tuple[str, int]:
    host, port = gw.base_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def h1_post(gw: Gateway, parts: Sequence[bytes], *, chunked: bool, key: str | None,
            pause_s: float = TRICKLE_PAUSE_S,
            timeout_s: float = 30) -> tuple[int, bytes]:
    """POST over HTTP/1.1 on a raw socket: the body is written from another thread
    (write errors ignored: Envoy may answer and close before it is all sent) while this
    one reads the response."""
    length = sum(map(len, parts))
    head = ["POST /v1/chat/completions HTTP/1.1", "host: tokenbooth",
            "content-type: application/json"]
    head.append("transfer-encoding: chunked" if chunked else f"content-length: {length}")
    if key is not None:
        head.append(f"authorization: Bearer {key}")
    sock = socket.create_connection(_addr(gw), timeout=timeout_s)

    def send() -> None:
        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            for i, part in enumerate(parts):
                if i:
                    time.sleep(pause_s)
                sock.sendall(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, resp.read()
    finally:
        sock.close()
        sender.join(timeout_s)


def h2_post(gw: Gateway, parts: Sequence[bytes], *, chunked: bool, key: str | None,
            pause_s: float = TRICKLE_PAUSE_S,
            timeout_s: float = 30) -> tuple[int, bytes]:
    """POST over h2c (prior knowledge) with the h2 library: DATA frames as the windows
    allow, reading Envoy's frames meanwhile, until the response ends or the stream is
    reset. `chunked`: no content-length."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    length = sum(map(len, parts))
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", "tokenbooth"),
               (":path", "/v1/chat/completions"), ("content-type", "application/json")]
    if not chunked:
        headers.append(("content-length", str(length)))
    if key is not None:
        headers.append(("authorization", f"Bearer {key}"))
    status = 0
    body = b""
    done = False
    deadline = time.monotonic() + timeout_s
    with socket.create_connection(_addr(gw), timeout=timeout_s) as sock:
        conn.send_headers(1, headers)
        sock.sendall(conn.data_to_send())
        pending = list(parts)
        last_part_at = time.monotonic()
        while not done:
            assert time.monotonic() < deadline, "no complete response"
            if pending and not done:
                part = pending[0]
                paused = len(pending) < len(parts) and \
                    time.monotonic() - last_part_at < pause_s
                window = min(conn.local_flow_control_window(1), conn.max_outbound_frame_size)
                if not paused and window > 0:
                    try:
                        conn.send_data(1, part[:window],
                                       end_stream=len(pending) == 1
                                       and len(part) <= window)
                    except h2.exceptions.StreamClosedError:
                        pending = []
                    else:
                        if len(part) <= window:
                            pending.pop(0)
                            last_part_at = time.monotonic()
                        else:
                            pending[0] = part[window:]
                    sock.sendall(conn.data_to_send())
            readable, _, _ = select.select([sock], [], [], 0.01 if pending else 1.0)
            if not readable:
                continue
            data = sock.recv(1 << 16)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 1:
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == 1:
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == 1:
                    done = True
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == 1:
                    done = True
                    pending = []
            sock.sendall(conn.data_to_send())
    return status, body


POSTS = {"http1": h1_post, "h2": h2_post}
UPLOADS = {
    "content-length": Upload(chunked=False, trickle=False),
    "chunked": Upload(chunked=True, trickle=False),
    "content-length-trickled": Upload(chunked=False, trickle=True),
    "chunked-trickled": Upload(chunked=True, trickle=True),
}


@pytest.mark.parametrize("protocol", sorted(POSTS))
@pytest.mark.parametrize("upload", sorted(UPLOADS))
@pytest.mark.parametrize("size", [LIMIT - 1, LIMIT, LIMIT + 1, FAR_OVER],
                         ids=["limit-1", "limit", "limit+1", "far-over"])
def test_the_size_limit_is_exact(gw: Gateway, protocol: str, upload: str, size: int) -> None:
    """With a valid key: served up to the limit, 413 `request_too_large` past it."""
    how = UPLOADS[upload]
    status, body = POSTS[protocol](gw, how.parts(chat_body(size)), chunked=how.chunked,
                                   key=SECRET)
    if size <= LIMIT:
        assert status == 200, body
        assert json.loads(body)["object"] == "chat.completion"
    else:
        assert status == 413, body
        assert json.loads(body)["error"]["code"] == "request_too_large"
