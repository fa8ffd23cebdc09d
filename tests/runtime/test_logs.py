"""authz/runtime/logs.py: JSON lines, the error's text before its trace, and grpc.aio's
noise about a status sent after Envoy reset the stream dropped."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from authz.runtime.logs import JsonFormatter, Repeats, setup_logging
from authz.state.repeats import REPEATS
from tests.helpers import free_port


class ExecuteBatchError(Exception):  # the name grpc's Cython layer raises
    pass


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging("info")
    out = io.StringIO()
    root.handlers[0].setStream(out)  # type: ignore[attr-defined]
    try:
        yield out
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def _raise(e: Exception) -> None:
    try:
        raise e
    except Exception:
        logging.getLogger("grpc._cython.cygrpc").exception(
            "ExecuteBatchError raised in core by servicer method [/x/Process]")


def test_a_status_after_the_peers_reset_is_not_logged(captured: io.StringIO) -> None:
    _raise(ExecuteBatchError('Failed "execute_batch": (<grpc._cython.cygrpc.'
                             'SendStatusFromServerOperation object at 0x1>,)'))
    assert captured.getvalue() == ""


def test_other_grpc_errors_are_one_json_line_with_the_error_first(
        captured: io.StringIO) -> None:
    _raise(ExecuteBatchError('Failed "execute_batch": (<SendMessageOperation>,)'))
    [line] = captured.getvalue().splitlines()
    rec = json.loads(line)
    assert rec["level"] == "error" and rec["error"].startswith("ExecuteBatchError: Failed")
    assert "Traceback" in rec["traceback"] and "Traceback" not in rec["msg"]


def test_fields_are_kept() -> None:
    rec = logging.makeLogRecord({"msg": "request done", "request_id": "r1",
                                 "levelname": "INFO", "name": "tokenbooth.usage"})
    assert json.loads(JsonFormatter().format(rec))["request_id"] == "r1"


async def test_a_malformed_http_request_is_one_warning_without_its_bytes(
        captured: io.StringIO) -> None:
    """The side port (and the admin API, the same server) refusing requests it cannot
    parse: a header past 8 KiB that carries a token, a request smuggling's framing. Each
    is one warning line, with no traceback and none of the request's bytes (it was an
    error with the trace and the header's first hundred bytes). Nor does its answer
    quote them (security tester: a folded `authorization` header's admin token came back
    in aiohttp's plain-text 400): an OpenAI-shaped JSON error naming the status alone."""
    from aiohttp import web

    from authz.runtime.metrics import Metrics
    from authz.runtime.quiet_http import QuietAppRunner
    from authz.runtime.side_port import make_side_app

    runner = QuietAppRunner(make_side_app(Metrics(), lambda: True), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    secret = "adm-secret-" + "x" * 9000
    try:
        for raw in (f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}"
                    "\r\n\r\n".encode(),
                    b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n",
                    b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\r\n"
                    b" adm-secret-folded\r\n\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            await writer.drain()
            answer = await reader.read(1 << 16)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split(b" ")[1] == b"400" and b"adm-secret" not in answer, answer
            assert b"application/json" in head
            err = json.loads(body)["error"]
            assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_request")
            writer.close()
            await writer.wait_closed()
    finally:
        await runner.cleanup()
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert [(x["level"], x["logger"]) for x in lines] == [("warning", "aiohttp.server")] * 3
    assert "traceback" not in captured.getvalue().lower()
    assert "adm-secret" not in captured.getvalue()
    assert lines[0]["msg"].startswith("malformed HTTP request refused: LineTooLong")


def test_a_flood_of_one_line_is_cut_to_a_burst_and_counted() -> None:
    """A fault that fails every request logs one line each: past the burst of one kind
    in the window the rest are left out, and the next line of that kind says how many.
    Only lines marked REPEATS: others (a record not stored, each request's own line)
    always pass."""
    now = [0.0]
    repeats = Repeats(burst=3, window_s=10.0, clock=lambda: now[0])
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(repeats)
    log = logging.getLogger("tokenbooth.test-repeats")
    log.addHandler(handler)
    log.propagate = False
    try:
        for i in range(100):
            log.warning("key check failed closed: %s", f"outage {i}", extra=REPEATS)
        log.warning("another kind", extra=REPEATS)
        for _ in range(5):
            log.error("usage record not stored: %s", "disk full")
        now[0] = 10.0
        log.warning("key check failed closed: %s", "after", extra=REPEATS)
    finally:
        log.removeHandler(handler)
        log.propagate = True
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [ln["msg"] for ln in lines[:4]] == [
        "key check failed closed: outage 0", "key check failed closed: outage 1",
        "key check failed closed: outage 2", "another kind"]
    assert all("repeated" not in ln and "_repeats" not in ln for ln in lines[:9])
    assert [ln["msg"] for ln in lines[4:9]] == ["usage record not stored: disk full"] * 5
    assert lines[9]["msg"] == "key check failed closed: after" and lines[9]["repeated"] == 97
    assert len(lines) == 10


def test_setup_logging_cuts_floods(captured: io.StringIO) -> None:
    for _ in range(50):
        logging.getLogger("tokenbooth.keys").warning("key check failed closed: %s", "x",
                                                     extra=REPEATS)
        logging.getLogger("tokenbooth.records").info("request done")
    assert captured.getvalue().count("key check failed closed") == 20
    assert captured.getvalue().count("request done") == 50
