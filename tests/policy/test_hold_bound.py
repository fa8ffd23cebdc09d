"""Property tests: for every body shape the gateway accepts, real usage never exceeds the hold.

Two upstreams judge each generated body:

* the simulator, in process, run on the body tokenbooth sends upstream: its own
  tokenizer and its vLLM 0.32 rules for n, best_of (ignored), batches, defaults, clipping
  and template fields;
* a byte-level worst case: a Llama-3.1-style rendering of the body (JSON at indent 4,
  tool-call arguments parsed as vLLM does), one token per UTF-8 byte and one per
  special token, plus the model's per-item media tokens.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from authz.sim import pooling
from authz.sim.protocol import SimError, parse_chat, parse_completion
from authz.sim.responses_api import messages as rapi_messages
from authz.sim.responses_api import parse_responses, template_fields
from authz.sim.tokens import MEDIA_TOKENS, template_tool_calls
from policy.config import parse_config
from policy.endpoints import ENDPOINTS
from policy.limits import cost_nano
from policy.request import InferenceRequest, parse_request, upstream_body
from policy.tokens import TEMPLATE_CALL_KWARGS

CHAT_EP = ENDPOINTS[("POST", "/v1/chat/completions")]
COMP_EP = ENDPOINTS[("POST", "/v1/completions")]
CONTEXT = 4096  # the "ctx" model's context length, in the gateway and in the simulator
_MODEL = {"backends": [{"url": "http://127.0.0.1:8000"}], "max_tokens": 64, "max_n": 6,
          "price_per_1k_tokens": {"input": "0.50", "output": "1.50"},
          "tokens_per_image": MEDIA_TOKENS, "tokens_per_audio": MEDIA_TOKENS,
          "tokens_per_video": MEDIA_TOKENS}
LLAMA_PREAMBLE = (
    "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    "Given the following functions, please respond with a JSON for a function call with its "
    "proper arguments that best answers the given prompt.\n\nRespond in the format "
    '{"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
CFG = parse_config({"models": {
    "free": {**_MODEL, "upstream_model": "up-free"},
    "ctx": {**_MODEL, "upstream_model": "up-ctx", "max_model_len": CONTEXT},
    # Allowances no larger than the Llama-style rendering below needs: no slack to hide in.
    "tight": {**_MODEL, "upstream_model": "up-tight", "chat_template_tokens_per_message": 5,
              "chat_template_tokens_per_request": len(LLAMA_PREAMBLE) + 7,
              "special_tokens_per_prompt": 1},
}})
SIM_CONTEXT = {"up-free": 10**9, "up-ctx": CONTEXT, "up-tight": 10**9}
PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# -- body strategies -------------------------------------------------------------------

text = st.text(max_size=40)
scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
           | st.floats(allow_nan=False, allow_infinity=False) | text)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=25,
)
# What a client may put in `arguments`: JSON (big integers too), or anything at all.
arguments = (st.recursive(scalars | st.integers(2**64, 2**80), lambda i: st.lists(i, max_size=3)
                          | st.dictionaries(text, i, max_size=3), max_leaves=15)
             .map(lambda v: json.dumps(v, ensure_ascii=False)) | text)
media_parts = st.sampled_from([
    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "QUFB" * 50}},
    {"type": "input_audio", "input_audio": {"data": "UklGR" * 20, "format": "wav"}},
    {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},
])
text_parts = st.builds(lambda t, k: {"type": k, "text": t}, text,
                       st.sampled_from(["text", "input_text"])) | st.builds(
    lambda t: {"type": "refusal", "refusal": t}, text)
contents = st.none() | text | st.lists(text_parts | media_parts, max_size=4)
tool_calls = st.lists(st.fixed_dictionaries(
    {"id": text, "type": st.just("function"),
     "function": st.fixed_dictionaries({"name": text, "arguments": arguments})}),
    min_size=1, max_size=3)


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    role = draw(st.sampled_from(["system", "developer", "user", "assistant", "tool"]))
    m: dict[str, Any] = {"role": role, "content": draw(contents)}
    for key in ("name", "tool_call_id", "reasoning_content"):
        if draw(st.booleans()):
            m[key] = draw(text)
    if role == "assistant" and draw(st.booleans()):
        m["tool_calls"] = draw(tool_calls)
    return m


tools = st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": (
    st.fixed_dictionaries({"name": text, "description": text, "parameters": json_values}))}),
    min_size=1, max_size=4)
response_formats = st.sampled_from([{"type": "json_object"}, {"type": "text"}]) | st.builds(
    lambda s: {"type": "json_schema", "json_schema": {"name": "out", "schema": s}},
    json_values)
# Template kwargs the gateway takes (`policy.tokens.template_kwargs_tally` refuses the
# tokenizer's parameters and special tokens with a 400).
kwarg_keys = text.filter(lambda k: k not in TEMPLATE_CALL_KWARGS
                         and not k.endswith(("_token", "_tokens")))
CHAT_OPTIONAL = {
    "tools": tools,
    "functions": st.lists(json_values, max_size=2),
    "tool_choice": st.sampled_from(["auto", "none", "required"]) | st.builds(
        lambda n: {"type": "function", "function": {"name": n}}, text),
    "response_format": response_formats,
    "documents": st.lists(st.dictionaries(st.sampled_from(["title", "text"]), text),
                          max_size=2),
    "chat_template_kwargs": st.dictionaries(kwarg_keys, json_values, max_size=3),
    "reasoning_effort": st.sampled_from(["low", "medium", "high"]),
    "max_tokens": st.integers(1, 64),
    "max_completion_tokens": st.integers(1, 64),
    "temperature": st.floats(0, 2),
}


@st.composite
def sampling(draw: st.DrawFn) -> dict[str, Any]:
    """n, best_of and stream, as any client may combine them (best_of >= n)."""
    out: dict[str, Any] = {"model": draw(st.sampled_from(["free", "ctx", "tight"]))}
    n = draw(st.none() | st.integers(1, 6))
    if n is not None:
        out["n"] = n
    if draw(st.booleans()):
        out["best_of"] = draw(st.integers(n or 1, 6))
    if draw(st.booleans()):
        out["stream"] = True
        if draw(st.booleans()):
            out["stream_options"] = {"include_usage": draw(st.booleans())}
    return out


@st.composite
def chat_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body = draw(sampling())
    body["messages"] = draw(st.lists(messages(), min_size=1, max_size=5))
    for name in draw(st.sets(st.sampled_from(sorted(CHAT_OPTIONAL)))):
        body[name] = draw(CHAT_OPTIONAL[name])
    return body


token_ids = st.lists(st.integers(0, 200_000), min_size=1, max_size=20)
prompt_text = st.text(min_size=1, max_size=40)  # vLLM refuses an empty prompt
prompts = (prompt_text | st.lists(prompt_text, min_size=1, max_size=4)
           | st.lists(st.integers(0, 200_000), min_size=1, max_size=20)
           | st.lists(token_ids, min_size=1, max_size=4))


@st.composite
def completion_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body = draw(sampling())
    body["prompt"] = draw(prompts)
    if draw(st.booleans()):
        body["max_tokens"] = draw(st.integers(1, 64))
    if draw(st.booleans()):
        body["suffix"] = draw(text)
    if draw(st.booleans()):
        body["echo"] = draw(st.booleans())
        if body["echo"] and draw(st.booleans()):
            body["max_tokens"] = 0  # prompt scoring: vLLM generates one token
    return body


# -- the two judges --------------------------------------------------------------------

def sim_usage(req: InferenceRequest, chat: bool) -> tuple[int, int] | None:
    """(prompt, completion) tokens the simulator reports for the upstream body; None
    when it refuses the body (no tokens)."""
    up = orjson.loads(upstream_body(req))
    context = SIM_CONTEXT[req.model.upstream_model]
    parse = parse_chat if chat else parse_completion
    try:
        gen = parse(up, SIM_CONTEXT, None, context)
    except SimError:
        return None
    return gen.prompt_tokens, gen.completion_tokens


def tojson(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=4)


def _render_content(content: Any) -> tuple[str, int]:
    """(text, media items) of a message content, as the template renders it."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        return "", 0
    texts = [p.get("text", p.get("refusal", "")) for p in content if "type" in p
             and p["type"] in ("text", "input_text", "refusal")]
    return "\n".join(texts), len(content) - len(texts)


def rendered_tokens(body: dict[str, Any]) -> int:
    """Worst-case byte-level BPE tokens of a Llama-3.1-style rendering of a chat body:
    every field tokenbooth counts, rendered once, JSON at indent 4."""
    out = [LLAMA_PREAMBLE]
    specials = 1 + 3  # BOS; the system header
    for t in body.get("tools") or []:
        out.append(tojson(t) + "\n\n")
    for name in ("functions", "tool_choice", "response_format", "documents",
                 "chat_template_kwargs", "reasoning_effort"):
        if body.get(name) is not None:
            value = body[name]
            # (the kwargs as a template may write them: in every message, and once more)
            times = len(body["messages"]) + 1 if name == "chat_template_kwargs" else 1
            out.append((value if isinstance(value, str) else tojson(value)) * times)
    media = 0
    for m in body["messages"]:
        specials += 3  # start header, end header, end of turn
        content, items = _render_content(m.get("content"))
        media += items
        out.append(m["role"] + "\n\n" + content)
        for key, value in m.items():
            if key in ("role", "content"):
                continue
            if key == "tool_calls":
                for call in template_tool_calls(value):
                    fn = call["function"]
                    out.append('{"name": "' + fn["name"] + '", "parameters": '
                               + tojson(fn["arguments"]) + "}")
            else:
                out.append(value if isinstance(value, str) else tojson(value))
    specials += 3  # the generation prompt
    return len("".join(out).encode("utf-8", "surrogatepass")) + specials + media * MEDIA_TOKENS


def check(req: InferenceRequest, chat: bool) -> None:
    price = req.model.price_per_1k_tokens
    assert req.completion_bound == req.max_tokens * max(req.sequences, req.best_of) * req.prompts
    assert req.hold_tokens == req.prompt_estimate + req.completion_bound
    assert json.loads(upstream_body(req)).get("max_tokens") is not None or (
        json.loads(upstream_body(req)).get("max_completion_tokens") is not None)
    usage = sim_usage(req, chat)
    if usage is not None:
        prompt, completion = usage
        assert prompt <= req.prompt_bound
        assert completion <= req.completion_bound
        assert cost_nano(prompt, completion, price) <= req.hold_cost_nano()


@PROPERTY
@given(chat_bodies())
def test_chat_usage_never_exceeds_the_hold(body: dict[str, Any]) -> None:
    # vLLM refuses a tool_choice without tools (so does the gateway, before the hold)
    assume(body.get("tool_choice") in (None, "none") or body.get("tools") is not None)
    req = parse_request(orjson.dumps(body), CHAT_EP, CFG)
    check(req, chat=True)
    if req.model.max_model_len is None:
        assert rendered_tokens(body) <= req.prompt_bound


@PROPERTY
@given(completion_bodies())
def test_completions_usage_never_exceeds_the_hold(body: dict[str, Any]) -> None:
    req = parse_request(orjson.dumps(body), COMP_EP, CFG)
    check(req, chat=False)
    # Byte-level worst case: every byte a token, and the model's special tokens, per prompt.
    prompt = body["prompt"]
    batch = [prompt] if isinstance(prompt, str) or type(prompt[0]) is int else prompt
    suffix = body.get("suffix") or ""
    special = req.model.special_tokens_per_prompt  # BOS, FIM markers: one each, at most
    worst = sum((len(p.encode()) + special if isinstance(p, str) else len(p))
                + (len(suffix.encode()) + special if suffix else 0) for p in batch)
    cap = req.model.max_model_len
    if cap is None:
        assert worst <= req.prompt_bound
    else:
        assert min(worst, cap * len(batch)) <= req.prompt_bound


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(0, 5), st.integers(1, 4), st.booleans())
def test_multipliers_against_the_simulator(n: int, extra: int, batch: int, chat: bool) -> None:
    """The tester's cases, exhaustively: n, best_of, batches, no max_tokens."""
    best_of = min(n + extra, 6)
    base: dict[str, Any] = {"model": "free", "n": n, "best_of": best_of}
    if chat:
        body = {**base, "messages": [{"role": "user", "content": "hi"}]}
    else:
        body = {**base, "prompt": ["a b c"] * batch}
    req = parse_request(orjson.dumps(body), CHAT_EP if chat else COMP_EP, CFG)
    usage = sim_usage(req, chat)
    assert usage is not None
    # No max_tokens: chat gets the model's cap (64), completions vLLM's default of 16.
    # The hold counts best_of sequences (what older vLLM generated); vLLM 0.32, and so the
    # simulator, generates n of them.
    per_sequence = 64 if chat else 16 * batch
    assert req.completion_bound == per_sequence * best_of
    assert req.sequences == n  # what vLLM runs, and counts each prompt for (the audit)
    assert usage[1] == per_sequence * n <= req.completion_bound


# Focused: one message, the tight model, so a part left uncounted has nowhere to hide.
def nest(value: Any, depth: int, in_lists: bool) -> Any:
    for _ in range(depth):
        value = [value] if in_lists else {"k": value}
    return value


# Indentation grows with depth squared: deep arguments are the worst case for their bytes.
deep_arguments = st.builds(nest, json_values, st.integers(0, 60), st.booleans()).map(
    lambda v: json.dumps(v, separators=(",", ":")))


@PROPERTY
@given(st.lists(text_parts | media_parts, min_size=1, max_size=6))
def test_content_parts_against_the_rendering(parts: list[dict[str, Any]]) -> None:
    body = {"model": "tight", "messages": [{"role": "user", "content": parts}]}
    req = parse_request(orjson.dumps(body), CHAT_EP, CFG)
    assert rendered_tokens(body) <= req.prompt_bound


@PROPERTY
@given(st.lists(deep_arguments, min_size=1, max_size=3), text)
def test_tool_calls_against_the_rendering(args: list[str], name: str) -> None:
    calls = [{"function": {"name": name, "arguments": a}} for a in args]
    body = {"model": "tight", "messages": [{"role": "assistant", "tool_calls": calls}]}
    req = parse_request(orjson.dumps(body), CHAT_EP, CFG)
    assert rendered_tokens(body) <= req.prompt_bound


# -- the other endpoints: embeddings, the Responses API, rerank / score ------------------

EMB_EP, RESP_EP = ENDPOINTS[("POST", "/v1/embeddings")], ENDPOINTS[("POST", "/v1/responses")]
RERANK_EP, SCORE_EP = ENDPOINTS[("POST", "/v1/rerank")], ENDPOINTS[("POST", "/v1/score")]
models = st.sampled_from(["free", "ctx", "tight"])


def sim_answer(answer: Any, req: InferenceRequest) -> int | None:
    """Prompt tokens the simulator reports for the upstream body (None: it refused)."""
    try:
        _body, _model, tokens = answer(orjson.loads(upstream_body(req)), SIM_CONTEXT,
                                       SIM_CONTEXT[req.model.upstream_model])
    except SimError:
        return None
    assert isinstance(tokens, int)
    return tokens


def check_prompt_only(req: InferenceRequest, used: int | None) -> None:
    assert (req.completion_bound, req.max_tokens) == (0, 0)
    assert req.hold_tokens == req.prompt_estimate
    if used is not None:
        assert used <= req.prompt_bound
        assert cost_nano(used, 0, req.model.price_per_1k_tokens) <= req.hold_cost_nano()


@PROPERTY
@given(models, prompts, st.sampled_from([None, "float", "base64"]),
       st.none() | st.integers(1, 64))
def test_embeddings_usage_never_exceeds_the_hold(model: str, inputs: Any, fmt: str | None,
                                                 dims: int | None) -> None:
    body = {"model": model, "input": inputs, "dimensions": dims}
    if fmt is not None:  # vLLM refuses a null `encoding_format` (it has a default)
        body["encoding_format"] = fmt
    req = parse_request(orjson.dumps(body), EMB_EP, CFG)
    check_prompt_only(req, sim_answer(pooling.embeddings, req))
    # Byte-level worst case: every byte a token, plus the special tokens, per input.
    batch = [inputs] if isinstance(inputs, str) or type(inputs[0]) is int else inputs
    special = req.model.special_tokens_per_prompt
    worst = [len(p.encode()) + special if isinstance(p, str) else len(p) for p in batch]
    cap = req.model.max_model_len
    assert sum(worst if cap is None else [min(w, cap) for w in worst]) <= req.prompt_bound


conversations = st.lists(messages(), min_size=1, max_size=4)


@PROPERTY
@given(models, st.lists(conversations, min_size=1, max_size=3), st.booleans(),
       st.booleans(), st.none() | st.dictionaries(kwarg_keys, json_values, max_size=2))
def test_chat_style_embeddings_usage_never_exceeds_the_hold(
        model: str, convs: list[Any], batch: bool, in_input: bool,
        kwargs: dict[str, Any] | None) -> None:
    """A conversation (or a batch of them) in `messages` or in `input`, as vLLM 0.32
    takes them: each conversation within its chat prompt's bound."""
    value = convs if batch else convs[0]
    body: dict[str, Any] = {"model": model, "input" if in_input else "messages": value}
    if kwargs is not None:
        body["chat_template_kwargs"] = kwargs
    req = parse_request(orjson.dumps(body), EMB_EP, CFG)
    assert req.prompts == (len(convs) if batch else 1)
    check_prompt_only(req, sim_answer(pooling.embeddings, req))
    if req.model.max_model_len is None:
        assert sum(rendered_tokens({**body, "messages": c})
                   for c in (convs if batch else convs[:1])) <= req.prompt_bound


texts = st.lists(text, min_size=1, max_size=5)


@PROPERTY
@given(models, text, texts, st.booleans(), st.none() | text)
def test_rerank_and_score_usage_never_exceeds_the_hold(
        model: str, query: str, docs: list[str], rerank: bool, instruction: str | None
) -> None:
    body: dict[str, Any] = {"model": model, "documents": docs, "instruction": instruction}
    body["query" if rerank else "queries"] = query
    req = parse_request(orjson.dumps(body), RERANK_EP if rerank else SCORE_EP, CFG)
    assert req.prompts == len(docs)
    check_prompt_only(req, sim_answer(pooling.rerank if rerank else pooling.score, req))
    # Byte-level worst case per pair: both texts, their special tokens, one padding token.
    special = req.model.special_tokens_per_prompt
    worst = sum(len(query.encode()) + len(d.encode()) + 2 * special + 1 for d in docs)
    if req.model.max_model_len is None:
        assert worst <= req.prompt_bound


output_parts = st.lists(text_parts | media_parts, max_size=3)
input_items = st.one_of(
    messages(),
    st.builds(lambda role, parts: {"type": "message", "role": role, "content": parts},
              st.sampled_from(["user", "assistant", "system", "developer"]),
              st.lists(text_parts | media_parts, max_size=3)),
    st.builds(lambda c, n, a: {"type": "function_call", "call_id": c, "name": n,
                               "arguments": a}, text, text, arguments),
    st.builds(lambda c, n, i: {"type": "custom_tool_call", "call_id": c, "name": n,
                               "input": i}, text, text, text),
    st.builds(lambda c, o: {"type": "function_call_output", "call_id": c, "output": o},
              text, text | output_parts),
    st.builds(lambda t, s: {"type": "reasoning", "summary": [{"type": "summary_text",
                                                              "text": s}],
                            "content": [{"type": "reasoning_text", "text": t}]}, text, text),
)
response_tools = st.lists(st.fixed_dictionaries(
    {"type": st.just("function"), "name": text},
    optional={"description": text, "parameters": json_values, "strict": st.booleans()}),
    min_size=1, max_size=3)
RESPONSES_OPTIONAL = {
    "instructions": text,
    "tools": response_tools,
    "tool_choice": st.sampled_from(["auto", "none", "required"]),
    "reasoning": st.builds(lambda e: {"effort": e}, st.sampled_from(["low", "high"])),
    "chat_template_kwargs": st.dictionaries(kwarg_keys, json_values, max_size=3),
    "max_output_tokens": st.integers(1, 64),
    "stream": st.booleans(),
    "store": st.booleans(),
}


@st.composite
def responses_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"model": draw(models)}
    body["input"] = draw(text | st.lists(input_items, max_size=5))
    for name in draw(st.sets(st.sampled_from(sorted(RESPONSES_OPTIONAL)))):
        body[name] = draw(RESPONSES_OPTIONAL[name])
    return body


@PROPERTY
@given(responses_bodies())
def test_responses_usage_never_exceeds_the_hold(body: dict[str, Any]) -> None:
    # vLLM refuses a tool required with none (so does the gateway, before the hold)
    assume(body.get("tool_choice") != "required" or body.get("tools"))
    req = parse_request(orjson.dumps(body), RESP_EP, CFG)
    up = orjson.loads(upstream_body(req))
    assert up.get("max_output_tokens") == req.completion_bound == req.max_tokens
    try:
        gen = parse_responses(up, SIM_CONTEXT, None, SIM_CONTEXT[req.model.upstream_model])
    except SimError:
        gen = None
    if gen is not None:
        assert gen.prompt_tokens <= req.prompt_bound
        assert gen.completion_tokens <= req.completion_bound
        assert cost_nano(gen.prompt_tokens, gen.completion_tokens,
                         req.model.price_per_1k_tokens) <= req.hold_cost_nano()
    if req.model.max_model_len is None:
        # The Llama-3.1-style rendering of the chat vLLM makes of this request.
        fields = template_fields(body)
        chat = {"messages": rapi_messages(body), "tools": fields["tools"],
                "tool_choice": fields["tool_choice"] if fields["tools"] else None,
                "chat_template_kwargs": fields["chat_template_kwargs"],
                "reasoning_effort": fields["reasoning_effort"]}
        assert rendered_tokens({k: v for k, v in chat.items() if v is not None}) <= (
            req.prompt_bound)
