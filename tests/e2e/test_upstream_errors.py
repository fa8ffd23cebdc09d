"""A backend's error answers through the real Envoy, with the openai SDK (issue 14 item 2).

The simulator answers `x-sim-status: NNN` with vLLM's error body. A 4xx keeps its status
and the backend's message, OpenAI-shaped; a 5xx becomes 502 `upstream_error`; the usage
record keeps the backend's own status. Envoy's own replies keep theirs.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from tests.e2e.conftest import Gateway
from tests.e2e.test_gateway import MESSAGES, records_for
from tests.helpers import SECRET

pytestmark = pytest.mark.e2e


def _sim_message(status: int) -> str:
    return f"Simulated error (x-sim-status: {status})."


def _fail(gw: Gateway, status: int, stream: bool = False) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as e:
        gw.client().chat.completions.create(
            model="demo", messages=MESSAGES, max_tokens=5, stream=stream,
            extra_headers={"x-sim-status": str(status)})
    return e.value


def _record_status(gw: Gateway, err: openai.APIStatusError) -> int:
    [rec] = records_for(gw, err.response.headers["x-request-id"])
    assert (rec["total_tokens"], rec["estimated"]) == (0, False)
    status: int = rec["status"]
    return status


def test_backend_400_is_a_bad_request_with_the_backend_message(gateway: Gateway) -> None:
    err = _fail(gateway, 400)
    assert isinstance(err, openai.BadRequestError)
    assert err.status_code == 400
    assert err.body == {"message": _sim_message(400), "type": "invalid_request_error",
                        "param": None, "code": "upstream_error"}
    assert err.response.headers["content-type"] == "application/json"
    assert _record_status(gateway, err) == 400


@pytest.mark.parametrize(("status", "cls"), [(404, openai.NotFoundError),
                                             (422, openai.UnprocessableEntityError)])
def test_backend_4xx_keeps_its_status(gateway: Gateway, status: int,
                                      cls: type[openai.APIStatusError]) -> None:
    err = _fail(gateway, status)
    assert isinstance(err, cls) and err.status_code == status
    assert isinstance(err.body, dict) and err.body["message"] == _sim_message(status)
    assert _record_status(gateway, err) == status


def test_stream_refused_by_the_backend_is_openai_shaped(gateway: Gateway) -> None:
    err = _fail(gateway, 400, stream=True)
    assert isinstance(err, openai.BadRequestError)
    assert isinstance(err.body, dict) and err.body["message"] == _sim_message(400)
    assert _record_status(gateway, err) == 400


@pytest.mark.parametrize("status", [500, 503])
def test_backend_5xx_is_a_502_upstream_error(gateway: Gateway, status: int) -> None:
    """503 is retried by Envoy first (before anything was generated); the last answer
    is the one the client sees and the record keeps."""
    err = _fail(gateway, status)
    assert isinstance(err, openai.InternalServerError)
    assert err.status_code == 502
    assert isinstance(err.body, dict)
    assert (err.body["code"], err.body["type"]) == ("upstream_error", "server_error")
    assert err.body["message"] == f"The backend failed (HTTP {status}): {_sim_message(status)}"
    assert _record_status(gateway, err) == status


def test_raw_http_error_body_is_whole_json(gateway: Gateway) -> None:
    """Envoy streams the body to ext_proc without content-length, so the rewritten
    (longer) body arrives whole, chunked over HTTP/1.1."""
    req = urllib.request.Request(
        f"{gateway.base_url}/v1/completions", method="POST",
        data=json.dumps({"model": "demo", "prompt": "hi", "max_tokens": 3}).encode(),
        headers={"authorization": f"Bearer {SECRET}", "content-type": "application/json",
                 "x-sim-status": "500"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 502
    assert e.value.headers.get("content-length") is None
    body: dict[str, Any] = json.loads(e.value.read())
    assert body["error"]["code"] == "upstream_error"


def test_gateway_refusals_are_untouched(gateway: Gateway) -> None:
    """Only a backend's answers are rewritten: the gateway's own 404 keeps its code."""
    with pytest.raises(openai.NotFoundError) as e:
        gateway.client().chat.completions.create(model="nope", messages=MESSAGES)
    assert isinstance(e.value.body, dict) and e.value.body["code"] == "model_not_found"
