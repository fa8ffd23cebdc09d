"""OpenAI / vLLM request bodies: validate, bound what they can use, rewrite for the backend.

Pure functions over bytes: `parse_request`, the one entry point, reads the body the way
the endpoint's kind says (`_PARSERS`, a table) and returns an `InferenceRequest` or
raises an `ApiError` (400/404/413) naming the offending field in `param`. Every body it
accepts has a true upper bound of its usage (`prompt_bound`, `completion_bound`): a
generating body sent upstream carries its token limit, and fields whose tokens cannot
be bounded are refused. The kinds' own rules: `policy.request_responses` (the Responses
API), `policy.request_pooling` (embeddings, rerank, score).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from policy import tokens
from policy.bounds import MAX_EXACT
from policy.config import Config, Model
from policy.endpoints import Endpoint, Kind
from policy.errors import ApiError, invalid_request, model_not_found, request_too_large
from policy.limits import cost_nano
from policy.request_fields import (
    check_field_types,
    check_vllm_rules,
    lax_bool,
    lax_int,
    lax_true,
)
from policy.request_pooling import embeddings_input, scoring_pairs
from policy.request_responses import responses_prompt

# Fields whose prompt tokens no byte count bounds: a client's own chat template (Jinja
# can loop), prompt embeddings (a tensor's bytes do not bound its rows), and media
# options (they change how many tokens one media item becomes).
UNBOUNDED_FIELDS: Final = ("chat_template", "prompt_embeds", "mm_processor_kwargs",
                           "media_io_kwargs")

# Of those, the ones vLLM reads whenever they are not null.
PRESENT_FIELDS: Final = frozenset({"prompt_embeds"})

# vLLM's prefill/decode (and encoder cache) transfer parameters: with a KV connector,
# `do_remote_decode` makes the backend keep a request's KV cache for a remote decoder
# (for minutes, after one token), and `remote_host` / `remote_port` make it fetch
# another's KV cache from where the body says.
TRANSFER_FIELDS: Final = ("kv_transfer_params", "ec_transfer_params")


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    alias: str
    model: Model
    prompt_estimate: int  # typical prompt tokens, all prompts together
    prompt_bound: int  # prompt tokens the backend can count, at most
    body: dict[str, Any] = field(repr=False)
    upstream: bytes = field(repr=False)  # what `upstream_body` returns
    stream: bool = False
    # The client asked for the usage chunk itself (stream_options.include_usage).
    client_wants_usage: bool = False
    # Completion tokens per sequence: the client's limit (chat: max_completion_tokens
    # first; responses: max_output_tokens), else the model's cap, which the upstream
    # body then carries. 0: the endpoint generates nothing (embeddings, score, ...).
    max_tokens: int = 0
    # Sequences generated per prompt (`n`: vLLM runs, and counts each prompt, that many
    # times), and prompts in the request (a batched /v1/completions prompt has several;
    # embeddings: inputs, rerank / score: pairs).
    sequences: int = 1
    prompts: int = 1
    # A `best_of` larger than `n`: vLLM 0.32 ignores it (it runs `n`; the real-vLLM tier
    # checks), but the hold bounds it all the same (a backend that honours it generates
    # that many). 0: none sent.
    best_of: int = 0
    # Generated tokens per streamed chunk, at most (vLLM's `stream_interval` as sent
    # upstream; the first chunk carries one): a stream cut short is estimated by it.
    stream_interval: int = 1
    # vLLM may generate tokens it sends no chunk for: a reasoning parser holds back the
    # whole reasoning phase of a client that asked `include_reasoning: false`, a tool
    # parser the tool calls it is parsing. Such a stream cut short is charged its
    # completion bound, not the chunks seen (see `may_hide_tokens`).
    hides_tokens: bool = False
    # Each prompt a (query, document) pair (rerank / score): twice the context, and one.
    pairs: bool = False

    @property
    def prompt_ceiling(self) -> int | None:
        """Prompt tokens no backend can count for this request, and more: the model's
        context for each prompt (twice it and one for a rerank / score pair; a prompt
        past it is refused or cut), never below the bound. None: no `max_model_len`."""
        cap = self.model.max_model_len
        if cap is None:
            return None
        return max(self.prompt_bound, self.prompts * (2 * cap + 1 if self.pairs else cap))

    @property
    def completion_bound(self) -> int:
        """Completion tokens the backend can count, at most."""
        return self.max_tokens * max(self.sequences, self.best_of) * self.prompts

    @property
    def hold_tokens(self) -> int:
        """The TPM reservation: the prompt estimate plus the completion bound.

        A rate, not money: settlement corrects it to the real use, and reserving the
        byte bound (~4 times a typical prompt) would refuse requests that fit."""
        return self.prompt_estimate + self.completion_bound

    def hold_cost_nano(self) -> int:
        """The budget hold: the worst-case cost of this body at the model's prices."""
        return cost_nano(self.prompt_bound, self.completion_bound,
                         self.model.price_per_1k_tokens)


def may_hide_tokens(body: dict[str, Any]) -> bool:
    """Whether vLLM may generate tokens for this chat or Responses body that no streamed
    chunk shows: reasoning the client asked not to see, or tools it may call (measured on
    vLLM 0.32: a cut stream with `include_reasoning: false` showed 1 of 1,024 generated
    tokens; with `tool_choice: required`, 143 of 580)."""
    hidden = body.get("include_reasoning")
    if hidden is not None and not isinstance(hidden, bool):
        # vLLM reads "false", 0, "no" as false: hidden reasoning this test would miss.
        raise invalid_request("'include_reasoning' must be a boolean.", "include_reasoning")
    if hidden is False:
        return True
    tools = body.get("tools")
    return isinstance(tools, list) and bool(tools) and body.get("tool_choice") != "none"


def withholds_text(body: dict[str, Any]) -> bool:
    """Whether vLLM's Responses stream may go without an event while it generates: it
    sends one only for text, so tokens it holds back (text that may yet match a `stop`
    string) or that have none (special tokens a `logit_bias` or `allowed_token_ids` can
    force, or those past an ignored end of sequence) pass unseen (real-vLLM tester: 5
    deltas for 64 tokens with a long stop string, none for 169 with a bias to `<s>`).
    Chat and completions streams send a chunk for each step, text or not."""
    return bool(body.get("stop")) or bool(body.get("logit_bias")) \
        or bool(body.get("allowed_token_ids")) or lax_true(body.get("ignore_eos"))


def _int_field(body: dict[str, Any], name: str, cap: int) -> int | None:
    """A count the gateway reads itself, read as vLLM reads it (`5`, `"5"`, `5.0`) and
    written back as the integer it is, so that the backend gets what was held; a null
    is left out (vLLM's default: completions refuse `n: null` and `min_tokens: null`)."""
    v = _lax_int_field(body, name)
    if v is None:
        return None
    if v < 1:
        raise invalid_request(f"'{name}' must be at least 1, got {v}.", name)
    if v > cap:
        # (Past 2**53 the JSON parser read it as a float: its digits are not the ones
        # written, so none are quoted; real-vLLM tester.)
        got = f"{v}" if v <= MAX_EXACT else "a number past 2**53"
        raise invalid_request(f"'{name}' must be at most {cap} for this model, got {got}.",
                              name)
    return v


def _lax_int_field(body: dict[str, Any], name: str) -> int | None:
    """`body[name]` as vLLM reads an integer, written back canonical; a null removed."""
    if name not in body:
        return None
    v = body[name]
    if v is None:
        del body[name]
        return None
    if type(v) in (int, float) and abs(v) >= 2**63 and float(v).is_integer():
        # Past 64 bits (a float, as the JSON reader gives it): too large, not "not an
        # integer"; the caller's range check says so.
        return int(v)
    n = lax_int(v)
    if n is None:
        raise invalid_request(f"'{name}' must be an integer.", name)
    body[name] = n
    return n


def _lax_bool_field(body: dict[str, Any], name: str, param: str | None = None) -> bool | None:
    """`body[name]` as vLLM reads a boolean (`true`, `"true"`, `1`, `"yes"`), written
    back canonical; None when absent or null."""
    v = body.get(name)
    if v is None:
        return None
    b = lax_bool(v)
    if b is None:
        raise invalid_request(f"'{name}' must be a boolean.", param or name)
    body[name] = b
    return b


def _utf8(raw: bytes) -> bytes:
    """The body as UTF-8 without a BOM. vLLM reads JSON as Python's `json` does: a UTF-8
    BOM (PowerShell's UTF8, Windows editors) and UTF-16 / UTF-32 bodies are JSON to it
    too; the backend gets the body re-encoded as UTF-8 either way."""
    encoding = json.detect_encoding(raw[:4])
    if encoding == "utf-8":
        return raw
    try:
        return raw.decode(encoding).encode()
    except UnicodeError:  # invalid in the encoding it names: not JSON
        return raw


def _load(raw: bytes, cfg: Config) -> tuple[dict[str, Any], str, Model]:
    """The decoded body, its model alias and the model."""
    if len(raw) > cfg.max_request_body_bytes:
        raise request_too_large(cfg.max_request_body_bytes)
    try:
        body = orjson.loads(_utf8(raw))
    except orjson.JSONDecodeError as e:
        if str(e).startswith("depth limit exceeded"):  # orjson's limit: 1024 levels
            raise invalid_request("The request body is nested too deeply (over 1024 "
                                  "levels of arrays and objects).") from None
        if str(e).startswith("number is infinity"):  # valid JSON, past any double
            raise invalid_request("The request body holds a number too large to "
                                  "read (past 1.8e308).") from None
        raise invalid_request("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.")
    alias = body.get("model")
    if alias is None:
        raise invalid_request("You must provide a 'model' parameter.", "model")
    if not isinstance(alias, str):
        raise invalid_request("'model' must be a string.", "model")
    model = cfg.models.get(alias)
    if model is None:
        raise model_not_found(alias)
    for name in UNBOUNDED_FIELDS:
        # null and empty are as good as absent; `prompt_embeds` set at all is not (vLLM
        # refuses `0` or `""` whatever its options: tester, refused after admission),
        # but for an empty list, which vLLM reads as none (retest).
        if body.get(name) or (name in PRESENT_FIELDS and body.get(name) not in (None, [])):
            raise invalid_request(
                f"'{name}' is not accepted here: its prompt tokens cannot be bounded.", name)
    if body.get("priority"):
        # vLLM's priority scheduling orders requests by it: one tenant's client must not
        # move ahead of the others'.
        raise invalid_request("'priority' is not accepted here: the backend's scheduling "
                              "order is the gateway operator's.", "priority")
    xargs = body.get("vllm_xargs")
    for name in TRANSFER_FIELDS:
        # vLLM merges `vllm_xargs` into the same extra args its engine reads them from.
        param = (name if body.get(name) else f"vllm_xargs.{name}"
                 if isinstance(xargs, dict) and name in xargs else None)
        if param is not None:
            raise invalid_request(
                f"'{param}' is not accepted here: disaggregated serving's transfer "
                "parameters are set by the operator's router; a client's would make the "
                "backend hold or fetch KV cache its usage does not report.", param)
    if lax_true(body.get("use_beam_search")):  # as vLLM reads it: "false" is false
        # vLLM's beam search runs one generation per beam per token, each reading the
        # whole prompt again: its usage (and so its price) shows a fraction of the work.
        raise invalid_request("'use_beam_search' is not accepted here: the backend's work "
                              "for it is many times what its usage reports.",
                              "use_beam_search")
    return body, alias, model


def _stream(body: dict[str, Any]) -> bool:
    return _lax_bool_field(body, "stream") or False


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, the client wants the usage chunk)."""
    raw = body.get("stream")
    stream = _stream(body)
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise invalid_request("'stream_options' must be an object.", "stream_options")
    # null is as good as absent (vLLM and OpenAI read it so)
    wants_usage = _lax_bool_field(opts, "include_usage", "stream_options.include_usage") \
        or False
    if opts and not stream:
        if raw:  # `"false"`: vLLM's own check reads the raw value, true, and lets the
            # options through, unread (retest tester); sent `false`, they would be refused
            del body["stream_options"]
            return False, False
        # OpenAI and vLLM refuse it too: without this, vLLM's 400 came after the hold.
        raise invalid_request("'stream_options' is only allowed when 'stream' is true.",
                              "stream_options")
    return stream, wants_usage


COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions


def _max_tokens(body: dict[str, Any], kind: Kind, cap: int) -> tuple[int, bool]:
    """Completion tokens per sequence, and whether the upstream body must be given them."""
    if (kind is Kind.COMPLETION and lax_true(body.get("echo"))
            and body.get("max_tokens") is not None and lax_int(body["max_tokens"]) == 0):
        # Prompt scoring (lm-eval's loglikelihood): vLLM 0.32 echoes the prompt and
        # generates one token it does not return, but counts.
        body["max_tokens"] = 0
        return 1, False
    if kind is Kind.CHAT:
        mct = _int_field(body, "max_completion_tokens", cap)
        if mct is not None:  # vLLM prefers it to the deprecated max_tokens, then unread
            _lax_int_field(body, "max_tokens")
            return mct, False
    max_tokens = _int_field(body, "max_tokens", cap)
    if max_tokens is not None:
        return max_tokens, False
    # Written upstream, so the backend cannot exceed the hold: chat gets the model's cap;
    # completions keep OpenAI's and vLLM's default of 16.
    return (cap if kind is Kind.CHAT else min(COMPLETIONS_DEFAULT_MAX_TOKENS, cap)), True


def _min_tokens(body: dict[str, Any], max_tokens: int) -> None:
    """vLLM's `min_tokens` must lie in 0…max_tokens (its own check, after the hold); an
    integer, as `max_tokens` must be here (a float or a bool skipped the range check)."""
    v = _lax_int_field(body, "min_tokens")
    if v is None:
        return
    if not 0 <= v <= max_tokens:
        raise invalid_request(f"'min_tokens' must be between 0 and the request's "
                              f"max_tokens ({max_tokens}), got {v}.", "min_tokens")


def _sequences(body: dict[str, Any], max_n: int) -> tuple[int, int]:
    """Sequences generated per prompt (`n`), and `best_of` when sent and larger (vLLM
    0.32 ignores it, in chat too: the hold alone counts it), else 0."""
    n = _int_field(body, "n", max_n) or 1
    raw = body.get("best_of")
    best_of = None if raw is None else lax_int(raw)
    if best_of is None or best_of < 1:
        # vLLM 0.32 never reads it: `0`, `"x"` are served as if absent (retest tester),
        # and a backend that honours it would refuse them itself.
        return n, 0
    _int_field(body, "best_of", max_n)  # its range, and written back as an integer
    return n, best_of if best_of > n else 0


def _stream_interval(body: dict[str, Any], model: Model, stream: bool) -> int:
    """Tokens per streamed chunk: the model's setting, or the client's own when smaller
    (a larger one would let a client that leaves mid-stream hide what was generated)."""
    asked = _int_field(body, "stream_interval", 1 << 31)
    if not stream:
        return 1
    return min(asked, model.stream_interval) if asked else model.stream_interval


def _upstream(body: dict[str, Any], model: Model, limit: tuple[str, int] | None = None,
              stream_usage: bool = False, interval: int = 1) -> bytes:
    """The body the backend gets: `model` → upstream name; `limit` (a field and its
    value) written when the client set no limit; streams of chat and completions always
    report usage (`stream_usage`) and carry their `interval` when it is not vLLM's 1."""
    out = dict(body)
    out["model"] = model.upstream_model
    if limit is not None:
        out[limit[0]] = limit[1]
    if interval > 1 or "stream_interval" in body:
        out["stream_interval"] = interval
    if stream_usage:
        opts = dict(body.get("stream_options") or {})
        if opts.get("include_usage") is not True:
            # vLLM's continuous_usage_stats puts usage in every chunk, but only with
            # include_usage, which is forced here: not for a client that did not ask.
            opts.pop("continuous_usage_stats", None)
        opts["include_usage"] = True
        out["stream_options"] = opts
    try:
        return orjson.dumps(out)
    except orjson.JSONEncodeError:  # orjson reads deeper nesting than it writes
        raise invalid_request("The request body is nested too deeply.") from None


# Each parser: (body, alias, model, kind) -> InferenceRequest. Each encodes the upstream
# body first: the bound's measurements encode parts of it, which then cannot fail.
Parser = Callable[[dict[str, Any], str, Model, Kind], InferenceRequest]


def _generation(body: dict[str, Any], alias: str, model: Model, kind: Kind
                ) -> InferenceRequest:
    """/v1/chat/completions and /v1/completions."""
    stream, wants_usage = _stream_flags(body)  # first: vLLM's rules read `stream`
    check_field_types(body, kind)
    check_vllm_rules(body, kind)
    max_tokens, write = _max_tokens(body, kind, model.max_tokens)
    _min_tokens(body, max_tokens)
    sequences, best_of = _sequences(body, model.max_n)
    interval = _stream_interval(body, model, stream)
    upstream = _upstream(body, model, ("max_tokens", max_tokens) if write else None, stream,
                         interval)
    if kind is Kind.CHAT:
        prompts = 1
        estimate, bound = tokens.chat_prompt(body, model)
    else:
        estimate, bound, prompts = tokens.completion_prompt(body, model)
    return InferenceRequest(
        alias, model, estimate, bound, body, upstream, stream=stream,
        client_wants_usage=wants_usage, max_tokens=max_tokens, sequences=sequences,
        best_of=best_of, prompts=prompts, stream_interval=interval,
        hides_tokens=kind is Kind.CHAT and may_hide_tokens(body))


def _responses(body: dict[str, Any], alias: str, model: Model, kind: Kind
               ) -> InferenceRequest:
    """/v1/responses: `max_output_tokens` is the limit; the usage is always in the
    response (a stream's `response.completed` event), so nothing is added for it."""
    stream = _stream(body)
    check_field_types(body, kind)
    check_vllm_rules(body, kind)
    limit = _int_field(body, "max_output_tokens", model.max_tokens)
    upstream = _upstream(body, model, None if limit else ("max_output_tokens",
                                                          model.max_tokens))
    estimate, bound = responses_prompt(body, model)
    return InferenceRequest(alias, model, estimate, bound, body, upstream, stream=stream,
                            max_tokens=limit or model.max_tokens,
                            hides_tokens=may_hide_tokens(body) or withholds_text(body))


def _pooling(body: dict[str, Any], alias: str, model: Model, kind: Kind
             ) -> InferenceRequest:
    """Embeddings, rerank and score: prompt tokens only, never streamed."""
    if lax_true(body.get("stream")):  # as vLLM reads it: "false" is false (review)
        raise invalid_request("This endpoint does not stream.", "stream")
    check_field_types(body, kind)
    check_vllm_rules(body, kind)
    upstream = _upstream(body, model)
    if kind is Kind.EMBEDDINGS:
        estimate, bound, n = embeddings_input(body, model)
    else:
        estimate, bound, n = scoring_pairs(body, model, rerank=kind is Kind.RERANK)
    return InferenceRequest(alias, model, estimate, bound, body, upstream, prompts=n,
                            pairs=kind is not Kind.EMBEDDINGS)


def _tokenize(body: dict[str, Any], alias: str, model: Model, kind: Kind
              ) -> InferenceRequest:
    """/tokenize and /detokenize: no tokens are used; counted as requests only. Chat
    messages are checked as chat's are: vLLM renders them, fetching and processing their
    media, and a part chat refuses (a video without tokens_per_video) is refused here
    too (it reached the backend, which did that work for no record's cost)."""
    if "messages" in body:
        tokens.chat_prompt(body, model)
    return InferenceRequest(alias, model, 0, 0, body, _upstream(body, model))


_PARSERS: dict[Kind, Parser] = {
    Kind.CHAT: _generation, Kind.COMPLETION: _generation, Kind.RESPONSES: _responses,
    Kind.EMBEDDINGS: _pooling, Kind.RERANK: _pooling, Kind.SCORE: _pooling,
    Kind.TOKENIZE: _tokenize,
}  # fmt: skip


def parse_request(raw: bytes, endpoint: Endpoint, cfg: Config) -> InferenceRequest:
    """Validate a body for `endpoint` against the policy config and bound its usage."""
    parse = _PARSERS.get(endpoint.kind)
    if parse is None:
        if endpoint.kind is Kind.MULTIPART:
            raise invalid_request(
                "Multipart uploads (audio transcription and translation) are not "
                "supported through the gateway.", "file")
        raise invalid_request("This endpoint takes no request body.")
    body, alias, model = _load(raw, cfg)
    try:
        req = parse(body, alias, model, endpoint.kind)
        worst = req.prompt_bound + req.completion_bound
        if worst > MAX_EXACT or req.hold_cost_nano() > MAX_EXACT:
            # Counts and nano-USD are exact below 2**53 (policy/bounds.py): a worst case
            # past that (a batch of 50,000 prompts times n times max_tokens, an absurd
            # price) cannot be held, and no backend would serve it.
            raise invalid_request(
                f"This request's worst case ({worst:,} tokens at this model's prices) is "
                "more than the gateway can hold: lower max_tokens, n or the number of "
                "prompts.")
    except ApiError as e:  # its alias is known: the refusal's log line names it
        raise dataclasses.replace(e, model=alias) from None
    return req


def upstream_body(req: InferenceRequest) -> bytes:
    """The body the backend gets (encoded by `parse_request`, so it cannot fail here)."""
    return req.upstream


def _model_card(alias: str, created: int) -> dict[str, Any]:
    return {"id": alias, "object": "model", "created": created, "owned_by": "tokenbooth"}


def models_list(aliases: list[str], created: int) -> bytes:
    """GET /v1/models in OpenAI's list format."""
    return orjson.dumps({"object": "list", "data": [_model_card(a, created) for a in aliases]})


def model_object(alias: str, created: int) -> bytes:
    """GET /v1/models/{id} in OpenAI's model format."""
    return orjson.dumps(_model_card(alias, created))


__all__ = ["ApiError", "InferenceRequest", "model_object", "models_list", "parse_request",
           "upstream_body"]
