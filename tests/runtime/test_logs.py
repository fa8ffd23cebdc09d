"""authz/runtime/logs.py: JSON lines, the error's text before its trace, and grpc.aio's
noise about a status sent after Envoy reset the stream dropped."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from authz.runtime.logs import JsonFormatter, setup_logging


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
