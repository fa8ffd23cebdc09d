"""Through the real Envoy, with the official openai SDK as the client."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import httpx
import openai
import pytest

from authz.sim.tokens import prompt_tokens_chat, prompt_tokens_completion
from authz.state.usage.records import USAGE_FILE, read_records
from policy.config import load_config
from policy.endpoints import lookup
from policy.request import parse_request
from policy.stream_pace import ABORT_STEPS
from tests.e2e.conftest import Gateway
from tests.helpers import LIMITED_SECRET, SECRET

pytestmark = pytest.mark.e2e
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello to the gateway, please."}]


def records_for(gw: Gateway, request_id: str) -> list[dict[str, Any]]:
    """The records of one request, waiting briefly for the end-of-request write."""
    deadline = time.monotonic() + 5
    while True:
        got = [r for r in read_records(gw.data_dir / USAGE_FILE)
               if r["request_id"] == request_id]
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def last_upstream(gw: Gateway) -> dict[str, Any]:
    reqs = gw.upstream_requests()
    assert reqs, "the upstream received nothing"
    return reqs[-1]


def test_chat_non_streaming_exact_usage_and_one_record(gateway: Gateway) -> None:
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, max_tokens=7)
    resp = raw.parse()
    expected_prompt = prompt_tokens_chat(MESSAGES)
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (expected_prompt, 7)
    assert resp.choices[0].message.content
    rid = raw.headers["x-request-id"]
    [rec] = records_for(gateway, rid)
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (expected_prompt, 7)
    assert rec["estimated"] is False and rec["stream"] is False and rec["status"] == 200
    assert (rec["key_id"], rec["org"], rec["model"], rec["upstream_model"]) == (
        "k-main", "acme", "demo", "tiny-llama")
    assert rec["backend"] == gateway.sim_url


def test_chat_streaming_hides_the_usage_chunk_it_added(gateway: Gateway) -> None:
    stream = gateway.client().chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, max_tokens=12, stream=True)
    rid = stream.headers["x-request-id"]
    chunks = list(stream.parse())
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 12
    # The upstream was asked for usage even though the client was not.
    sent = json.loads(last_upstream(gateway)["body"])
    assert sent["stream_options"]["include_usage"] is True
    [rec] = records_for(gateway, rid)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"]) == (
        prompt_tokens_chat(MESSAGES), 12, False)
    assert rec["stream"] is True


def test_chat_streaming_with_usage_requested(gateway: Gateway) -> None:
    chunks = list(gateway.client().chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=5, stream=True,
        stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens_chat(MESSAGES), 5)


def test_completions_json_and_stream(gateway: Gateway) -> None:
    client = gateway.client()
    prompt = "Once upon a time,"
    resp = client.completions.create(model="demo", prompt=prompt, max_tokens=4)
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (
        prompt_tokens_completion(prompt), 4)
    raw = client.completions.with_raw_response.create(
        model="demo", prompt=prompt, max_tokens=6, stream=True)
    rid = raw.headers["x-request-id"]
    chunks = list(raw.parse())
    assert "".join(c.choices[0].text for c in chunks if c.choices).count(" ") == 5
    [rec] = records_for(gateway, rid)
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (
        prompt_tokens_completion(prompt), 6)
    assert rec["endpoint"] == "completions"


def test_models_lists_the_aliases_of_the_key(gateway: Gateway) -> None:
    assert sorted(m.id for m in gateway.client().models.list()) == ["demo", "other"]
    assert [m.id for m in gateway.client(LIMITED_SECRET).models.list()] == ["demo"]


def test_no_key_and_wrong_key_are_openai_401s(gateway: Gateway) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        gateway.client("sk-tb-wrong").chat.completions.create(model="demo", messages=MESSAGES)
    assert e.value.status_code == 401
    assert e.value.code == "invalid_api_key"
    # The SDK will not send an empty key; a bare HTTP client can.
    status, body = post(gateway, "/v1/chat/completions", b"{}", {})
    assert status == 401
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert "No API key" in json.loads(body)["error"]["message"]


def test_model_errors(gateway: Gateway) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        gateway.client().chat.completions.create(model="nope", messages=MESSAGES)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.PermissionDeniedError) as pd:
        gateway.client(LIMITED_SECRET).chat.completions.create(model="other", messages=MESSAGES)
    assert pd.value.code == "model_not_allowed"
    with pytest.raises(openai.BadRequestError) as br:
        gateway.client().chat.completions.create(model="demo", messages=MESSAGES,
                                                 max_tokens=100000)
    assert br.value.code == "invalid_request"
    assert br.value.param == "max_tokens"


def post(gw: Gateway, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    req = urllib.request.Request(f"{gw.base_url}{path}", data=body, method="POST",
                                 headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_upstream_never_sees_the_key_and_internal_headers_are_trusted(gateway: Gateway) -> None:
    body = json.dumps({"model": "demo", "messages": MESSAGES, "max_tokens": 2}).encode()
    status, _ = post(gateway, "/v1/chat/completions", body, {
        "x-api-key": SECRET,
        "x-tokenbooth-org": "spoofed-org",
        "x-tokenbooth-key-id": "spoofed-key",
        "x-tokenbooth-cluster": "tokenbooth_services",
        "x-tokenbooth-anything": "spoofed",
    })
    assert status == 200
    up = last_upstream(gateway)
    headers = up["headers"]
    assert "x-api-key" not in headers and "authorization" not in headers
    assert headers["x-tokenbooth-org"] == "acme"
    assert headers["x-tokenbooth-key-id"] == "k-main"
    assert "x-tokenbooth-anything" not in headers and "x-tokenbooth-cluster" not in headers
    assert SECRET not in json.dumps(up)
    assert json.loads(up["body"])["model"] == "tiny-llama"


def _raw_exchange(gw: Gateway, raw: bytes) -> bytes:
    """What the listener answers to `raw` within 5 s (the head and the body it sends)."""
    host, port = gw.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(raw)
        got = b""
        while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    return got


@pytest.mark.parametrize("key", [True, False])
def test_connect_is_refused_at_once(gateway: Gateway, key: bool) -> None:
    """A client that takes the gateway for a forward proxy gets an OpenAI-shaped 405 at
    once, key or not (the buffer filters waited for its never-ending body until the idle
    timeout, 300 s), and nothing reaches a backend."""
    gateway.clear_upstream()
    auth = f"Authorization: Bearer {SECRET}\r\n" if key else ""
    t0 = time.monotonic()
    got = _raw_exchange(gateway, (f"CONNECT api.openai.com:443 HTTP/1.1\r\n"
                                  f"Host: api.openai.com:443\r\n{auth}\r\n").encode())
    assert time.monotonic() - t0 < 4
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 "), got
    assert json.loads(body)["error"]["code"] == "method_not_allowed"
    assert gateway.upstream_requests() == []


@pytest.mark.parametrize(("request_line", "status", "code", "allow"), [
    ("BREW /v1/models", 405, "method_not_allowed", "GET, HEAD"),
    ("PURGE /v1/chat/completions", 405, "method_not_allowed", "POST"),
    ("FOO /nope", 404, "not_found", None),
    # Methods are case-sensitive (RFC 9110): `post` was admitted, charged and forwarded
    # as sent, and vLLM answered its own 400.
    ("post /v1/chat/completions", 405, "method_not_allowed", "POST"),
    ("get /v1/models", 405, "method_not_allowed", "GET, HEAD"),
])
def test_a_method_http_does_not_name_gets_an_openai_shaped_answer(
        gateway: Gateway, request_line: str, status: int, code: str, allow: str | None) -> None:
    """A method HTTP does not define (WebDAV's, a cache's PURGE, a typo) is read like any
    other: the path's 405 with `Allow`, or its 404. Envoy's HTTP/1 parser refused it
    before the routes: a text/plain 400 whose chunked body the closed connection cut
    short (clients read "incomplete chunked read"). Nothing reaches a backend."""
    gateway.clear_upstream()
    got = _raw_exchange(gateway, (f"{request_line} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                  f"Authorization: Bearer {SECRET}\r\n\r\n").encode())
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), got
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    assert headers.get("allow") == allow
    if headers.get("transfer-encoding") == "chunked":
        body = body.split(b"\r\n")[1]
    assert json.loads(body)["error"]["code"] == code
    assert gateway.upstream_requests() == []


def test_a_client_trickling_its_headers_gets_an_openai_shaped_408(gateway: Gateway) -> None:
    """A slowloris client holds a connection no longer than the headers' timeout (10 s):
    then an OpenAI-shaped 408, and nothing was admitted."""
    from authz.envoy_config.common import REQUEST_HEADERS_TIMEOUT_S

    t0 = time.monotonic()
    host, port = gateway.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=REQUEST_HEADERS_TIMEOUT_S + 10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never ends
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    waited = time.monotonic() - t0
    assert REQUEST_HEADERS_TIMEOUT_S - 1 < waited < REQUEST_HEADERS_TIMEOUT_S + 5
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), got
    chunked = body.split(b"\r\n")[1]  # the one chunk of a chunked body
    assert json.loads(chunked)["error"]["code"] == "request_timeout"


def test_a_clients_vllm_scheduling_headers_never_reach_the_backend(gateway: Gateway) -> None:
    """vLLM reads a request's scheduling priority from `X-Vllm-Priority` before the body's
    `priority` (which the gateway refuses), and its data-parallel rank from
    `X-data-parallel-rank`: one tenant's requests would jump the backend's queue, or
    pick its rank (one out of range is vLLM's 400 after the hold); nor may it ask for the
    backend's ORCA load report (`endpoint-load-metrics-format`)."""
    body = json.dumps({"model": "demo", "messages": MESSAGES, "max_tokens": 2}).encode()
    status, _ = post(gateway, "/v1/chat/completions", body, {
        "authorization": f"Bearer {SECRET}", "X-Vllm-Priority": "-1000",
        "X-data-parallel-rank": "7", "endpoint-load-metrics-format": "json"})
    assert status == 200
    headers = last_upstream(gateway)["headers"]
    assert not {"x-vllm-priority", "x-data-parallel-rank",
                "endpoint-load-metrics-format"} & set(headers)


def test_a_client_cannot_name_another_address_to_the_backend(gateway: Gateway) -> None:
    """Security and TLS testers: `x-real-ip` and `forwarded` reached the backend as the
    client wrote them. They are dropped; x-forwarded-for ends with the real peer, which
    Envoy (the edge) appends, where a proxy-aware backend reads it."""
    body = json.dumps({"model": "demo", "messages": MESSAGES, "max_tokens": 2}).encode()
    status, _ = post(gateway, "/v1/chat/completions", body, {
        "authorization": f"Bearer {SECRET}", "x-real-ip": "6.6.6.6",
        "forwarded": "for=6.6.6.6", "x-client-ip": "6.6.6.6", "true-client-ip": "6.6.6.6",
        "x-forwarded-for": "6.6.6.6"})
    assert status == 200
    headers = last_upstream(gateway)["headers"]
    assert not {"x-real-ip", "forwarded", "x-client-ip", "true-client-ip"} & set(headers)
    # Envoy appends the peer (for a loopback one, as here, this machine's own address).
    xff = [a.strip() for a in headers["x-forwarded-for"].split(",")]
    assert len(xff) == 2 and xff[0] == "6.6.6.6" and xff[-1] != "6.6.6.6", headers


def test_credentials_in_other_conventions_and_underscored_headers_stay_here(
        gateway: Gateway) -> None:
    """A client's key where other SDKs put theirs (Azure's `api-key`, Google's, a proxy's
    credentials, a cookie) never reaches the backend; `X_Tokenbooth_Org` (which a CGI or
    WSGI backend reads as `x-tokenbooth-org`) is dropped; the backend gets the JSON the
    gateway wrote as application/json, whatever the client named; a query (where a
    client may put its key) reaches neither the backend nor Envoy's access log."""
    body = json.dumps({"model": "demo", "messages": MESSAGES, "max_tokens": 2}).encode()
    status, _ = post(gateway, "/v1/chat/completions?api-key=query-marker-0451", body, {
        "authorization": f"Bearer {SECRET}",
        "api-key": SECRET, "x-goog-api-key": SECRET, "cookie": f"key={SECRET}",
        "proxy-authorization": f"Bearer {SECRET}",
        "X_Tokenbooth_Org": "spoofed-org", "x_tokenbooth_key_id": "spoofed-key",
        "content-type": "text/plain",
    })
    assert status == 200
    up = last_upstream(gateway)
    assert (up["path"], up["query"]) == ("/v1/chat/completions", "")  # no query upstream
    headers = up["headers"]
    assert not {"api-key", "x-goog-api-key", "cookie", "proxy-authorization"} & set(headers)
    assert not [h for h in headers if "_" in h], headers
    assert headers["x-tokenbooth-org"] == "acme"
    assert headers["content-type"] == "application/json"
    def logs() -> dict[str, str]:
        return {f.name: f.read_text(errors="replace") for f in gateway.logs.iterdir()}

    # Envoy writes its access log line after the response (and flushes it in time).
    deadline = time.monotonic() + 10
    while not any("query-marker" in t or '"path":"/v1/chat/completions"' in t
                  for t in logs().values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any('"path":"/v1/chat/completions"' in t for t in logs().values())
    for name, text in logs().items():
        assert SECRET not in text and "query-marker-0451" not in text, name


def test_bad_json_is_a_400_and_leaves_no_record(gateway: Gateway) -> None:
    before = len(list(read_records(gateway.data_dir / USAGE_FILE)))
    status, body = post(gateway, "/v1/chat/completions", b"{nope",
                        {"authorization": f"Bearer {SECRET}"})
    assert status == 400
    assert json.loads(body)["error"]["code"] == "invalid_request"
    time.sleep(0.2)
    assert len(list(read_records(gateway.data_dir / USAGE_FILE))) == before


def test_upstream_error_is_passed_through_and_recorded(gateway: Gateway) -> None:
    with pytest.raises(openai.InternalServerError):
        gateway.client().chat.completions.create(
            model="demo", messages=MESSAGES, extra_headers={"x-sim-status": "500"})


def test_cut_stream_is_recorded_as_estimated(gateway: Gateway) -> None:
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, max_tokens=50, stream=True,
        # Slow enough that the client has the headers before the backend dies.
        extra_headers={"x-sim-cut-after": "3", "x-sim-tpot-ms": "50"})
    rid = raw.headers["x-request-id"]
    with pytest.raises(openai.APIError):
        list(raw.parse())
    [rec] = records_for(gateway, rid)
    assert rec["estimated"] is True
    # The chunks seen, and the moment between the last and the cut at the stream's pace
    # (a step or two), and the steps vLLM takes before its abort lands.
    assert 3 <= rec["completion_tokens"] <= 5 + ABORT_STEPS
    assert rec["prompt_tokens"] > 0


def _requests_with_status(gw: Gateway, status: int) -> float:
    """inference_requests_total of the demo model's chat requests with `status`."""
    with urllib.request.urlopen(f"{gw.side_url}/metrics", timeout=5) as r:
        text = r.read().decode()
    want = f'status="{status}"'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("inference_requests_total{") and want in line
               and 'model="demo"' in line and 'endpoint="chat"' in line)


def test_a_stream_that_ends_in_an_error_event_is_recorded_as_failed(
        gateway: Gateway) -> None:
    """vLLM ends a stream whose generation failed with an error event after its chunks
    (`{"error": {..., "code": 500}}`, then `[DONE]`): its record said 200, a success. It
    says the event's status, 500 (so does inference_requests_total), and is charged as a
    cut stream: the chunks seen, estimated, the prompt by the backend's /tokenize."""
    before = _requests_with_status(gateway, 500)
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, max_tokens=50, stream=True,
        extra_headers={"x-sim-error-after": "3"})
    rid = raw.headers["x-request-id"]
    with pytest.raises(openai.APIError, match="Internal server error"):
        list(raw.parse())  # the client got the event: the SDK raises it
    [rec] = records_for(gateway, rid)
    assert (rec["status"], rec["estimated"], rec["prompt_tokens"],
            rec["completion_tokens"]) == (500, True, prompt_tokens_chat(MESSAGES), 3), rec
    assert _requests_with_status(gateway, 500) == before + 1


def test_a_stream_the_backend_refuses_in_its_first_event_costs_nothing(
        gateway: Gateway) -> None:
    """vLLM validates a structured-output grammar once the stream began: a 200 whose first
    event is a 400 error (then [DONE]), nothing read or generated. It was charged its
    prompt as a cut stream, where the same body without `stream` is a 400 that costs
    nothing (an outside tester, against real vLLM). Now the same: status 400, no tokens."""
    body = {"structured_outputs": {"regex": "("}}
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, max_tokens=50, stream=True, extra_body=body)
    with pytest.raises(openai.APIError, match="Grammar error"):
        list(raw.parse())
    [rec] = records_for(gateway, raw.headers["x-request-id"])
    assert (rec["status"], rec["estimated"], rec["prompt_tokens"], rec["completion_tokens"],
            rec["cost_usd"]) == (400, False, 0, 0, "0"), rec
    with pytest.raises(openai.BadRequestError, match="Grammar error"):
        gateway.client().chat.completions.create(model="demo", messages=MESSAGES,
                                                 max_tokens=50, extra_body=body)
    # A batch is charged as a failed stream: vLLM starts every prompt at once, and the one
    # it refuses cancels the others, which it may have read by then.
    raw = gateway.client().completions.with_raw_response.create(
        model="demo", prompt=["a b c", "d e f"], max_tokens=5, stream=True, extra_body=body)
    with pytest.raises(openai.APIError, match="Grammar error"):
        list(raw.parse())
    [rec] = records_for(gateway, raw.headers["x-request-id"])
    assert (rec["status"], rec["estimated"]) == (400, True) and rec["prompt_tokens"] > 0, rec


def test_secret_never_leaks_anywhere(gateway: Gateway) -> None:
    """Logs, usage records, metrics and what the upstream received: no secret, ever."""
    client = gateway.client()
    client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=1)
    list(client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2,
                                        stream=True))
    post(gateway, "/v1/completions", b"{bad", {"x-api-key": SECRET})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with urllib.request.urlopen(f"{gateway.side_url}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    places = {
        "metrics": metrics,
        "upstream": json.dumps(gateway.upstream_requests()),
        "records": (gateway.data_dir / USAGE_FILE).read_text(),
        "keyring": "".join(p.read_text() for p in gateway.data_dir.glob("keys*")),
    }
    places.update({f.name: f.read_text(errors="replace") for f in gateway.logs.iterdir()})
    assert places["records"] and places["upstream"] != "[]"
    for where, text in places.items():
        assert SECRET not in text, f"the secret leaked into {where}"
        assert SECRET[6:] not in text, f"the secret's body leaked into {where}"


def test_metrics_side_port(gateway: Gateway) -> None:
    with urllib.request.urlopen(f"{gateway.side_url}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'inference_requests_total{endpoint="chat",model="demo",status="200"}' in text
    assert "tokenbooth_decision_seconds_bucket" in text


def test_clients_cannot_choose_the_request_id(gateway: Gateway) -> None:
    """Records and limit holds are keyed by x-request-id: Envoy, at the edge, makes its own."""
    body = json.dumps({"model": "demo", "messages": MESSAGES, "max_tokens": 1}).encode()
    ids = set()
    for _ in range(2):
        req = urllib.request.Request(
            f"{gateway.base_url}/v1/chat/completions", data=body, method="POST",
            headers={"content-type": "application/json", "authorization": f"Bearer {SECRET}",
                     "x-request-id": "chosen-by-client"})
        with urllib.request.urlopen(req, timeout=10) as r:
            ids.add(r.headers["x-request-id"])
    assert "chosen-by-client" not in ids and len(ids) == 2


def test_post_without_a_body_is_an_openai_400(gateway: Gateway) -> None:
    """ext_proc is sent nothing for a bodiless request; Envoy's reply says why."""
    req = urllib.request.Request(f"{gateway.base_url}/v1/chat/completions", data=b"",
                                 method="POST", headers={"authorization": f"Bearer {SECRET}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400
    assert err.value.headers["content-type"] == "application/json"
    body = json.loads(err.value.read())["error"]
    assert body["code"] == "invalid_request" and "request body" in body["message"]


def test_a_body_at_the_size_limit_is_served(gateway: Gateway) -> None:
    """The rewrite lengthens the body a little (stream_options, the upstream model name);
    a body the client sent within the limit must not be refused after admission."""
    limit = load_config(gateway.config_path).max_request_body_bytes
    base = {"model": "demo", "max_tokens": 1, "stream": True,
            "messages": [{"role": "user", "content": ""}]}
    pad = limit - len(json.dumps(base).encode())
    base["messages"][0]["content"] = "a" * pad  # one long word: a few tokens for the sim
    body = json.dumps(base).encode()
    assert len(body) == limit
    req = urllib.request.Request(f"{gateway.base_url}/v1/chat/completions", data=body,
                                 headers={"authorization": f"Bearer {SECRET}",
                                          "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
        assert r.read().endswith(b"data: [DONE]\n\n")
    sent = json.loads(last_upstream(gateway)["body"])
    assert sent["stream_options"] == {"include_usage": True}  # longer than what was sent


def _raw_post(gw: Gateway, path: str, body: bytes, extra: list[tuple[str, bytes]]
              ) -> tuple[int, bytes]:
    """A POST with header values as raw bytes (urllib would encode them)."""
    host, port = gw.base_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("POST", path)
        for name, value in [(b"content-type", b"application/json"),
                            (b"authorization", f"Bearer {SECRET}".encode()),
                            (b"content-length", str(len(body)).encode()),
                            *[(n.encode(), v) for n, v in extra]]:
            conn.putheader(name, value)
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@pytest.mark.parametrize("trace", [b"\xff\xfe", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-\xff1",
                                   b"not a trace", b"00-" + b"0" * 31 + b"1-" + b"1" * 16 + b"-01"])
def test_any_traceparent_is_served_and_a_malformed_one_dropped(gateway: Gateway,
                                                                trace: bytes) -> None:
    """ext_proc reads traceparent as an attribute: bytes that are not UTF-8 there failed
    the message's decoding (a 503 with retry-after for every such request)."""
    body = json.dumps({"model": "demo", "messages": MESSAGES, "max_tokens": 2}).encode()
    status, answer = _raw_post(gateway, "/v1/chat/completions", body, [("traceparent", trace)])
    assert status == 200, answer
    sent = last_upstream(gateway)["headers"].get("traceparent")
    valid = trace.startswith(b"00-0000")
    assert sent == (trace.decode() if valid else None)
    assert "DecodeError" not in (gateway.logs / "serve.log").read_text()


def test_a_gzipped_body_is_a_415_and_leaves_no_record(gateway: Gateway) -> None:
    body = json.dumps({"model": "demo", "messages": MESSAGES, "max_tokens": 2}).encode()
    before = len(list(read_records(gateway.data_dir / USAGE_FILE)))
    for sent in (gzip.compress(body), body):  # gzipped, or plain but labelled gzip
        status, answer = _raw_post(gateway, "/v1/chat/completions", sent,
                                   [("content-encoding", b"gzip")])
        assert status == 415, answer
        assert json.loads(answer)["error"]["code"] == "unsupported_media_type"
    assert len(list(read_records(gateway.data_dir / USAGE_FILE))) == before


def _leave_after(gw: Gateway, path: str, body: dict[str, Any], chunks: int = 2) -> str:
    """Stream `body`, read `chunks` content events, leave; the request id."""
    with httpx.stream("POST", f"{gw.base_url}{path}", json=body, timeout=30,
                      headers={"authorization": f"Bearer {SECRET}",
                               "x-sim-tpot-ms": "50"}) as r:
        rid = r.headers["x-request-id"]
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen += 1
                if seen > chunks:
                    break
    return rid


def test_a_cut_stream_is_charged_the_backends_count_of_its_prompt(gateway: Gateway) -> None:
    """A client that leaves before the usage chunk: the prompt is what the backend counts
    (its /tokenize), not ~4 bytes a token; text of a token a byte would otherwise be
    charged a quarter of its prompt."""
    messages = [{"role": "user", "content": " ".join(["a"] * 400)}]  # 400 tokens, 799 bytes
    rid = _leave_after(gateway, "/v1/chat/completions",
                       {"model": "demo", "messages": messages, "max_tokens": 40, "stream": True})
    [rec] = records_for(gateway, rid)
    assert rec["estimated"] is True and rec["status"] == 499
    assert rec["prompt_tokens"] == prompt_tokens_chat(messages) > 400
    # Token ids: counted as sent, with no call.
    rid = _leave_after(gateway, "/v1/completions",
                       {"model": "demo", "prompt": list(range(300)), "max_tokens": 40,
                        "stream": True})
    [rec] = records_for(gateway, rid)
    assert (rec["prompt_tokens"], rec["estimated"]) == (300, True)


def _raw(gw: Gateway, request: bytes) -> bytes:
    """Send raw bytes; everything Envoy answers until it closes."""
    host, port = gw.base_url.removeprefix("http://").rsplit(":", 1)
    answer = b""
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        while chunk := s.recv(65536):
            answer += chunk
    return answer


_HOST = b"Host: a\r\n"


@pytest.mark.parametrize(("line", "extra", "status", "reason"), [
    (b"GET /v1/models#frag HTTP/1.1", _HOST, b"400", b"path_normalization_failed"),
    (b"GET /v1/mo%00dels HTTP/1.1", _HOST, b"400", b"path_normalization_failed"),
    (b"GET /v1/models HTTP/1.1", _HOST + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
     b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
     b"403", b"upgrade_failed"),
    # HTTP/1.1 without Host (a hand-written client; HTTP/1.0 gets a default one).
    (b"POST /v1/chat/completions HTTP/1.1", b"Content-Length: 0\r\n", b"400",
     b"missing_host_header"),
    (b"OPTIONS * HTTP/1.1", _HOST + b"Connection: close\r\n", b"404",
     b"absolute_path_rejected"),
])
def test_requests_envoy_refuses_itself_get_openai_errors(gateway: Gateway, line: bytes,
                                                          extra: bytes, status: bytes,
                                                          reason: bytes) -> None:
    # (A refused request Envoy could read whole keeps its connection: asked to close.)
    close = b"" if b"Connection:" in extra else b"Connection: close\r\n"
    answer = _raw(gateway, line + b"\r\nAuthorization: Bearer "
                  + SECRET.encode() + b"\r\n" + extra + close + b"\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == status and b"content-type: application/json" in head
    if b"transfer-encoding: chunked" in head:  # one chunk, then the last
        body = body.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
    err = json.loads(body)["error"]
    assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_request")
    assert reason.decode() in err["message"]


def test_a_request_left_before_its_answer_is_charged_its_hold(gateway: Gateway) -> None:
    """A client's timeout on a non-streaming request: vLLM was generating the answer it
    writes only once whole (real vLLM had generated half of it at half the time), so the
    record is the hold, estimated: a client timing out on purpose paid its prompts alone,
    and its budget bounded nothing. No answer began: Envoy never said which backend."""
    messages = [{"role": "user", "content": " ".join(["b"] * 300)}]
    body = {"model": "demo", "messages": messages, "max_tokens": 40}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{gateway.base_url}/v1/chat/completions", timeout=1.0, json=body,
                   headers={"authorization": f"Bearer {SECRET}", "x-sim-tpot-ms": "300"})
    endpoint = lookup("POST", "/v1/chat/completions")
    assert endpoint is not None
    req = parse_request(json.dumps(body).encode(), endpoint, load_config(gateway.config_path))
    # Its prompt as the backend counts it (its /tokenize, as a cut stream's).
    counted = httpx.post(f"{gateway.sim_url}/tokenize", json={
        "model": "tiny-llama", "messages": messages}, timeout=10).json()["count"]
    assert 0 < counted < req.prompt_bound
    deadline = time.monotonic() + 10
    while True:
        recs = [r for r in read_records(gateway.data_dir / USAGE_FILE)
                if r["prompt_tokens"] == counted and r["status"] == 499
                and r["completion_tokens"] == 40]
        if recs or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    [rec] = recs
    assert rec["estimated"] is True and rec["stream"] is False and rec["backend"] == ""
    assert rec["completion_tokens"] == req.completion_bound == 40
