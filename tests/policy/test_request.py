"""Request validation and the upstream rewrite."""

from __future__ import annotations

import json

import pytest

from policy.config import parse_config
from policy.endpoints import ENDPOINTS, Kind, lookup
from policy.errors import ApiError
from policy.request import models_list, parse_request, upstream_body
from tests.helpers import policy_dict

CFG = parse_config(policy_dict("http://127.0.0.1:8000"))
CHAT_EP = ENDPOINTS[("POST", "/v1/chat/completions")]
COMP_EP = ENDPOINTS[("POST", "/v1/completions")]


def parse(body: object, ep: object = CHAT_EP) -> object:
    return parse_request(json.dumps(body).encode(), ep, CFG)  # type: ignore[arg-type]


def error_of(body: object, ep: object = CHAT_EP) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse(body, ep)
    return e.value


MSG = [{"role": "user", "content": "hi"}]


def test_defaults_and_reservation_ceiling() -> None:
    r = parse({"model": "demo", "messages": MSG})
    assert r.stream is False and r.max_tokens == 256 and r.prompt_estimate > 0  # type: ignore[attr-defined]
    r = parse({"model": "demo", "messages": MSG, "max_completion_tokens": 7, "max_tokens": 9})
    assert r.max_tokens == 7  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": MSG}, 400, "model"),
        ({"model": 3, "messages": MSG}, 400, "model"),
        ({"model": "zzz", "messages": MSG}, 404, "model"),
        ({"model": "demo"}, 400, "messages"),
        ({"model": "demo", "messages": [{"content": "x"}]}, 400, "messages[0]"),
        ({"model": "demo", "messages": [{"role": "user", "content": 5}]}, 400,
         "messages[0].content"),
        ({"model": "demo", "messages": MSG, "max_tokens": "5"}, 400, "max_tokens"),
        ({"model": "demo", "messages": MSG, "max_tokens": True}, 400, "max_tokens"),
        ({"model": "demo", "messages": MSG, "max_completion_tokens": 0}, 400,
         "max_completion_tokens"),
        ({"model": "demo", "messages": MSG, "stream_options": []}, 400, "stream_options"),
        ({"model": "demo", "messages": MSG, "stream_options": {"include_usage": 1}}, 400,
         "stream_options.include_usage"),
    ],
)
def test_bad_chat_bodies(body: object, status: int, param: str) -> None:
    e = error_of(body)
    assert (e.status, e.param) == (status, param)
    assert json.loads(e.body())["error"]["param"] == param


def test_completion_prompt_shapes() -> None:
    for prompt in ("hi", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        parse({"model": "demo", "prompt": prompt}, COMP_EP)
    for prompt in (None, 5, [], [1, "a"], {"x": 1}):
        assert error_of({"model": "demo", "prompt": prompt}, COMP_EP).param == "prompt"


def test_body_limits() -> None:
    cfg = CFG.model_copy(update={"max_request_body_bytes": 1024})
    with pytest.raises(ApiError) as e:
        parse_request(b" " * 1025, CHAT_EP, cfg)
    assert e.value.status == 413 and e.value.code == "request_too_large"
    for raw in (b"{", b"[]", b'"x"'):
        with pytest.raises(ApiError) as e:
            parse_request(raw, CHAT_EP, CFG)
        assert e.value.status == 400


def test_upstream_body_rewrites_model_and_forces_usage_in_streams() -> None:
    r = parse({"model": "demo", "messages": MSG, "stream": True,
               "stream_options": {"include_usage": False, "continuous_usage_stats": False},
               "temperature": 0})
    out = json.loads(upstream_body(r))  # type: ignore[arg-type]
    assert out["model"] == "tiny-llama" and out["temperature"] == 0
    assert out["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
    assert r.client_wants_usage is False  # type: ignore[attr-defined]
    r = parse({"model": "demo", "messages": MSG})
    assert "stream_options" not in json.loads(upstream_body(r))  # type: ignore[arg-type]


def test_endpoint_table() -> None:
    assert lookup("post", "/v1/chat/completions?x=1") is CHAT_EP
    assert lookup("GET", "/v1/models").kind is Kind.MODELS  # type: ignore[union-attr]
    assert lookup("GET", "/v1/chat/completions") is None
    assert {e.scope for e in ENDPOINTS.values()} == {"inference:read", "inference:write"}


def test_models_list_shape() -> None:
    body = json.loads(models_list(["a", "b"], 5))
    assert body == {"object": "list", "data": [
        {"id": "a", "object": "model", "created": 5, "owned_by": "tokenbooth"},
        {"id": "b", "object": "model", "created": 5, "owned_by": "tokenbooth"}]}
