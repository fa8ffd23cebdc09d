"""What vLLM 0.32 makes of request shapes the gateway measures: the tools a chat template
renders are no longer than the gateway measures them (policy/tokens.py, `rendered_tools`;
asked of vLLM's request models in its venv), and a cut stream's prompt recount
(policy/prompt_count.py) counts what vLLM's chat completions render (its server)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from policy.config import Model
from policy.endpoints import Kind
from policy.prompt_count import counted, tokenize_request
from policy.request_responses import responses_prompt
from policy.tokens import PART_FIELDS, chat_prompt, json_indent2_len, rendered_tools, utf8_len
from tests.vllm.conftest import MODEL, VllmServer, _require_python

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

CHAT_TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "f"}},
    {"type": "function", "function": {"name": "f", "strict": None, "defer_loading": None}},
    {"type": "function", "defer_loading": True, "function": {"name": "g", "x": 1}, "y": 2},
    {"type": "function", "function": {"name": "h", "description": "d", "strict": True,
                                      "parameters": {"type": "object"}}},
]
RESPONSES_TOOLS: list[Any] = [
    {"type": "function", "name": "f"},
    {"type": "function", "name": "g", "strict": True, "parameters": {"type": "object"},
     "description": "d"},
]
# Prints, as one JSON line, each chat tool as vLLM dumps it for the template, then the
# Responses tools as its `construct_tool_dicts` converts them.
_DUMP = """
import json, sys
import vllm  # noqa: F401  (vLLM's own import order)
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.entrypoints.openai.responses.utils import construct_tool_dicts
chat, responses = json.loads(sys.stdin.read())
msg = [{"role": "user", "content": "hi"}]
out = [[t.model_dump() for t in ChatCompletionRequest.model_validate(
           {"messages": msg, "tools": [tool]}).tools] for tool in chat]
r = ResponsesRequest.model_validate({"input": "hi", "tools": responses})
print(json.dumps([out, construct_tool_dicts(r.tools, r.tool_choice)]))
"""


def test_tools_render_no_longer_than_the_bound_measures() -> None:
    python = _require_python()
    done = subprocess.run([str(python), "-c", _DUMP], input=json.dumps(
        [CHAT_TOOLS, RESPONSES_TOOLS]), capture_output=True, text=True, timeout=300,
        check=True)
    chat, responses = json.loads(done.stdout.strip().splitlines()[-1])
    for tool, [dump] in zip(CHAT_TOOLS, chat, strict=True):
        assert json_indent2_len(rendered_tools([tool])[0]) >= json_indent2_len(dump), dump
    for tool, dump in zip(RESPONSES_TOOLS, responses, strict=True):
        fn = {k: v for k, v in tool.items() if k != "type"}
        mine = rendered_tools([{"type": "function", "function": fn}])[0]
        assert json_indent2_len(mine) >= json_indent2_len(dump), dump
    # What makes the client's own JSON fall short: the defaults vLLM writes in.
    assert chat[0] == [{"type": "function", "function": {
        "name": "f", "description": None, "parameters": None}}]


DOCS = [{"title": "Gateways", "text": "Envoy sits in front of vLLM and meters tokens."}]


@pytest.mark.parametrize("extra", [
    {"documents": DOCS},
    {"reasoning_effort": "high"},
    {"documents": DOCS, "chat_template_kwargs": {"documents": []}},
    {"reasoning_effort": "low", "chat_template_kwargs": {"enable_thinking": False}},
])
def test_the_prompt_recount_counts_what_chat_completions_render(
        vllm_server: VllmServer, extra: dict[str, Any]) -> None:
    """vLLM's chat completions hand `documents` and `reasoning_effort` (with
    `enable_thinking`) to the template as arguments; its /tokenize reads only
    `chat_template_kwargs`. The tier's template renders both (tests/vllm/make_model.py)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there."}],
            "max_tokens": 1, **extra}
    prompt = json.loads(vllm_server.post("/v1/chat/completions", body))["usage"][
        "prompt_tokens"]
    plain = json.loads(vllm_server.post("/v1/chat/completions", {
        k: v for k, v in body.items() if k not in extra}))["usage"]["prompt_tokens"]
    assert prompt > plain or extra.get("chat_template_kwargs") == {"enable_thinking": False}
    recount = tokenize_request(Kind.CHAT, body, MODEL)
    assert recount is not None
    answers = [counted(json.loads(vllm_server.post("/tokenize", ask)))
               for ask in recount.asks]
    assert all(a is not None for a in answers)
    assert recount.total([a for a in answers if a is not None]) == prompt


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_a_text_part_with_a_media_key_is_held_as_its_text(vllm_server: VllmServer,
                                                          api: str) -> None:
    """vLLM reads a content part by its type: a text part with an `image_url` beside it
    is text, all of it (hold-bound review: held at one image's tokens, billed 4 times that)."""
    model = Model.model_validate({
        "upstream_model": MODEL, "backends": [{"url": vllm_server.url}],
        "tokens_per_image": 64, "chat_template_tokens_per_request": 16,
        "chat_template_tokens_per_message": 8})
    part = {"type": "text", "text": "zq7 " * 110, "image_url": {"url": "http://127.0.0.1:1/x"}}
    chat = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": [part]}]}
    if api == "chat":
        prompt = json.loads(vllm_server.post("/v1/chat/completions", chat))["usage"][
            "prompt_tokens"]
        held = chat_prompt(chat, model)[1]
    else:
        item = {"role": "user", "content": [{**part, "type": "input_text"}]}
        body = {"model": MODEL, "max_output_tokens": 1, "input": [item]}
        prompt = json.loads(vllm_server.post("/v1/responses", body))["usage"]["input_tokens"]
        held = responses_prompt(body, model)[1]
    assert prompt > 64 + 16 + 8  # its text, not an image
    assert held >= prompt


def test_the_part_keys_vllm_knows_are_the_gateways() -> None:
    """policy.tokens.PART_FIELDS: the keys of a media part vLLM does not hand to the
    template beside it; the others are held as text."""
    done = subprocess.run([str(_require_python()), "-c", (
        "import json, vllm\n"
        "from vllm.renderers.chat_utils import _KNOWN_CONTENT_PART_FIELDS as k\n"
        "print(json.dumps(sorted(k)))")], capture_output=True, text=True, timeout=300,
        check=True)
    assert set(json.loads(done.stdout.strip().splitlines()[-1])) == PART_FIELDS


# A byte-level BPE with no merges: one token per byte of the normalized text, the most
# any merges leave (and what a character tokenizer's byte fallback comes to).
_NORMALIZED = """
import json, sys
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
texts = json.loads(sys.stdin.read())
alphabet = pre_tokenizers.ByteLevel.alphabet()
out = {}
for form in ("NFC", "NFKC", "Lowercase", "NFD", "NFKD", "prefixed"):
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))},
                               merges=[]))
    if form == "prefixed":  # each digit its own split, each split a prefix space
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False)])
    else:
        tok.normalizer = getattr(normalizers, form)()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    out[form] = [len(tok.encode(t).ids) for t in texts]
print(json.dumps(out))
"""
# Tokens a byte may become past what `widest_len` measures: `prompt_tokens_per_byte`.
PER_BYTE = {"NFD": 3, "NFKD": 3, "prefixed": 2}
NORMALIZING = ["\ufdfa" * 50, "\u0958\u0959" * 40, "\u337f\u2474\ufb03" * 30,
               "\uff4c\uff4c\uff41\uff4d\uff41" * 9, "e\u0301" * 30, "\u1100\u1161" * 20,
               "plain ascii", "日本語のテキスト", "\u023a\u023e\u0130" * 30]


def test_text_is_bounded_after_a_tokenizers_normalizer() -> None:
    """Tokenizers that normalize first (NFC: Qwen; NFKC: XLM-R, T5; lower case: CLIP, a
    pooling model's `do_lower_case`) split a longer text than was sent: the byte measure
    is of its widest form (policy.tokens.widest_len)."""
    done = subprocess.run([str(_require_python()), "-c", _NORMALIZED],
                          input=json.dumps(NORMALIZING), capture_output=True, text=True,
                          timeout=300, check=True)
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    for form, tokens in counts.items():
        for text, n in zip(NORMALIZING, tokens, strict=True):
            assert PER_BYTE.get(form, 1) * utf8_len(text) >= n, (form, text)
    # What the setting is for: a decomposing normalizer, a prefix on every split.
    digits = subprocess.run([str(_require_python()), "-c", _NORMALIZED],
                            input=json.dumps(["1234567890" * 20, "\ud7a3" * 50]),
                            capture_output=True, text=True, timeout=300, check=True)
    more = json.loads(digits.stdout.strip().splitlines()[-1])
    assert more["prefixed"][0] > 200 and more["NFD"][1] > utf8_len("\ud7a3" * 50)
    assert counts["NFKC"][0] == 33 * 50 > len("\ufdfa".encode()) * 50  # not the raw bytes


def test_a_template_variable_in_every_message_is_held_each_time(
        vllm_server: VllmServer) -> None:
    """Hold bound tester: a `chat_template_kwargs` value the template writes in every
    message was held once (3,813 billed on a 1,970 hold, through the end token a Zephyr
    template writes after each message: such special-token keys are refused now). A
    variable of the template's own is held once a message, and once more."""
    model = Model.model_validate({
        "upstream_model": MODEL, "backends": [{"url": vllm_server.url}],
        "chat_template_tokens_per_request": 16, "chat_template_tokens_per_message": 8})
    messages = [{"role": ("user", "assistant")[i % 2], "content": ""} for i in range(6)]
    kwargs = {"sep": "\u007f" * 70}
    plain = {"model": MODEL, "max_tokens": 1, "messages": messages}
    body = {**plain, "chat_template_kwargs": kwargs}
    billed, base = (json.loads(vllm_server.post("/v1/chat/completions", b))["usage"][
        "prompt_tokens"] for b in (body, plain))
    assert billed - base > 2 * json_indent2_len(kwargs)  # more than one count of it
    assert chat_prompt(body, model)[1] >= billed
