"""policy/tokens.py: byte measures and the prompt bounds, with exact values."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy.config import Model
from policy.errors import ApiError
from policy.tokens import (
    Tally,
    arguments_len,
    batch_bound,
    capped,
    chat_prompt,
    completion_prompt,
    estimate_bytes,
    field_tally,
    indent2_len,
    json_factor,
    json_indent2_len,
    json_len,
    message_tally,
    pairs_bound,
    prompt_list,
    rendered_tools,
    text_bound,
    utf8_len,
    widest_len,
)


def model(**extra: Any) -> Model:
    return Model.model_validate(
        {"upstream_model": "m", "backends": [{"url": "http://127.0.0.1:8000"}], **extra})


M = model()  # defaults: 16 per message, 512 per request, indent 4, 8 per prompt
FRAME = 16 + 512


def test_byte_measures() -> None:
    assert [utf8_len(s) for s in ("", "abc", "héllo", "中", "😀", "\ud800")] == [0, 3, 6, 3, 4, 3]
    assert json_len("a\nb") == 6  # quotes and the escape: never below the UTF-8 bytes
    assert json_len({"a": [1, "é"]}) == len('{"a":[1,"é"]}'.encode())
    assert json_indent2_len({"a": [1]}) == len('{\n  "a": [\n    1\n  ]\n}')
    # Integers past 64 bits (orjson refuses them) go through the stdlib encoder.
    assert json_indent2_len({"a": 2**70}) == len(json.dumps({"a": 2**70}, indent=2))
    assert [json_factor(i) for i in range(6)] == [1, 1, 1, 2, 2, 3]
    assert [estimate_bytes(n) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    assert (capped(10, None), capped(10, 4), capped(3, 4)) == (10, 4, 3)


def chat(body: dict[str, Any], m: Model = M) -> tuple[int, int]:
    return chat_prompt(body, m)


def test_chat_plain_messages_are_their_json_bytes_plus_the_template() -> None:
    msg = {"role": "user", "content": "hi"}
    n = len(b'{"role":"user","content":"hi"}')  # 30
    assert chat({"messages": [msg]}) == ((n + 3) // 4 + 3, n + FRAME)
    assert chat({"messages": [msg, msg]})[1] == 2 * n + 2 * 16 + 512
    tight = model(chat_template_tokens_per_message=1, chat_template_tokens_per_request=2)
    assert chat({"messages": [msg]}, tight)[1] == n + 1 + 2
    assert chat({"messages": [msg]}, model(max_tokens=10, max_model_len=100))[1] == 100


def test_tools_count_as_vllm_renders_them() -> None:
    """vLLM validates each tool and renders its dump: `description` and `parameters`
    appear as null when left out, and a tool's `defer_loading` is copied into its
    function. 200 minimal tools render 38,602 bytes at Llama 3.1's indent 4; measured
    as the client sent them they were bounded at 30,560 (tests/vllm checks the dumps
    against vLLM's own)."""
    msg = {"role": "user", "content": ""}
    lean = model(chat_template_tokens_per_message=0, chat_template_tokens_per_request=0)
    tools = [{"type": "function", "function": {"name": "f"}}] * 200
    vllm_dump = [{"type": "function", "function": {"name": "f", "description": None,
                                                   "parameters": None}}] * 200
    rendered = len(json.dumps(vllm_dump, indent=4, ensure_ascii=False))
    assert chat({"messages": [msg], "tools": tools}, lean)[1] >= rendered + len(
        json.dumps(msg))
    assert rendered_tools([{"type": "function", "defer_loading": True, "x": 1,
                            "function": {"name": "g"}}]) == [
        {"type": "function", "defer_loading": True, "x": 1, "function": {
            "name": "g", "description": None, "parameters": None, "defer_loading": True}}]
    assert rendered_tools("junk") == "junk"
    assert rendered_tools([1, {"function": 2}]) == [1, {"function": 2}]


def test_chat_json_fields_count_at_the_template_indent() -> None:
    msg = {"role": "user", "content": "hi"}
    base = chat({"messages": [msg]})[1]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"a": [1]}}}]
    t = json_indent2_len([{"type": "function", "function": {
        "name": "f", "parameters": {"a": [1]}, "description": None}}])
    assert chat({"messages": [msg], "tools": tools})[1] == base + 2 * t  # indent 4: 2x
    assert chat({"messages": [msg], "tools": tools},
                model(chat_template_json_indent=0))[1] == chat({"messages": [msg]})[1] + t
    # Strings are text; every listed field counts; unknown top-level fields do not.
    extra = {"tool_choice": "auto", "reasoning_effort": "low", "temperature": 1}
    assert chat({"messages": [msg], **extra})[1] == base + len(b'"auto""low"')
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    for name in ("response_format", "functions", "documents"):
        assert chat({"messages": [msg], name: fmt})[1] == base + 2 * json_indent2_len(fmt)
    # The kwargs once for the message and once more (template_kwargs_tally).
    assert chat({"messages": [msg], "chat_template_kwargs": fmt})[1] == (
        base + 2 * 2 * json_indent2_len(fmt))


@pytest.mark.parametrize("key", ["eos_token", "bos_token", "pad_token", "image_token",
                                 "additional_special_tokens", "chat_template", "padding",
                                 "max_length", "truncation", "tokenizer_kwargs", "tokenize",
                                 "conversation", "messages", "tools", "documents",
                                 "return_dict", "special_tokens_map"])
def test_template_kwargs_that_no_count_bounds_are_refused(key: str) -> None:
    """Hold bound tester, against real vLLM 0.32: kwargs reach the tokenizer's
    `apply_chat_template`, where its own parameters padded the prompt to 4,000 tokens on
    a 660 hold, a `chat_template` there was the request's template (3,000 on 686), and a
    special token overrode the one a template writes after each message (3,813 on
    1,970). Each is a 400 naming it, before anything is held."""
    msg = {"role": "user", "content": "hi"}
    with pytest.raises(ApiError) as e:
        chat({"messages": [msg], "chat_template_kwargs": {"enable_thinking": False,
                                                           key: ["x"]}})
    assert e.value.param == f"chat_template_kwargs.{key}"


def test_template_kwargs_users_send_are_taken() -> None:
    """What real templates read (retest): a count named `*_tokens` is no token list."""
    msg = {"role": "user", "content": "hi"}
    for kwargs in ({"enable_thinking": False}, {"thinking": True}, {"reasoning_effort": "high"},
                   {"builtin_tools": ["code_interpreter"], "date_string": "7 Dec 2026"},
                   {"max_thinking_tokens": 1000, "thinking_tokens": None},
                   {"add_generation_prompt": True, "continue_final_message": False}):
        chat({"messages": [msg], "chat_template_kwargs": kwargs})


def test_template_kwargs_count_once_a_message_and_once_more() -> None:
    """A template may write a variable of its own in each message it renders."""
    msgs = [{"role": "user", "content": "hi"}] * 5
    kwargs = {"enable_thinking": False, "persona": "x" * 100}
    once = json_indent2_len(kwargs)
    assert chat({"messages": msgs, "chat_template_kwargs": kwargs})[1] == (
        chat({"messages": msgs})[1] + 6 * 2 * once)


def test_tool_calls_count_as_sent_and_with_their_arguments_parsed() -> None:
    call = {"id": "c", "type": "function",
            "function": {"name": "f", "arguments": '{"x":[1,2]}'}}
    msg = {"role": "assistant", "content": None, "tool_calls": [call], "name": "bot"}
    scalars = len(b'{"role":"assistant","content":null,"name":"bot"}')
    expected = scalars + 2 * (json_indent2_len([call]) + json_indent2_len({"x": [1, 2]}))
    assert chat({"messages": [msg]})[1] == expected + FRAME
    # Arguments that are not JSON are rendered as {} by vLLM: only the string counts.
    bad = {**call, "function": {"name": "f", "arguments": "{oops"}}
    assert chat({"messages": [{**msg, "tool_calls": [bad]}]})[1] == (
        scalars + 2 * json_indent2_len([bad]) + FRAME)


def test_deep_arguments_count_their_full_rendering() -> None:
    deep: Any = 1
    for _ in range(200):
        deep = [deep]
    call = {"function": {"name": "f", "arguments": json.dumps(deep)}}
    _, bound = chat({"messages": [{"role": "assistant", "tool_calls": [call]}]})
    rendered = len(json.dumps(deep, indent=4))  # ~80 KB from 400 bytes of arguments
    assert bound > rendered


def _json_values(floats: st.SearchStrategy[float]) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | st.integers(-(2**80), 2**80) | floats
        | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
            st.text(max_size=4), inner, max_size=4),
        max_leaves=30)


def _rendered(value: Any) -> int:
    return len(json.dumps(value, indent=2, ensure_ascii=False).encode("utf-8", "surrogatepass"))


def _is_measured(measured: int, value: Any) -> bool:
    """The rendering's bytes exactly, where normalizing changes none; else at least its
    longest as sent, in NFC or in NFKC (measured piece by piece: possibly more)."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    forms = [unicodedata.normalize(f, text) for f in ("NFC", "NFKC")]
    forms += [f.lower() for f in (text, *forms)]
    if all(f == text for f in forms):
        return measured == _rendered(value)
    return measured >= max(len(t.encode("utf-8", "surrogatepass")) for t in (text, *forms))


def _nested(value: Any, depth: int) -> Any:
    for _ in range(depth):  # past orjson's 255 levels too
        value = [value] if depth % 2 else {"k": value}
    return value


# A parsed body holds no NaN or Infinity (orjson refuses them); an `arguments` string
# parsed by the stdlib may.
@given(_json_values(st.floats(allow_nan=False, allow_infinity=False)), st.integers(0, 300))
def test_a_body_values_length_is_its_rendering_length(value: Any, depth: int) -> None:
    value = _nested(value, depth)
    assert _is_measured(json_indent2_len(value), value)


@given(_json_values(st.floats()), st.integers(0, 300))
def test_any_values_length_is_its_rendering_length_at_any_depth(value: Any,
                                                                 depth: int) -> None:
    value = _nested(value, depth)
    assert _is_measured(indent2_len(value), value)


def test_text_is_measured_at_its_widest_normalization() -> None:
    """A tokenizer normalizes before it splits: U+FDFA is 3 bytes and 33 in NFKC (XLM-R,
    T5), U+0958 3 and 6 in NFC (Qwen); full-width letters are shorter in NFKC.
    A pooling model's input may be lowercased first (pooling tester)."""
    assert utf8_len("\ufdfa") == 33 and utf8_len("\u0958") == 6
    # ... and lowercases (vLLM's `do_lower_case` for pooling models): U+023A is 2 bytes,
    # its lower case 3.
    assert utf8_len("\u023a" * 150) == 450 and utf8_len("\u0130") == 3
    assert utf8_len("\uff4c\uff4c\uff41\uff4d\uff41") == 15 and utf8_len("hé") == 3
    assert json_len({"content": "\ufdfa" * 10}) == len(b'{"content":""}') + 330
    assert json_indent2_len(["\ufdfa"]) == len('[\n  ""\n]') + 33
    assert chat(parts_msg({"type": "text", "text": "\ufdfa" * 100}))[1] == (
        len(b'{"role":"user"}') + len(b'{"type":"text","text":""}') + 3300 + FRAME)


def test_prompt_tokens_per_byte_scales_every_byte_bound() -> None:
    """A tokenizer that decomposes (NFD: a Hangul syllable's 3 bytes become 9) or
    prefixes every split: the model says how many tokens a byte may become (retest)."""
    k3 = model(prompt_tokens_per_byte=3)
    text = "\ud7a3" * 10
    assert completion_prompt({"prompt": text}, k3)[1] == 3 * 30 + 8
    assert completion_prompt({"prompt": [text, text], "suffix": "ab"}, k3)[1] == 2 * (
        (3 * 30 + 8) + (3 * 2 + 8))
    assert completion_prompt({"prompt": [[1, 2, 3]]}, k3)[1] == 3  # ids are exact
    one, three = chat(parts_msg({"type": "text", "text": text})), chat(
        parts_msg({"type": "text", "text": text}), k3)
    assert three[1] - one[1] == 2 * (len(b'{"role":"user"}')
                                      + len(b'{"type":"text","text":""}') + 30)
    assert text_bound(text, k3) == 3 * 30 + 8


def test_floats_and_surrogates_are_measured_as_python_writes_them() -> None:
    # Python writes some floats longer than orjson (1e-07, 1e+16, NaN, Infinity); a lone
    # surrogate (json.loads takes "\\ud800" in an `arguments` string) is 3 bytes.
    assert json_indent2_len([1e-07, 1e16, 0.1]) == len(json.dumps([1e-07, 1e16, 0.1], indent=2))
    for v in ([1e-07, 1e16, 0.1], {"a": [float("inf"), float("-inf")]}, float("nan")):
        assert indent2_len(v) == len(json.dumps(v, indent=2))
    assert json_indent2_len(["\ud800", 2**70]) == len('[\n  "xxx",\n  ' + str(2**70) + "\n]")
    assert arguments_len('{"a": "\\ud800"}') == len('{\n  "a": "xxx"\n}')


def test_deep_arguments_are_measured_without_rendering_them() -> None:
    # 1 MiB of arguments nested 900 deep renders to ~0.9 GB at indent 2 (rendering it
    # held the services' event loop for 18 s, and every other request waited): now
    # measured in one pass over the parsed value, the same length as the rendering.
    one = "[" * 900 + "]" * 900
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": one}}
    rendered = len(json.dumps(json.loads(one), indent=2))
    assert arguments_len(one) == rendered
    n = (1 << 20) // len(one)
    _, bound = chat({"messages": [{"role": "assistant", "tool_calls": [call] * n}]})
    assert bound >= n * 2 * rendered  # indent 4: twice the indent-2 rendering


def parts_msg(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": list(parts)}]}


TEXT = {"type": "text", "text": "hé"}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 5000}}


def test_media_parts_are_bounded_by_the_model_or_refused() -> None:
    framing = len(b'{"role":"user"}') + FRAME
    with_image = model(tokens_per_image=300, tokens_per_audio=50, tokens_per_video=900)
    assert chat(parts_msg(TEXT, IMAGE), with_image)[1] == framing + json_len(TEXT) + 300
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    video = {"type": "video_url", "video_url": {"url": "http://x/v.mp4"}}
    assert chat(parts_msg(audio, video), with_image)[1] == framing + 50 + 900
    # A media key in a part of another type counts as that media, at the worst kind.
    sneaky = {"type": "image_url", "image_url": {"url": "x"}, "video_url": {"url": "x"}}
    assert chat(parts_msg(sneaky), with_image)[1] == framing + 900
    # A text part with a media key beside it is text to vLLM (read by its type; by its
    # keys only with a `uuid`): held as both, its text whatever its size (hold-bound
    # review: 110 words held at one image's 64 tokens, billed 451).
    for uuid in ({}, {"uuid": "u1"}):
        texty = {"type": "text", "text": "zq7 " * 110, "image_url": {"url": "x"}, **uuid}
        assert chat(parts_msg(texty), with_image)[1] == framing + json_len(texty) + 300
    # With a `uuid`, vLLM reads a part by its keys: a `tool_reference` one is its `name`,
    # text, whatever the type says (retest: held at one image, billed 451 tokens).
    named = {"type": "image_url", "uuid": "u", "tool_reference": {}, "name": "zq7 " * 110}
    named_extra = json_len({"tool_reference": {}})  # an unknown key beside the media
    assert chat(parts_msg(named), with_image)[1] == (
        framing + json_len(named) + 300 + named_extra)
    assert chat(parts_msg({**named, "uuid": None}), with_image)[1] == (
        framing + 300 + named_extra)
    # Keys vLLM does not know go to the template with a media part: held as text.
    odd = {**IMAGE, "caption": "zq7 " * 50, "detail": "auto"}
    assert chat(parts_msg(odd), with_image)[1] == framing + 300 + json_len(
        {"caption": "zq7 " * 50, "detail": "auto"})
    assert chat(parts_msg(TEXT, IMAGE), with_image)[0] == (
        estimate_bytes(len(b'{"role":"user"}') + json_len(TEXT)) + 300 + 3)


@pytest.mark.parametrize(
    ("part", "needle"),
    [
        (IMAGE, "tokens_per_image"),
        ({"type": "input_audio", "input_audio": {"data": ""}}, "tokens_per_audio"),
        ({"type": "video_url", "video_url": {"url": "x"}}, "tokens_per_video"),
        ({"type": "image_embeds", "image_embeds": "AAAA"}, "Embeddings parts"),
        ({"type": "file", "file": {"file_id": "f"}}, "File parts"),
        ({"type": "hologram"}, "Unsupported content part type 'hologram'"),
        ({"text": "no type"}, "must be an object with a 'type'"),
    ],
)
def test_unboundable_parts_are_a_400_naming_the_part(part: dict[str, Any], needle: str) -> None:
    with pytest.raises(ApiError) as e:
        chat(parts_msg(TEXT, part))
    assert (e.value.status, e.value.param) == (400, "messages[0].content[1]")
    assert needle in e.value.message


@pytest.mark.parametrize(
    ("messages", "param"),
    [(None, "messages"), ([], "messages"), ([{"content": "x"}], "messages[0]"),
     ([{"role": "user", "content": 5}], "messages[0].content"),
     ([{"role": "user", "content": {"text": "x"}}], "messages[0].content")],
)
def test_bad_messages(messages: Any, param: str) -> None:
    with pytest.raises(ApiError) as e:
        chat({"messages": messages})
    assert e.value.param == param


def test_completion_prompts_in_every_form() -> None:
    # (estimate, bound, prompts); strings get 8 special tokens each, token ids none.
    assert completion_prompt({"prompt": "hello"}, M) == (2, 5 + 8, 1)
    assert completion_prompt({"prompt": ["ab", "cdé"]}, M) == (1 + 1, (2 + 8) + (4 + 8), 2)
    assert completion_prompt({"prompt": [5, 6, 7]}, M) == (3, 3, 1)
    assert completion_prompt({"prompt": [[1], [2, 3]]}, M) == (3, 3, 2)
    # As vLLM's request models read ids (lax): a boolean or a float with no fraction is
    # one (endpoints tester: a 400 here, a 200 from vLLM).
    assert completion_prompt({"prompt": [1.0, True, 7]}, M) == (3, 3, 1)
    assert completion_prompt({"prompt": [[2.0], [False, 3]]}, M) == (3, 3, 2)
    # A string of an integer among them is one too ("1", " 7", "1_000", "1.00"); strings
    # alone are text prompts.
    assert completion_prompt({"prompt": ["1", 2, " 7", "1_000", "+1.00"]}, M) == (5, 5, 1)
    assert completion_prompt({"prompt": [["1"], ["2", 3]]}, M) == (3, 3, 2)
    assert completion_prompt({"prompt": ["1", "2"]}, M)[2] == 2
    # A suffix joins every prompt, with its fill-in-the-middle markers.
    assert completion_prompt({"prompt": ["a", "b"], "suffix": "xyz"}, M) == (
        2, 2 * ((1 + 8) + (3 + 8)), 2)
    assert completion_prompt({"prompt": [[1, 2]], "suffix": "xyz"}, M) == (3, 2 + 3 + 8, 1)
    # The context length caps each prompt.
    short = model(max_tokens=10, max_model_len=20)
    assert completion_prompt({"prompt": ["a" * 50, "b"]}, short)[1] == 20 + 9
    # Token ids are counted exactly: past the context, vLLM's 400 before the hold; with
    # truncate_prompt_tokens vLLM cuts them instead, so they pass (capped).
    with pytest.raises(ApiError) as e:
        completion_prompt({"prompt": [[1, 2], list(range(21))]}, short)
    assert e.value.param == "prompt" and "maximum context length is 20" in e.value.message
    assert completion_prompt({"prompt": list(range(19))}, short)[1] == 19
    # One that fills the context leaves vLLM nothing to generate: its 400 ("max_tokens
    # must be at least 1, got 0"), before the hold here (shapes tester).
    with pytest.raises(ApiError) as e:
        completion_prompt({"prompt": list(range(20))}, short)
    assert e.value.param == "prompt" and "no room for output" in e.value.message
    assert completion_prompt({"prompt": list(range(21)), "truncate_prompt_tokens": 5},
                             short)[1] == 20


@pytest.mark.parametrize(
    ("body", "param"),
    [({}, "prompt"), ({"prompt": 5}, "prompt"), ({"prompt": []}, "prompt"),
     ({"prompt": [[1], []]}, "prompt"), ({"prompt": ["a", ""]}, "prompt"),
     ({"prompt": [1, "a"]}, "prompt"), ({"prompt": [1.5]}, "prompt"),
     ({"prompt": [1, "1e3"]}, "prompt"), ({"prompt": [1, "1."]}, "prompt"),
     ({"prompt": [[1], ["a"]]}, "prompt"), ({"prompt": "x", "suffix": 3}, "suffix")],
)
def test_bad_completion_prompts(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as e:
        completion_prompt(body, M)
    assert (e.value.status, e.value.param) == (400, param)


def test_batch_bound_and_prompt_list_name_their_field() -> None:
    assert batch_bound(["ab", "cdé"], M) == (2, (2 + 8) + (4 + 8))
    assert batch_bound([[1, 2, 3]], M) == (3, 3)
    assert prompt_list([1, 2], "input") == [[1, 2]]
    with pytest.raises(ApiError) as e:
        prompt_list({"a": 1}, "input")
    assert e.value.param == "input" and "'input' must be" in e.value.message


def test_text_and_pair_bounds() -> None:
    short = model(max_tokens=10, max_model_len=20)
    assert (text_bound("héllo", M), text_bound("x" * 99, short)) == (6 + 8, 20)
    # Per pair: both texts, one padding token and `per_pair`; one query for all, or one each.
    assert pairs_bound(["ab"], ["c", "de"], M, 100) == (
        2 * 2, (10 + 9 + 1 + 100) + (10 + 10 + 1 + 100))
    assert pairs_bound(["a", "bb"], ["c", "d"], M, 0)[1] == (9 + 9 + 1) + (10 + 9 + 1)
    # Each pair is capped at twice the context plus one.
    assert pairs_bound(["x" * 99], ["y" * 99], short, 500)[1] == 41


def test_chat_pieces_name_the_caller_field() -> None:
    tally = Tally()
    message_tally({"role": "user", "content": "hi"}, "input", 3, M, tally)
    assert (tally.text, tally.messages) == (json_len({"role": "user", "content": "hi"}), 0)
    with pytest.raises(ApiError) as e:
        message_tally({"role": "user", "content": [{"type": "x"}]}, "input", 3, M, tally)
    assert e.value.param == "input[3].content[0]"
    field_tally("auto", tally)
    field_tally({"a": 1}, tally)
    assert tally.json == json_indent2_len({"a": 1})
    assert arguments_len('{"a": 1}') == json_indent2_len({"a": 1})
    assert arguments_len("{oops") == 0


def test_text_is_held_at_its_upper_and_title_case_too() -> None:
    """Hold bound retest against real vLLM 0.32: templates case what the client sends
    (llava-1.5's `role.upper()`, OpenChat's `role | title`, Gemma 4's `type | upper`), and
    `ΐ` is 2 bytes and 6 in upper case (3,608 billed on a 1,754 hold)."""
    for text in ("ΐ" * 600, ("ΐ " * 300), "ǆ" * 50, "ﬀ" * 40):
        for cased in (text.upper(), text.title()):
            assert widest_len(text) >= len(cased.encode())
    role = "ΐ" * 600
    bound = chat({"messages": [{"role": role, "content": "hi"}]},
                 model(chat_template_tokens_per_request=0, chat_template_tokens_per_message=0))[1]
    assert bound >= len(role.upper().encode())


def test_tool_parameters_are_held_for_a_signature_and_a_docstring_too() -> None:
    """Hold bound retest: vLLM's Hermes tool template writes each parameter's name in the
    function's signature, in its `Args:` docstring and in the schema's JSON: three times
    where the tool's JSON at the template's indent held two (3,960 billed on 3,386)."""
    name = "\u007f" * 1200 + "0"
    msg = {"role": "user", "content": "hi"}
    tools = [{"type": "function", "function": {"name": "f", "description": "", "parameters": {
        "type": "object", "properties": {name: {"type": "string", "description": "d" * 50}}}}}]
    grown = chat({"messages": [msg], "tools": tools})[1] - chat({"messages": [msg]})[1]
    assert grown >= 3 * (len(name.encode()) + 50)


def test_tools_are_held_before_every_user_message_equal_to_the_last() -> None:
    """Hold bound retest against real vLLM 0.32: Mistral-7B-Instruct-v0.3's HF template
    writes the whole tool list before every user message equal to the last one (`message
    == user_messages[-1]`): ten "x" turns had it written ten times (15,719 billed on a
    4,674 hold). Tools are held once for each such message."""
    tools = [{"type": "function", "function": {"name": "f", "description": "漢" * 500}}]

    def grown(messages: list[dict[str, Any]]) -> int:
        return (chat({"messages": messages, "tools": tools})[1]
                - chat({"messages": messages})[1])

    turn = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    once = grown(turn[:1])
    assert grown(turn * 9 + turn[:1]) == 10 * once
    # Parts compare by their text, as vLLM joins them; distinct turns hold it once.
    parts = {"role": "user", "content": [{"type": "text", "text": "x"}]}
    assert grown([parts, turn[1], turn[0]]) == 2 * once
    # As vLLM reads them (retest 3): a refusal or thinking part's text, by its type (not a
    # `text` key beside it); empty parts dropped.
    for content in ([{"type": "refusal", "refusal": "x"}],
                    [{"type": "thinking", "thinking": "x"}],
                    [{"type": "refusal", "text": "no", "refusal": "x"}],
                    [{"type": "text", "text": "x"}, {"type": "text", "text": ""}],
                    [{"type": "text", "text": ""}, {"type": "text", "text": "x"}]):
        assert grown([{"role": "user", "content": content}, turn[1], turn[0]]) == 2 * once, (
            content)
    assert grown([{"role": "user", "content": "a"}, turn[1], turn[0]]) == once
