"""Closed-loop HTTP/1.1 load generator: N keep-alive connections, one request in flight on each.

Its own process, the same for every configuration (`bench.run` starts one per measurement):

    python -m bench.loadgen --url http://127.0.0.1:8080/v1/chat/completions \\
        --body-file body.json --header 'Authorization: Bearer sk-…' \\
        --connections 16 --warmup 1 --duration 5

It warms up, prints `START` when the measured window opens and `END` when it closes (the
caller samples CPU and counters at those two lines), waits for the requests still in
flight, then prints one JSON object: counts by status, latency percentiles of the requests
that completed inside the window, time to the first body byte, and its own CPU time.

A response counts as good only with a 2xx status and a plausible body: JSON that carries
`"usage"`, or an event stream that ends with `data: [DONE]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

_CRLF = b"\r\n"
_HEAD_END = b"\r\n\r\n"
_DONE = b"data: [DONE]"


@dataclass(slots=True)
class Reply:
    status: int
    ttfb: float  # perf_counter() when the first body byte arrived
    end: float  # perf_counter() when the body was complete
    body: bytes
    keep_alive: bool


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; `request()` sends the fixed request and waits."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Reply] | None = None
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._status = 0
        self._keep_alive = True
        self._in_body = False
        self._chunked = False
        self._remaining = 0  # content-length left, or bytes left of the current chunk (+CRLF)
        self._parts: list[bytes] = []
        self._ttfb = 0.0

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they behave as one.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._lost.done():
            self._lost.set_result(None)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("connection closed mid-response"))

    def data_received(self, data: bytes) -> None:
        self._buf += data
        try:
            done = self._parse()
        except (ValueError, IndexError) as e:
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_exception(ConnectionError(f"bad response: {e}"))
            if self._transport is not None:
                self._transport.close()
            return
        if done and self._waiter is not None and not self._waiter.done():
            reply = Reply(self._status, self._ttfb, time.perf_counter(), b"".join(self._parts),
                          self._keep_alive)
            self._reset()
            self._waiter.set_result(reply)

    # -- parsing -----------------------------------------------------------------------

    def _parse(self) -> bool:
        buf = self._buf
        if not self._in_body:
            end = buf.find(_HEAD_END)
            if end < 0:
                return False
            head = bytes(buf[:end]).lower()
            self._status = int(head[9:12])
            self._chunked = b"\r\ntransfer-encoding: chunked" in head
            self._keep_alive = b"\r\nconnection: close" not in head
            if not self._chunked:
                i = head.find(b"\r\ncontent-length:")
                if i < 0:
                    raise ValueError("neither content-length nor chunked")
                j = head.find(b"\r\n", i + 2)
                self._remaining = int(head[i + 17:j if j >= 0 else len(head)])
            self._in_body = True
            self._pos = end + 4
        if self._ttfb == 0.0 and len(buf) > self._pos:
            self._ttfb = time.perf_counter()
        if not self._chunked:
            have = len(buf) - self._pos
            if have < self._remaining:
                return False
            self._parts.append(bytes(buf[self._pos:self._pos + self._remaining]))
            return True
        return self._parse_chunks()

    def _parse_chunks(self) -> bool:
        buf = self._buf
        while True:
            if self._remaining == 0:  # at a chunk-size line
                eol = buf.find(_CRLF, self._pos)
                if eol < 0:
                    return False
                size = int(bytes(buf[self._pos:eol]).split(b";", 1)[0], 16)
                if size == 0:  # the last chunk, then (trailers and) an empty line
                    return buf.find(_HEAD_END, eol) >= 0
                self._pos = eol + 2
                self._remaining = size + 2
            have = len(buf) - self._pos
            if have < self._remaining:
                return False
            self._parts.append(bytes(buf[self._pos:self._pos + self._remaining - 2]))
            self._pos += self._remaining
            self._remaining = 0
            if self._pos > 65536:  # keep the buffer short on long streams
                del buf[:self._pos]
                self._pos = 0

    # -- API ---------------------------------------------------------------------------

    async def request(self) -> Reply:
        assert self._transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(self._request)
        return await self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


@dataclass
class Window:
    start: float = 0.0
    end: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfbs: list[float] = field(default_factory=list)
    status: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    bad_body: int = 0
    events: int = 0
    sent_total: int = 0

    def inside(self, t: float) -> bool:
        return self.start > 0.0 and self.start <= t and (self.end == 0.0 or t <= self.end)


def good_body(body: bytes) -> tuple[bool, int]:
    """(plausible, SSE `data:` events): JSON with usage, or a stream ending in [DONE]."""
    if body[:1] == b"{":
        return b'"usage"' in body, 0
    events = body.count(b"data:")
    return body.rstrip().endswith(_DONE), events


async def worker(host: str, port: int, request: bytes, win: Window, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    conn: Connection | None = None
    while not stop.is_set():
        if conn is None:
            try:
                _, proto = await loop.create_connection(lambda: Connection(request), host, port)
            except OSError as e:
                win.errors[f"connect: {type(e).__name__}"] += 1
                await asyncio.sleep(0.05)
                continue
            conn = proto
        t0 = time.perf_counter()
        win.sent_total += 1
        try:
            reply = await conn.request()
        except ConnectionError as e:
            if win.inside(time.perf_counter()):
                win.errors[str(e)] += 1
            conn.close()
            conn = None
            continue
        if win.inside(reply.end):
            win.status[reply.status] += 1
            win.latencies.append(reply.end - t0)
            win.ttfbs.append(reply.ttfb - t0)
            ok, events = good_body(reply.body)
            win.events += events
            if 200 <= reply.status < 300 and not ok:
                win.bad_body += 1
        if not reply.keep_alive:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[i]


def build_request(url: str, body: bytes, headers: list[str]) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = parts.path or "/"
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}",
             "Content-Type: application/json", f"Content-Length: {len(body)}", *headers]
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def run(args: argparse.Namespace, body: bytes) -> dict[str, object]:
    host, port, request = build_request(args.url, body, args.header)
    win = Window()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(worker(host, port, request, win, stop))
             for _ in range(args.connections)]
    await asyncio.sleep(args.warmup)
    cpu0 = time.process_time()
    win.start = time.perf_counter()
    sys.stdout.write("START\n")
    sys.stdout.flush()
    await asyncio.sleep(args.duration)
    win.end = time.perf_counter()
    cpu1 = time.process_time()
    sys.stdout.write("END\n")
    sys.stdout.flush()
    stop.set()
    _, pending = await asyncio.wait(tasks, timeout=30)
    for t in pending:
        t.cancel()
    window_s = win.end - win.start
    lat = sorted(win.latencies)
    ttfb = sorted(win.ttfbs)
    n = len(lat)
    ok = sum(c for s, c in win.status.items() if 200 <= s < 300)
    return {
        "connections": args.connections,
        "window_s": window_s,
        "completed": n,
        "ok": ok,
        "rps": n / window_s if window_s > 0 else 0.0,
        "status": {str(k): v for k, v in sorted(win.status.items())},
        "errors": dict(win.errors),
        "bad_body": win.bad_body,
        "events_per_response": win.events / n if n else 0.0,
        "lat_ms": {q: percentile(lat, p) * 1000 for q, p in
                   (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))},
        "lat_mean_ms": (sum(lat) / n * 1000) if n else 0.0,
        "ttfb_ms": {q: percentile(ttfb, p) * 1000 for q, p in (("p50", 0.50), ("p99", 0.99))},
        "cpu_s": cpu1 - cpu0,
        "stuck": len(pending),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--body-file", required=True)
    ap.add_argument("--header", action="append", default=[], help="'Name: value' (repeatable)")
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--cpu", type=int, action="append",
                    help="pin this process to these CPUs (repeatable)")
    args = ap.parse_args()
    if args.cpu:
        os.sched_setaffinity(0, set(args.cpu))
    with open(args.body_file, "rb") as f:
        body = f.read()
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(args, body))
    else:
        result = uvloop.run(run(args, body))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
