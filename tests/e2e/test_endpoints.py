"""The endpoint table through the real Envoy: embeddings, the Responses API, one model,
rerank / score, tokenize / detokenize and the refused audio uploads, driven with the
openai SDK (raw HTTP where it has no method), each with its exact usage record."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from decimal import Decimal
from typing import Any

import openai
import pytest

from authz.sim.responses_api import messages, template_fields
from authz.sim.tokens import count_tokens, output_text, prompt_tokens_chat
from tests.e2e.conftest import Gateway
from tests.e2e.test_gateway import last_upstream, records_for
from tests.e2e.test_limits import new_key
from tests.helpers import LIMITED_SECRET, SECRET

pytestmark = pytest.mark.e2e
PRICE_IN, PRICE_OUT = Decimal("0.50"), Decimal("1.50")  # demo's, per 1k tokens


def cost(prompt: int, completion: int = 0) -> str:
    return format(((prompt * PRICE_IN + completion * PRICE_OUT) / 1000).normalize(), "f")


def one_record(gw: Gateway, rid: str, prompt: int, completion: int, endpoint: str,
               stream: bool = False) -> dict[str, Any]:
    [rec] = records_for(gw, rid)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["total_tokens"]) == (
        prompt, completion, prompt + completion)
    assert (rec["endpoint"], rec["stream"], rec["estimated"], rec["status"]) == (
        endpoint, stream, False, 200)
    assert (rec["model"], rec["upstream_model"], rec["key_id"]) == ("demo", "tiny-llama",
                                                                    "k-main")
    assert rec["cost_usd"] == cost(prompt, completion)
    return rec


def post(gw: Gateway, path: str, body: Any, key: str = SECRET,
         raw: bytes | None = None, content_type: str = "application/json"
         ) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A raw request through Envoy: (status, JSON body, headers)."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"{gw.base_url}{path}", data=data, headers={
        "authorization": f"Bearer {key}", "content-type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


# -- embeddings --------------------------------------------------------------------------

def test_embeddings_with_the_sdk_record_prompt_tokens_only(gateway: Gateway) -> None:
    inputs = ["Hello, world!", "a b"]
    raw = gateway.client().embeddings.with_raw_response.create(
        model="demo", input=inputs, dimensions=8)
    emb = raw.parse()
    assert [len(d.embedding) for d in emb.data] == [8, 8]  # base64, decoded by the SDK
    assert (emb.usage.prompt_tokens, emb.usage.total_tokens) == (6, 6)
    sent = json.loads(last_upstream(gateway)["body"])
    assert (sent["model"], sent["encoding_format"], sent["dimensions"]) == (
        "tiny-llama", "base64", 8)
    assert "stream_options" not in sent and "max_tokens" not in sent
    one_record(gateway, raw.headers["x-request-id"], 6, 0, "embeddings")


def test_embeddings_token_ids_and_bad_bodies(gateway: Gateway) -> None:
    emb = gateway.client().embeddings.create(model="demo", input=[[1, 2, 3], [4]],
                                             encoding_format="float")
    assert emb.usage.prompt_tokens == 4
    with pytest.raises(openai.BadRequestError) as e:
        gateway.client().embeddings.create(model="demo", input=[],
                                           encoding_format="float")
    assert e.value.code == "invalid_request" and e.value.param == "input"


# -- the Responses API -----------------------------------------------------------------

RESPONSE_BODY: dict[str, Any] = {
    "instructions": "Be brief.",
    "input": [{"role": "user", "content": "Say hello to the gateway, please."}],
    "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}],
}
PROMPT = prompt_tokens_chat(messages(RESPONSE_BODY), template_fields(RESPONSE_BODY))


def test_responses_non_streaming_exact_usage(gateway: Gateway) -> None:
    raw = gateway.client().responses.with_raw_response.create(
        model="demo", max_output_tokens=7, **RESPONSE_BODY)
    resp = raw.parse()
    assert resp.output_text == output_text(7)
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (PROMPT, 7)
    sent = json.loads(last_upstream(gateway)["body"])
    assert (sent["model"], sent["max_output_tokens"]) == ("tiny-llama", 7)
    one_record(gateway, raw.headers["x-request-id"], PROMPT, 7, "responses")


def test_responses_streaming_passes_every_event_and_meters_completed(
        gateway: Gateway) -> None:
    stream = gateway.client().responses.with_raw_response.create(
        model="demo", stream=True, max_output_tokens=6, **RESPONSE_BODY)
    rid = stream.headers["x-request-id"]
    events = list(stream.parse())
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == output_text(6)
    assert events[-1].response.usage is not None  # the client always gets the usage
    assert events[-1].response.usage.input_tokens == PROMPT
    sent = json.loads(last_upstream(gateway)["body"])
    assert "stream_options" not in sent
    one_record(gateway, rid, PROMPT, 6, "responses", stream=True)


def test_responses_without_a_limit_get_the_cap_written_upstream(gateway: Gateway) -> None:
    resp = gateway.client().responses.create(model="demo", input="hi")
    assert resp.usage is not None and resp.usage.output_tokens == 256  # demo's max_tokens
    assert json.loads(last_upstream(gateway)["body"])["max_output_tokens"] == 256


@pytest.mark.parametrize(("extra", "param"), [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search_preview"}]}, "tools[0]"),
])
def test_responses_refusals_name_the_field(gateway: Gateway, extra: dict[str, Any],
                                           param: str) -> None:
    gateway.clear_upstream()
    with pytest.raises(openai.BadRequestError) as e:
        gateway.client().responses.create(model="demo", input="hi", **extra)
    assert e.value.param == param
    assert gateway.upstream_requests() == []


# -- GET /v1/models/{id} ---------------------------------------------------------------

def test_models_retrieve(gateway: Gateway) -> None:
    model = gateway.client().models.retrieve("demo")
    assert (model.id, model.object, model.owned_by) == ("demo", "model", "tokenbooth")
    for key, alias in ((SECRET, "nope"), (LIMITED_SECRET, "other")):
        with pytest.raises(openai.NotFoundError) as e:
            gateway.client(key).models.retrieve(alias)
        assert e.value.code == "model_not_found"
    assert gateway.client(LIMITED_SECRET).models.retrieve("demo").id == "demo"


# -- rerank, score, tokenize -----------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_rerank_raw_http_exact_record(gateway: Gateway, path: str) -> None:
    docs = ["the sky is blue", "cats", "blue sky"]
    status, body, headers = post(gateway, path, {"model": "demo", "query": "blue sky",
                                                 "documents": docs, "top_n": 2})
    assert status == 200 and [r["index"] for r in body["results"]] == [0, 2]
    want = sum(count_tokens("blue sky") + 1 + count_tokens(d) for d in docs)
    assert body["usage"]["prompt_tokens"] == want
    one_record(gateway, headers["x-request-id"], want, 0, "rerank")


@pytest.mark.parametrize("path", ["/v1/score", "/score"])
def test_score_raw_http_exact_record(gateway: Gateway, path: str) -> None:
    status, body, headers = post(gateway, path, {"model": "demo", "queries": "a b",
                                                 "documents": ["a", "c d e"]})
    assert status == 200 and len(body["data"]) == 2
    want = (2 + 1 + 1) + (2 + 1 + 3)
    one_record(gateway, headers["x-request-id"], want, 0, "score")


def test_tokenize_and_detokenize_are_counted_as_requests_only(gateway: Gateway) -> None:
    status, body, headers = post(gateway, "/tokenize", {"model": "demo",
                                                        "prompt": "Hello, world!"})
    assert status == 200 and body["count"] == 4
    assert json.loads(last_upstream(gateway)["body"])["model"] == "tiny-llama"
    one_record(gateway, headers["x-request-id"], 0, 0, "tokenize")
    status, body, headers = post(gateway, "/detokenize", {"model": "demo",
                                                          "tokens": [0, 1]})
    assert status == 200 and body["prompt"]
    one_record(gateway, headers["x-request-id"], 0, 0, "detokenize")


def test_audio_uploads_are_refused_naming_the_file(gateway: Gateway) -> None:
    gateway.clear_upstream()
    with pytest.raises(openai.BadRequestError) as e:
        gateway.client().audio.transcriptions.create(model="demo",
                                                     file=("a.wav", b"RIFF0000WAVE"))
    assert (e.value.code, e.value.param) == ("invalid_request", "file")
    assert "not supported through the gateway" in str(e.value.message)
    assert gateway.upstream_requests() == []


# -- keys: the allow-list and the budget -------------------------------------------------

def test_a_key_lacking_the_model_gets_403_on_every_endpoint(gateway: Gateway) -> None:
    client = gateway.client(LIMITED_SECRET)  # may use `demo` only
    calls = [
        lambda: client.embeddings.create(model="other", input="x"),
        lambda: client.responses.create(model="other", input="x"),
    ]
    for call in calls:
        with pytest.raises(openai.PermissionDeniedError) as e:
            call()
        assert e.value.code == "model_not_allowed"
    for path, body in (("/v1/rerank", {"query": "q", "documents": ["d"]}),
                       ("/tokenize", {"prompt": "x"})):
        status, err, _ = post(gateway, path, {"model": "other", **body}, LIMITED_SECRET)
        assert (status, err["error"]["code"]) == (403, "model_not_allowed")


def test_over_budget_is_429_insufficient_quota(gateway: Gateway) -> None:
    # $0.01 at $0.50/1k: a one-word embedding fits (13 tokens held, 1 used); a longer
    # input's hold (208 tokens), a response's or a rerank pair's (the template allowance)
    # do not.
    key, _key_id = new_key(gateway, "--budget", "0.01", "--budget-period", "total")
    client = gateway.client(key)
    assert client.embeddings.create(model="demo", input="hello").usage.prompt_tokens == 1
    for call in (lambda: client.embeddings.create(model="demo", input="x " * 100),
                 lambda: client.responses.create(model="demo", input="hi",
                                                 max_output_tokens=1)):
        with pytest.raises(openai.RateLimitError) as e:
            call()
        assert e.value.code == "insufficient_quota"
    status, err, _ = post(gateway, "/rerank", {"model": "demo", "query": "q",
                                               "documents": ["d"]}, key)
    assert (status, err["error"]["code"]) == (429, "insufficient_quota")
