"""A backend's error answers, OpenAI-shaped (issue 14 item 2), through the real servicer.

Envoy marks a backend's error answer (authz/envoy_config/http_filters.upstream_errors):
the backend's own status in the upstream-errors filter's metadata, a 5xx already sent on
as 502. ext_proc holds the body and sends it rewritten at the end; the record keeps the
backend's status. `upstream_error` (policy/errors.py) reads each body shape.
"""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import pytest

from authz.envoy_config.names import UPSTREAM_ERRORS, UPSTREAM_STATUS_KEY
from authz.services.lifecycle import ERROR_KEEP_BYTES
from policy.errors import UPSTREAM_MESSAGE_CHARS, upstream_error
from tests.grpc_harness import Running
from tests.services.test_ext_proc import CHAT, Stream, admit, records, resp_body

VLLM_400 = json.dumps({"object": "error", "message": "max_tokens is too large: 9000.",
                       "type": "BadRequestError", "param": None, "code": 400}).encode()


def marked(data: bytes, backend_status: int, end: bool = True) -> Any:
    """The first response chunk of a backend's error answer, as Envoy sends it: a 5xx
    already rewritten to 502 in `response.code`, the backend's status as metadata."""
    msg = resp_body(data, end=end, status=502 if backend_status >= 500 else backend_status)
    msg.metadata_context.filter_metadata[UPSTREAM_ERRORS].update(
        {UPSTREAM_STATUS_KEY: str(backend_status)})
    return msg


def mutation(resp: Any) -> bytes | None:
    r = resp.response_body.response
    return r.body_mutation.body if r.HasField("body_mutation") else None


async def test_backend_4xx_keeps_status_and_message(running: Running) -> None:
    s = Stream(running)
    await admit(s, {**CHAT, "stream": True})
    # Held while it arrives: the client gets nothing until the end...
    assert mutation(await s.send(marked(VLLM_400[:25], 400, end=False))) == b""
    out = mutation(await s.send(resp_body(VLLM_400[25:], end=True, status=None)))
    # ...then the whole error, OpenAI-shaped, with the backend's message.
    assert out is not None
    assert json.loads(out) == {"error": {
        "message": "max_tokens is too large: 9000.", "type": "invalid_request_error",
        "param": None, "code": "upstream_error"}}
    await s.close()
    [rec] = await records(running, 1)
    assert (rec["status"], rec["total_tokens"], rec["estimated"]) == (400, 0, False)


async def test_a_backend_not_serving_the_upstream_model_is_the_configs_fault(
        running: Running, caplog: pytest.LogCaptureFixture) -> None:
    """Real-configs tester: an alias whose backend does not serve its `upstream_model`
    answered 404 `param: model` with vLLM's "The model `${MODEL_NAME}` does not exist.
    Valid aliases: …": the client's mistake, by its look, and the operators' names
    shown. Its status stays; the message says whose fault it is; an error line tells
    the operator which name."""
    s = Stream(running)
    await admit(s, CHAT)
    body = (b'{"object": "error", "message": "The model `tiny-llama` does not exist. Valid '
            b'aliases: other.", "type": "NotFoundError", "param": "model", "code": 404}')
    out = mutation(await s.send(marked(body, 404)))
    assert out is not None
    assert json.loads(out) == {"error": {
        "message": "The backend of model 'demo' does not serve the model name the gateway "
        "sends it: the gateway's configuration must name a model that backend serves (its "
        "operator fixes it; your request was not the cause).",
        "type": "invalid_request_error", "param": None, "code": "upstream_error"}}
    await s.close()
    [rec] = await records(running, 1)
    assert (rec["status"], rec["total_tokens"]) == (404, 0)
    [line] = [r for r in caplog.records if "does not serve the model" in r.getMessage()]
    assert (line.levelname, getattr(line, "upstream_model", None)) == ("ERROR", "tiny-llama")


async def test_a_backend_404_for_its_path_blames_no_upstream_model(
        running: Running, caplog: pytest.LogCaptureFixture) -> None:
    """A backend without the endpoint (FastAPI's 404 for a path) is no upstream_model to
    fix: its 404 goes to the client as it is, and no error line sends the operator after
    the model name (review)."""
    s = Stream(running)
    await admit(s, CHAT)
    out = mutation(await s.send(marked(b'{"detail": "Not Found"}', 404)))
    assert out is not None
    assert json.loads(out)["error"]["message"] == "Not Found"
    await s.close()
    [rec] = await records(running, 1)
    assert rec["status"] == 404
    assert not [r for r in caplog.records if "does not serve the model" in r.getMessage()]


async def test_backend_5xx_is_a_502_and_the_record_keeps_its_status(running: Running) -> None:
    s = Stream(running)
    await admit(s, CHAT)
    body = json.dumps({"object": "error", "message": "EngineCore died", "code": 500})
    out = mutation(await s.send(marked(body.encode(), 500)))
    assert out is not None
    err = json.loads(out)["error"]
    assert (err["code"], err["type"]) == ("upstream_error", "server_error")
    assert err["message"] == "The backend failed (HTTP 500): EngineCore died"
    await s.close()
    [rec] = await records(running, 1)
    assert (rec["status"], rec["total_tokens"]) == (500, 0)


@pytest.mark.parametrize("backend_status", [429, 500])
async def test_an_error_body_the_client_left_unread_keeps_the_backends_status(
        running: Running, backend_status: int) -> None:
    """The Node SDK cancels the body of an answer it will retry: Envoy drops the stream
    with the body half held. The backend's error still generated nothing: its status,
    not 499, and no tokens."""
    s = Stream(running)
    await admit(s, CHAT)
    assert mutation(await s.send(marked(VLLM_400[:25], backend_status, end=False))) == b""
    s.call.cancel()
    [rec] = await records(running, 1)
    assert (rec["status"], rec["total_tokens"], rec["estimated"]) == (backend_status, 0, False)


async def test_a_huge_error_body_is_cut_not_held_whole(running: Running) -> None:
    s = Stream(running)
    await admit(s, CHAT)
    assert mutation(await s.send(marked(b"x" * ERROR_KEEP_BYTES, 404, end=False))) == b""
    assert mutation(await s.send(resp_body(b"y" * 4096, end=False, status=None))) == b""
    out = mutation(await s.send(resp_body(b"", end=True, status=None)))
    assert out is not None
    assert json.loads(out)["error"]["message"] == "x" * UPSTREAM_MESSAGE_CHARS
    await s.close()


@pytest.mark.parametrize(("status", "body", "want"), [
    # vLLM's ErrorResponse
    (400, VLLM_400, (400, "max_tokens is too large: 9000.", None, "upstream_error")),
    # OpenAI's shape (vLLM's newer one): param and a string code are kept
    (422, b'{"error": {"message": "bad n", "type": "BadRequestError", "param": "n", '
          b'"code": "invalid_value"}}', (422, "bad n", "n", "invalid_value")),
    # vLLM --api-key refusing the gateway's key: said to be the gateway's, not the
    # client's (its SDK raises AuthenticationError; newcomer tester)
    (401, b'{"error": "Unauthorized"}', (
        401, "The backend refused the gateway's credentials (HTTP 401: Unauthorized); your "
        "API key was accepted: the gateway's key for this backend is missing or wrong (its "
        "operator sets it).", None, "upstream_error")),
    # FastAPI: a path vLLM does not serve, a validation error
    (404, b'{"detail": "Not Found"}', (404, "Not Found", None, "upstream_error")),
    (422, b'{"detail": [{"loc": ["body", "n"], "msg": "bad"}]}',
     (422, '[{"loc":["body","n"],"msg":"bad"}]', None, "upstream_error")),
    # another backend's plain text
    (403, b"  forbidden by policy\n", (403, "forbidden by policy", None, "upstream_error")),
    (400, b"", (400, "The backend answered HTTP 400 with no message.", None,
                "upstream_error")),
    # not text (a gzip header and nothing after it); text cut mid-character where held
    (400, b"\x1f\x8b\x08\x00\xff\xfe", (
        400, "The backend answered HTTP 400 with a body that is not text.", None,
        "upstream_error")),
    (400, b"\x00\x01\x02\x03\xff", (
        400, "The backend answered HTTP 400 with a body that is not text.", None,
        "upstream_error")),
    # compressed although asked for identity: read decompressed (gzip, zlib's deflate;
    # cut before its trailer; decoded up to a cap)
    (400, gzip.compress(VLLM_400), (400, "max_tokens is too large: 9000.", None,
                                    "upstream_error")),
    (400, gzip.compress(VLLM_400)[:-8], (400, "max_tokens is too large: 9000.", None,
                                         "upstream_error")),
    (500, zlib.compress(b"engine dead"), (502, "The backend failed (HTTP 500): engine dead",
                                          None, "upstream_error")),
    # short text whose first bytes read as a zlib header; terminal colours are text
    (400, b"80 is", (400, "80 is", None, "upstream_error")),
    (400, b"\x1b[31mbad n\x1b[0m", (400, "\x1b[31mbad n\x1b[0m", None, "upstream_error")),
    (400, gzip.compress(b"x" * 10_000_000), (400, "x" * UPSTREAM_MESSAGE_CHARS, None,
                                                "upstream_error")),
    (409, "conflit é".encode()[:-1], (409, "conflit", None, "upstream_error")),
    (503, b"<html>upstream overloaded</html>",
     (502, "The backend failed (HTTP 503): <html>upstream overloaded</html>", None,
      "upstream_error")),
])
def test_error_shapes(status: int, body: bytes, want: tuple[Any, ...]) -> None:
    err = upstream_error(status, body)
    assert (err.status, err.message, err.param, err.code) == want
    shaped = json.loads(err.body())["error"]
    assert set(shaped) == {"message", "type", "param", "code"}
    assert shaped["type"] == ("server_error" if status >= 500 else
                              {401: "authentication_error", 403: "permission_error"}.get(
                                  status, "invalid_request_error"))
