"""Request validation and the upstream rewrite."""

from __future__ import annotations

import json
from typing import Any

import pytest

from policy.config import MAX_PRICE_PER_1K, Config, Price, parse_config
from policy.endpoints import ENDPOINTS, Endpoint, Kind, lookup
from policy.errors import ApiError
from policy.limits import cost_nano
from policy.request import (
    InferenceRequest,
    model_object,
    models_list,
    parse_request,
    upstream_body,
)
from tests.helpers import policy_dict

CFG = parse_config(policy_dict("http://127.0.0.1:8000"))
CHAT_EP = ENDPOINTS[("POST", "/v1/chat/completions")]
COMP_EP = ENDPOINTS[("POST", "/v1/completions")]
RESP_EP = ENDPOINTS[("POST", "/v1/responses")]


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
    # vLLM reads max_completion_tokens alone then: a max_tokens past the model's cap
    # (256) does not matter (vLLM answered 200 where this was a 400), a non-integer does.
    r = parse({"model": "demo", "messages": MSG, "max_completion_tokens": 3,
               "max_tokens": 100_000})
    assert r.max_tokens == 3  # type: ignore[attr-defined]
    e = error_of({"model": "demo", "messages": MSG, "max_completion_tokens": 3,
                  "max_tokens": "nine"}, CHAT_EP)
    assert (e.status, e.param) == (400, "max_tokens")


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
        ({"model": "demo", "messages": MSG, "max_tokens": "five"}, 400, "max_tokens"),
        ({"model": "demo", "messages": MSG, "max_tokens": 5.5}, 400, "max_tokens"),
        ({"model": "demo", "messages": MSG, "n": "2.5"}, 400, "n"),
        ({"model": "demo", "messages": MSG, "stream": "maybe"}, 400, "stream"),
        ({"model": "demo", "messages": MSG, "max_completion_tokens": 0}, 400,
         "max_completion_tokens"),
        ({"model": "demo", "messages": MSG, "stream_options": []}, 400, "stream_options"),
        ({"model": "demo", "messages": MSG, "stream_options": {"include_usage": 2}}, 400,
         "stream_options.include_usage"),
        # vLLM reads these as false: reasoning hidden where the gateway saw none.
        ({"model": "demo", "messages": MSG, "include_reasoning": "false"}, 400,
         "include_reasoning"),
        ({"model": "demo", "messages": MSG, "include_reasoning": 0}, 400,
         "include_reasoning"),
    ],
)
def test_bad_chat_bodies(body: object, status: int, param: str) -> None:
    e = error_of(body)
    assert (e.status, e.param) == (status, param)
    assert json.loads(e.body())["error"]["param"] == param


def test_a_best_of_vllm_never_reads_is_served_as_absent() -> None:
    """vLLM 0.32 ignores `best_of` (chat and completions): `0` or `"x"` were 400s here."""
    for odd in (0, "0", "x", [2], -3):
        r = parse({"model": "demo", "messages": MSG, "best_of": odd})
        assert (r.best_of, r.sequences) == (0, 1)  # type: ignore[attr-defined]
    assert parse({"model": "demo", "messages": MSG, "best_of": "4",  # type: ignore[attr-defined]
                  "n": 2}).best_of == 4


def test_counts_and_flags_are_read_as_vllm_reads_them_and_sent_as_read() -> None:
    """Real-vLLM tester: `max_tokens: 5.0` (a Python client's division), `"5"`, `n: "2"`,
    `stream: "true"` were 400s here and 200s at vLLM. They are read as vLLM reads them,
    and the backend gets the integers and booleans that were held; a null vLLM would
    refuse (`n`, `min_tokens` in completions) is left out, as good as absent."""
    r = parse({"model": "demo", "messages": MSG, "max_tokens": 5.0, "n": "2",
               "best_of": "3", "min_tokens": "1", "stream": "true",
               "stream_options": {"include_usage": "yes"}, "stream_interval": "1"})
    assert (r.max_tokens, r.sequences, r.best_of, r.stream,  # type: ignore[attr-defined]
            r.client_wants_usage) == (5, 2, 3, True, True)  # type: ignore[attr-defined]
    out = json.loads(upstream_body(r))  # type: ignore[arg-type]
    assert (out["max_tokens"], out["n"], out["best_of"], out["min_tokens"], out["stream"],
            out["stream_options"]["include_usage"], out["stream_interval"]) == (
        5, 2, 3, 1, True, True, 1)
    assert type(out["max_tokens"]) is int and type(out["n"]) is int
    r = parse({"model": "demo", "messages": MSG, "max_completion_tokens": "7",
               "max_tokens": "9", "stream": "false"})
    out = json.loads(upstream_body(r))  # type: ignore[arg-type]
    assert (r.max_tokens, out["max_completion_tokens"], out["max_tokens"],  # type: ignore[attr-defined]
            out["stream"]) == (7, 7, 9, False)
    # vLLM's check of stream_options reads the raw `"false"` as true, and serves it
    # without streaming: so here, the options left out (sent `false`, vLLM refuses them).
    r = parse({"model": "demo", "messages": MSG, "stream": "false",
               "stream_options": {"include_usage": True}})
    out = json.loads(upstream_body(r))  # type: ignore[arg-type]
    assert (r.stream, out["stream"], "stream_options" in out) == (False, False, False)  # type: ignore[attr-defined]
    assert error_of({"model": "demo", "messages": MSG, "stream": False,
                     "stream_options": {"include_usage": True}}).param == "stream_options"
    r = parse({"model": "demo", "prompt": "hi", "n": None, "min_tokens": None,
               "max_tokens": None}, COMP_EP)
    out = json.loads(upstream_body(r))  # type: ignore[arg-type]
    assert "n" not in out and "min_tokens" not in out and out["max_tokens"] == 16
    r = parse({"model": "demo", "prompt": "hi", "echo": True, "max_tokens": "0"}, COMP_EP)
    assert json.loads(upstream_body(r))["max_tokens"] == 0  # type: ignore[arg-type]
    r = parse({"model": "demo", "input": "hi", "max_output_tokens": "10"}, RESP_EP)
    assert json.loads(upstream_body(r))["max_output_tokens"] == 10  # type: ignore[arg-type]


def test_completion_prompt_shapes() -> None:
    for prompt in ("hi", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        parse({"model": "demo", "prompt": prompt}, COMP_EP)
    for bad in (None, 5, [], [1, "a"], {"x": 1}):
        assert error_of({"model": "demo", "prompt": bad}, COMP_EP).param == "prompt"


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
    # Usage in every chunk only for a client that asked for usage at all.
    assert out["stream_options"] == {"include_usage": True}
    assert r.client_wants_usage is False  # type: ignore[attr-defined]
    for mine in ({"continuous_usage_stats": True}, {"include_usage": False,
                                                     "continuous_usage_stats": True}):
        r = parse({"model": "demo", "messages": MSG, "stream": True, "stream_options": mine})
        assert json.loads(upstream_body(r))["stream_options"] == {  # type: ignore[arg-type]
            "include_usage": True}
    both = {"include_usage": True, "continuous_usage_stats": True}
    r = parse({"model": "demo", "messages": MSG, "stream": True, "stream_options": both})
    assert json.loads(upstream_body(r))["stream_options"] == both  # type: ignore[arg-type]
    r = parse({"model": "demo", "messages": MSG})
    assert "stream_options" not in json.loads(upstream_body(r))  # type: ignore[arg-type]


def test_endpoint_table() -> None:
    assert lookup("POST", "/v1/chat/completions?x=1") is CHAT_EP
    assert lookup("post", "/v1/chat/completions") is None  # methods are case-sensitive
    assert lookup("GET", "/v1/models").kind is Kind.MODELS  # type: ignore[union-attr]
    assert lookup("GET", "/v1/chat/completions") is None
    assert {e.scope for e in ENDPOINTS.values()} == {"inference:read", "inference:write"}


def test_models_list_shape() -> None:
    body = json.loads(models_list(["a", "b"], 5))
    assert body == {"object": "list", "data": [
        {"id": "a", "object": "model", "created": 5, "owned_by": "tokenbooth"},
        {"id": "b", "object": "model", "created": 5, "owned_by": "tokenbooth"}]}


# -- the hold: a true upper bound ------------------------------------------------------

def parsed(body: dict[str, Any], ep: Endpoint = CHAT_EP, cfg: Config = CFG) -> InferenceRequest:
    return parse_request(json.dumps(body).encode(), ep, cfg)


def test_every_multiplier_is_in_the_completion_bound() -> None:
    r = parsed({"model": "demo", "messages": MSG, "max_tokens": 10, "n": 3})
    assert (r.max_tokens, r.sequences, r.prompts, r.completion_bound) == (10, 3, 1, 30)
    r = parsed({"model": "demo", "prompt": ["a", "b", "c"], "max_tokens": 5, "n": 2,
                "best_of": 4}, COMP_EP)
    # vLLM runs n (the record's sequences); the hold counts best_of all the same.
    assert (r.sequences, r.best_of, r.prompts, r.completion_bound) == (2, 4, 3, 60)
    r = parsed({"model": "demo", "prompt": [[1, 2], [3]], "n": None}, COMP_EP)
    assert (r.max_tokens, r.sequences, r.prompts, r.completion_bound) == (16, 1, 2, 32)


def test_hold_tokens_and_cost() -> None:
    r = parsed({"model": "demo", "messages": MSG, "max_tokens": 100, "n": 2})
    assert r.hold_tokens == r.prompt_estimate + 200
    # demo: $0.50 / $1.50 per 1k tokens, in nano-USD, rounded up.
    assert r.hold_cost_nano() == cost_nano(r.prompt_bound, 200, CFG.models["demo"]
                                           .price_per_1k_tokens)
    assert r.hold_cost_nano() == r.prompt_bound * 500_000 + 200 * 1_500_000


@pytest.mark.parametrize(
    ("extra", "param", "needle"),
    [
        ({"n": 0}, "n", "at least 1"),
        ({"n": 1.5}, "n", "integer"),
        ({"n": 17}, "n", "at most 16"),
        ({"best_of": 99}, "best_of", "at most 16"),
        ({"chat_template": "{% for i in range(9**9) %}x{% endfor %}"}, "chat_template",
         "cannot be bounded"),
        ({"prompt_embeds": "AAAA"}, "prompt_embeds", "cannot be bounded"),
        # vLLM reads it whenever it is not null, and refuses these (tester: after the hold).
        ({"prompt_embeds": ""}, "prompt_embeds", "cannot be bounded"),
        ({"prompt_embeds": 0}, "prompt_embeds", "cannot be bounded"),
        ({"mm_processor_kwargs": {"max_pixels": 10**9}}, "mm_processor_kwargs", "bounded"),
        ({"media_io_kwargs": {"video": {"num_frames": 10**6}}}, "media_io_kwargs", "bounded"),
    ],
)
def test_multipliers_and_unbounded_fields_are_validated(
    extra: dict[str, Any], param: str, needle: str
) -> None:
    for ep, body in ((CHAT_EP, {"model": "demo", "messages": MSG}),
                     (COMP_EP, {"model": "demo", "prompt": "x"})):
        e = error_of({**body, **extra}, ep)
        assert (e.status, e.code, e.param) == (400, "invalid_request", param)
        assert needle in e.message


def test_empty_prompt_embeds_are_none_as_vllm_reads_them() -> None:
    assert parsed({"model": "demo", "prompt": "x", "prompt_embeds": []}, COMP_EP).prompts == 1


@pytest.mark.parametrize("prompt", [[-1, 5], [[5], [6, "-2"]], [" -3 ", 4.0],
                                    [1, "-" + "9" * 400]])  # (a float of it is -inf)
def test_a_negative_token_id_is_refused_before_any_hold(prompt: Any) -> None:
    """vLLM's request models refuse a negative id (`ge=0`); it was held first (tester:
    `[-1, 5]` admitted, then vLLM's 400 of six validation errors)."""
    for ep, field in ((COMP_EP, "prompt"), (EMB, "input")):
        e = error_of({"model": "demo", field: prompt}, ep)
        assert (e.status, e.param) == (400, field) and "negative token id" in e.message
    assert parsed({"model": "demo", "prompt": [0, "-0", "-0_0", " -0.00 ", 5]},
                  COMP_EP).prompts == 1
    # Retest: 400 digits made float() inf, and int(inf) a 500 with a traceback.
    assert parsed({"model": "demo", "prompt": [1, "9" * 400]}, COMP_EP).prompts == 1


def test_an_empty_prompt_is_refused_before_any_hold() -> None:
    """vLLM refuses it (400) after admission: its minute's request was spent."""
    for prompt in ([[5, 6], []], [[]], "", ["a", ""]):
        e = error_of({"model": "demo", "prompt": prompt}, COMP_EP)
        assert (e.status, e.param) == (400, "prompt")
        assert "must not be empty" in e.message


def test_an_echo_without_generation_is_held_the_one_token_vllm_counts() -> None:
    """`echo: true` with `max_tokens: 0` scores a prompt (lm-eval's loglikelihood): vLLM
    0.32 generates one token, reported in its usage; the body goes as sent."""
    r = parsed({"model": "demo", "prompt": ["a b", "c"], "echo": True, "logprobs": 1,
                "max_tokens": 0, "n": 2}, COMP_EP)
    assert r.completion_bound == 1 * 2 * 2
    assert json.loads(upstream_body(r))["max_tokens"] == 0
    # vLLM reads booleans laxly (review: `"true"` was refused here, served by vLLM).
    for echo in (1, "true", "yes", "on"):
        assert parsed({"model": "demo", "prompt": "x", "echo": echo, "max_tokens": 0},
                      COMP_EP).completion_bound == 1
    # Without echo (vLLM: 400), or in chat, 0 is no limit.
    for ep, body in ((COMP_EP, {"prompt": "x", "max_tokens": 0}),
                     (COMP_EP, {"prompt": "x", "max_tokens": 0, "echo": "false"}),
                     (CHAT_EP, {"messages": MSG, "max_tokens": 0, "echo": True})):
        assert error_of({"model": "demo", **body}, ep).param == "max_tokens"


def test_a_best_of_below_n_is_ignored_as_vllm_does() -> None:
    """vLLM 0.32 takes `n` and ignores a smaller `best_of` (it answered 200 where this
    gateway answered 400); a larger one still bounds the hold."""
    for ep, body in ((CHAT_EP, {"model": "demo", "messages": MSG}),
                     (COMP_EP, {"model": "demo", "prompt": "x"})):
        assert parsed({**body, "n": 3, "best_of": 2, "max_tokens": 5}, ep).completion_bound == 15
        assert parsed({**body, "n": 2, "best_of": 4, "max_tokens": 5}, ep).completion_bound == 20


def test_empty_unbounded_fields_are_as_good_as_absent() -> None:
    parsed({"model": "demo", "messages": MSG, "chat_template": None, "mm_processor_kwargs": {}})


def test_no_limit_writes_the_cap_upstream() -> None:
    # Chat: the model's cap; completions: vLLM's and OpenAI's default of 16.
    for ep, body, want in ((CHAT_EP, {"model": "demo", "messages": MSG, "max_tokens": None},
                            256),
                           (COMP_EP, {"model": "demo", "prompt": "x"}, 16)):
        r = parsed(body, ep)
        assert r.max_tokens == want
        assert json.loads(upstream_body(r))["max_tokens"] == want
    # A client's own limit is forwarded untouched.
    r = parsed({"model": "demo", "messages": MSG, "max_completion_tokens": 7})
    sent = json.loads(upstream_body(r))
    assert "max_tokens" not in sent and sent["max_completion_tokens"] == 7
    r = parsed({"model": "demo", "prompt": "x", "max_tokens": 9}, COMP_EP)
    assert json.loads(upstream_body(r))["max_tokens"] == 9


def test_prompt_bound_counts_tools_and_is_at_least_the_bytes() -> None:
    tools = [{"type": "function", "function": {
        "name": f"tool_{i}", "description": "d" * 200,
        "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}}
        for i in range(60)]
    plain = parsed({"model": "demo", "messages": MSG})
    r = parsed({"model": "demo", "messages": MSG, "tools": tools})
    assert len(json.dumps(tools)) > 15_000
    assert r.prompt_bound - plain.prompt_bound >= len(json.dumps(tools, indent=4))
    assert r.prompt_estimate - plain.prompt_estimate >= len(json.dumps(tools)) // 4


def test_image_parts_need_a_model_setting() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}
    body = {"model": "demo", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what?"}, image]}]}
    e = error_of(body)
    assert (e.status, e.param) == (400, "messages[0].content[1]")
    demo = CFG.models["demo"].model_copy(update={"tokens_per_image": 1500})
    cfg = CFG.model_copy(update={"models": {**CFG.models, "demo": demo}})
    assert parsed(body, cfg=cfg).prompt_bound > 1500


def test_a_worst_case_past_exact_arithmetic_is_a_400_not_a_crash() -> None:
    """50,000 prompts, n 16, the model's max_tokens, at the dearest price: more nano-USD
    than the ledgers keep exact
    (it was a 500 from the admission's own check)."""
    dear = CFG.models["demo"].model_copy(update={"price_per_1k_tokens": Price(
        input=MAX_PRICE_PER_1K, output=MAX_PRICE_PER_1K)})
    cfg = CFG.model_copy(update={"models": {**CFG.models, "demo": dear}})
    body = {"model": "demo", "prompt": ["a"] * 50_000, "n": 16}
    with pytest.raises(ApiError) as e:
        parse_request(json.dumps(body).encode(), ep("/v1/completions"), cfg)
    assert (e.value.status, e.value.code) == (400, "invalid_request")
    assert "worst case" in e.value.message
    # One prompt at the dearest price a config may set is fine.
    parse_request(json.dumps({**body, "prompt": "a"}).encode(), ep("/v1/completions"), cfg)


def test_stream_options_need_a_stream_and_take_a_null_include_usage() -> None:
    """vLLM (and OpenAI) refuse `stream_options` on a request that does not stream: the
    gateway says so before it holds anything. A null `include_usage` is false, as both
    read it (it was a 400)."""
    opts = {"include_usage": True}
    for stream in ({}, {"stream": False}, {"stream": None}):
        e = error_of({"model": "demo", "messages": MSG, **stream, "stream_options": opts})
        assert (e.status, e.param) == (400, "stream_options")
        e = error_of({"model": "demo", "prompt": "hi", **stream, "stream_options": opts},
                     COMP_EP)
        assert (e.status, e.param) == (400, "stream_options")
    parse({"model": "demo", "messages": MSG, "stream_options": {}})  # vLLM takes it too
    parse({"model": "demo", "messages": MSG, "stream_options": None})
    r = parse({"model": "demo", "messages": MSG, "stream": True,
               "stream_options": {"include_usage": None}})
    assert r.client_wants_usage is False  # type: ignore[attr-defined]
    out = json.loads(upstream_body(r))  # type: ignore[arg-type]
    assert out["stream_options"] == {"include_usage": True}


def test_min_tokens_past_max_tokens_is_refused_before_the_hold() -> None:
    """vLLM refuses min_tokens above the request's max_tokens (the one written upstream
    when the client sent none) or below 0."""
    for body, ep in (({"messages": MSG}, CHAT_EP), ({"prompt": "hi"}, COMP_EP)):
        e = error_of({"model": "demo", **body, "max_tokens": 5, "min_tokens": 6}, ep)
        assert (e.status, e.param) == (400, "min_tokens")
        assert error_of({"model": "demo", **body, "min_tokens": -1}, ep).param == "min_tokens"
        parse({"model": "demo", **body, "max_tokens": 5, "min_tokens": 5}, ep)
    # Completions' default of 16 is the limit when none is sent.
    assert error_of({"model": "demo", "prompt": "hi", "min_tokens": 17}, COMP_EP).param \
        == "min_tokens"
    parse({"model": "demo", "messages": MSG, "max_completion_tokens": 9, "max_tokens": 2,
           "min_tokens": 9})


@pytest.mark.parametrize("value", [6.5, 1e9, "6.5", "six", [6]])
def test_min_tokens_that_is_not_an_integer_is_refused_before_the_hold(value: object) -> None:
    """An integer as vLLM reads one (`6.0` and `"6"` are 6), in range: a float skipped
    the range check, and vLLM refused 1e9 after the hold."""
    e = error_of({"model": "demo", "messages": MSG, "max_tokens": 5, "min_tokens": value},
                 CHAT_EP)
    assert (e.status, e.param) == (400, "min_tokens")


@pytest.mark.parametrize("name", ["kv_transfer_params", "ec_transfer_params"])
@pytest.mark.parametrize("ep", [CHAT_EP, COMP_EP, ENDPOINTS[("POST", "/v1/responses")]])
def test_a_client_cannot_set_kv_transfer_parameters(name: str, ep: Endpoint) -> None:
    field = {Kind.CHAT: {"messages": MSG}, Kind.COMPLETION: {"prompt": "hi"},
             Kind.RESPONSES: {"input": "hi"}}[ep.kind]
    body = {"model": "demo", **field, name: {"do_remote_decode": True}}
    e = error_of(body, ep)
    assert (e.status, e.param) == (400, name)
    parse({**body, name: None}, ep)  # null: as absent
    # vLLM reads them from vllm_xargs too (merged into the engine's extra args).
    xargs = {"model": "demo", **field, "vllm_xargs": {name: "x", "other": 1}}
    assert error_of(xargs, ep).param == f"vllm_xargs.{name}"
    parse({**xargs, "vllm_xargs": {"other": 1}}, ep)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-32"])
def test_a_bom_or_utf16_body_is_read_as_vllm_reads_it(encoding: str) -> None:
    """vLLM takes a UTF-8 body with a BOM (PowerShell's, Windows editors') and UTF-16 or
    UTF-32 JSON, as Python's json does; the backend gets plain UTF-8."""
    body = {"model": "demo", "messages": [{"role": "user", "content": "héllo 😀"}],
            "max_tokens": 3}
    r = parse_request(json.dumps(body, ensure_ascii=False).encode(encoding), CHAT_EP, CFG)
    plain = parse(body)
    assert (r.prompt_bound, r.max_tokens) == (plain.prompt_bound, 3)  # type: ignore[attr-defined]
    assert upstream_body(r) == upstream_body(plain)  # type: ignore[arg-type]
    bad = b"\xef\xbb\xbf" + b"\xff{}"  # a BOM, then not UTF-8
    assert error_of_raw(bad).param is None


def error_of_raw(raw: bytes) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse_request(raw, CHAT_EP, CFG)
    return e.value


def test_a_client_cannot_set_its_scheduling_priority() -> None:
    assert error_of({"model": "demo", "messages": MSG, "priority": -10}).param == "priority"
    parse({"model": "demo", "messages": MSG, "priority": 0})  # the default: as absent


def test_a_long_unknown_model_is_not_echoed_whole() -> None:
    e = error_of({"model": "m" * 100_000, "messages": MSG})
    assert e.code == "model_not_found" and len(e.message) < 400


def test_beam_search_is_refused_before_anything_is_held() -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        body = {"model": "demo", "max_tokens": 5, "n": 2, "use_beam_search": True,
                "messages": [{"role": "user", "content": "x"}], "prompt": "x"}
        with pytest.raises(ApiError) as e:
            parse_request(json.dumps(body).encode(), ep(path), CFG)
        assert (e.value.status, e.value.param) == (400, "use_beam_search")
    for off in (False, "false", 0, "no"):  # read as vLLM reads it (review)
        ok = {"model": "demo", "messages": [{"role": "user", "content": "x"}],
              "use_beam_search": off}
        assert parse_request(json.dumps(ok).encode(), CHAT_EP, CFG).prompt_bound > 0
    for on in ("true", 1, "yes"):
        body = {"model": "demo", "messages": [{"role": "user", "content": "x"}],
                "use_beam_search": on}
        with pytest.raises(ApiError):
            parse_request(json.dumps(body).encode(), CHAT_EP, CFG)


def test_a_pooling_request_that_says_it_does_not_stream_is_served() -> None:
    emb = ep("/v1/embeddings")
    for off in (False, "false", None, 0):
        body = {"model": "demo", "input": "x", "stream": off}
        assert parse_request(json.dumps(body).encode(), emb, CFG).prompt_bound > 0
    with pytest.raises(ApiError) as e:
        parse_request(json.dumps({"model": "demo", "input": "x", "stream": "true"}).encode(),
                      emb, CFG)
    assert e.value.param == "stream"


def test_a_body_too_deep_to_forward_is_a_400_not_a_crash() -> None:
    raw = b'{"model": "demo", "messages": [{"role": "user", "content": "x"}], "x": ' + (
        b"[" * 600 + b"]" * 600 + b"}")
    with pytest.raises(ApiError) as e:
        parse_request(raw, CHAT_EP, CFG)
    assert (e.value.status, e.value.code) == (400, "invalid_request")
    assert "nested too deeply" in e.value.message
    # Past the JSON parser's own depth limit: valid JSON still, and said so.
    raw = raw.replace(b"[" * 600 + b"]" * 600, b"[" * 3000 + b"]" * 3000)
    with pytest.raises(ApiError) as e:
        parse_request(raw, CHAT_EP, CFG)
    assert e.value.status == 400 and "nested too deeply" in e.value.message


# -- the other endpoint kinds: one entry point, a parser per kind -----------------------

def ep(path: str) -> Endpoint:
    e = lookup("POST", path)
    assert e is not None
    return e


EMB, RESP, RERANK, SCORE, TOK = (ep(p) for p in ("/v1/embeddings", "/v1/responses",
                                                 "/v1/rerank", "/score", "/tokenize"))


def test_embeddings_hold_prompt_tokens_only() -> None:
    r = parsed({"model": "demo", "input": ["hello", "héllo"], "dimensions": 8,
                "encoding_format": "base64", "user": "u"}, EMB)
    # Per input: its UTF-8 bytes + 8 special tokens; nothing generated.
    assert (r.prompt_bound, r.completion_bound, r.prompts, r.max_tokens) == (5 + 8 + 6 + 8,
                                                                            0, 2, 0)
    assert (r.prompt_estimate, r.hold_tokens, r.stream) == (2 + 2, 4, False)
    assert r.hold_cost_nano() == 27 * 500_000  # the model's input price, per 1k tokens
    sent = json.loads(upstream_body(r))
    assert sent == {"model": "tiny-llama", "input": ["hello", "héllo"], "dimensions": 8,
                    "encoding_format": "base64", "user": "u"}  # passed through, renamed


def test_responses_limit_is_max_output_tokens() -> None:
    r = parsed({"model": "demo", "input": "hi", "max_output_tokens": 9, "stream": True},
               RESP)
    assert (r.max_tokens, r.completion_bound, r.stream, r.client_wants_usage) == (
        9, 9, True, False)
    sent = json.loads(upstream_body(r))
    assert sent == {"model": "tiny-llama", "input": "hi", "max_output_tokens": 9,
                    "stream": True}  # no stream_options: usage is always in the stream
    # No limit: the model's cap, written upstream.
    r = parsed({"model": "demo", "input": "hi"}, RESP)
    assert r.completion_bound == 256
    assert json.loads(upstream_body(r))["max_output_tokens"] == 256
    # "hi" as vLLM's user message (30 JSON bytes), + 16 for the message + 512 for the
    # request.
    assert r.prompt_bound == 30 + 16 + 512
    assert r.hold_cost_nano() == cost_nano(30 + 16 + 512, 256,
                                           CFG.models["demo"].price_per_1k_tokens)


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": 257}, "max_output_tokens"),
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    # Read by vLLM whenever not null (its 404 and 400 came after the hold: tester).
    ({"input": "hi", "previous_response_id": ""}, "previous_response_id"),
    ({"input": "hi", "prompt": {}}, "prompt"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": "hi", "stream": "maybe"}, "stream"),
    ({"input": 5}, "input"),
])
def test_bad_responses_bodies(body: dict[str, Any], param: str) -> None:
    e = error_of({"model": "demo", **body}, RESP)
    assert (e.status, e.code, e.param) == (400, "invalid_request", param)


def test_rerank_and_score_hold_pairs() -> None:
    text = 5 + 8  # "hello": 5 bytes + 8 special tokens
    pair = 2 * text + 1 + 512
    r = parsed({"model": "demo", "query": "hello", "documents": ["hello", "hello"],
                "top_n": 1}, RERANK)
    assert (r.prompt_bound, r.prompts, r.completion_bound) == (2 * pair, 2, 0)
    assert json.loads(upstream_body(r))["model"] == "tiny-llama"
    r = parsed({"model": "demo", "queries": ["hello"], "documents": "hello"}, SCORE)
    assert (r.prompt_bound, r.prompts) == (pair, 1)


def test_tokenize_holds_nothing_and_is_forwarded() -> None:
    for path in ("/tokenize", "/detokenize"):
        r = parsed({"model": "demo", "prompt": "x" * 1000, "tokens": [1]}, ep(path))
        assert (r.prompt_bound, r.prompt_estimate, r.completion_bound) == (0, 0, 0)
        assert r.hold_cost_nano() == 0 and r.hold_tokens == 0
        assert json.loads(upstream_body(r))["model"] == "tiny-llama"
    assert error_of({"model": "nope", "prompt": "x"}, TOK).status == 404
    assert error_of({"prompt": "x"}, TOK).param == "model"


def test_tokenize_checks_chat_messages_as_chat_does() -> None:
    """vLLM's /tokenize renders chat messages, fetching and processing their media: a
    part chat refuses is refused here too (it was forwarded, recorded at no cost)."""
    video = {"type": "video_url", "video_url": {"url": "http://x/v.mp4"}}
    err = error_of({"model": "demo", "messages": [{"role": "user", "content": [video]}]},
                   TOK)
    assert (err.status, err.param) == (400, "messages[0].content[0]")
    assert error_of({"model": "demo", "messages": []}, TOK).param == "messages"
    r = parsed({"model": "demo", "messages": [{"role": "user", "content": "hi"}]}, TOK)
    assert (r.prompt_bound, r.completion_bound, r.hold_tokens) == (0, 0, 0)


def test_pooling_endpoints_do_not_stream() -> None:
    for e, body in ((EMB, {"input": "x"}), (RERANK, {"query": "q", "documents": ["d"]})):
        err = error_of({"model": "demo", "stream": True, **body}, e)
        assert (err.status, err.param) == (400, "stream")


def test_multipart_audio_is_refused_naming_the_file() -> None:
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
        with pytest.raises(ApiError) as e:
            parse_request(b"--boundary\r\nContent-Disposition: form-data", ep(path), CFG)
        assert (e.value.status, e.value.code, e.value.param) == (400, "invalid_request",
                                                                 "file")
        assert "not supported through the gateway" in e.value.message


def test_endpoints_answered_by_the_gateway_take_no_body() -> None:
    model_ep = lookup("GET", "/v1/models/demo")
    assert model_ep is not None
    with pytest.raises(ApiError) as e:
        parse_request(b"{}", model_ep, CFG)
    assert e.value.status == 400


def test_model_object_shape() -> None:
    assert json.loads(model_object("demo", 5)) == {
        "id": "demo", "object": "model", "created": 5, "owned_by": "tokenbooth"}


# vLLM's stream_interval: a model's setting is written into its streams; a client's own
# value is capped at it, since a client that leaves mid-stream is charged per chunk seen.
INTERVAL_CFG = parse_config(policy_dict("http://127.0.0.1:8000", models={
    "demo": {"upstream_model": "tiny-llama", "backends": [{"url": "http://127.0.0.1:8000"}],
             "max_tokens": 256, "stream_interval": 8}}))


def interval_of(body: dict[str, Any], cfg: Config = INTERVAL_CFG,
                ep: Endpoint = CHAT_EP) -> tuple[int, object]:
    r = parse_request(json.dumps(body).encode(), ep, cfg)
    assert isinstance(r, InferenceRequest)
    return r.stream_interval, json.loads(upstream_body(r)).get("stream_interval")


@pytest.mark.parametrize("ep", [CHAT_EP, COMP_EP])
def test_a_models_stream_interval_is_written_into_its_streams(ep: Endpoint) -> None:
    body: dict[str, Any] = {"model": "demo", "stream": True,
                            **({"messages": MSG} if ep is CHAT_EP else {"prompt": "hi"})}
    assert interval_of(body, ep=ep) == (8, 8)
    assert interval_of({**body, "stream_interval": 3}, ep=ep) == (3, 3)
    assert interval_of({**body, "stream_interval": 1000}, ep=ep) == (8, 8)  # capped
    assert interval_of({**body, "stream": False}, ep=ep) == (1, None)  # JSON: untouched


def test_without_a_setting_nothing_is_written_and_a_clients_interval_is_capped_to_one() -> None:
    body: dict[str, Any] = {"model": "demo", "stream": True, "messages": MSG}
    assert interval_of(body, CFG) == (1, None)  # backends that are not vLLM never see it
    assert interval_of({**body, "stream_interval": 50}, CFG) == (1, 1)


@pytest.mark.parametrize("bad", [0, -1, "four", 2.5, "0", [4]])
def test_a_bad_stream_interval_is_a_400(bad: object) -> None:
    body = {"model": "demo", "stream": True, "messages": MSG, "stream_interval": bad}
    err = error_of(body)
    assert err.status == 400 and err.param == "stream_interval"


def test_numbers_past_what_json_readers_hold_are_named_as_such() -> None:
    """`1e400` is valid JSON past any double; an integer past 64 bits reads as a float:
    neither is called invalid JSON or not an integer."""
    raw = b'{"model": "demo", "messages": [], "max_tokens": 1e400}'
    with pytest.raises(ApiError, match="number too large") as e:
        parse_request(raw, CHAT_EP, CFG)
    assert e.value.status == 400
    with pytest.raises(ApiError, match="must be at most") as e:
        parse({"model": "demo", "messages": [{"role": "user", "content": "x"}],
               "max_tokens": 10**23})
    assert e.value.param == "max_tokens"


def test_a_count_past_2_53_is_not_misquoted() -> None:
    """10**27 arrives as a float (orjson): its message quoted 1000000000000000013287555072
    (real-vLLM tester); now it names no digits it was not sent."""
    body = b'{"model":"demo","messages":[{"role":"user","content":"hi"}],' \
           b'"max_tokens":1000000000000000000000000000}'
    with pytest.raises(ApiError) as e:
        parse_request(body, CHAT_EP, CFG)
    assert e.value.message == ("'max_tokens' must be at most 256 for this model, got a "
                               "number past 2**53.")
