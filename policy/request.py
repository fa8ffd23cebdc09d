"""OpenAI request bodies: validate, read what the gateway needs, rewrite for the backend.

Pure functions over bytes: `parse_request` returns an `InferenceRequest` or
raises an `ApiError` (400/404/413) naming the offending field in `param`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from policy import tokens
from policy.config import Config, Model
from policy.endpoints import Endpoint, Kind
from policy.errors import ApiError, invalid_request, model_not_found, request_too_large


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    alias: str
    model: Model
    stream: bool
    # The client asked for the usage chunk itself (stream_options.include_usage).
    client_wants_usage: bool
    # The completion-token ceiling: the request's max_tokens, else the model's cap.
    max_tokens: int
    prompt_estimate: int  # typical count: the TPM reservation
    prompt_bound: int  # never undercounts: the worst-case cost for the budget
    body: dict[str, Any]


def _int_field(body: dict[str, Any], name: str, cap: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if type(v) is not int:
        raise invalid_request(f"'{name}' must be an integer.", name)
    if v < 1:
        raise invalid_request(f"'{name}' must be at least 1, got {v}.", name)
    if v > cap:
        raise invalid_request(f"'{name}' must be at most {cap} for this model, got {v}.", name)
    return v


def _content_text(content: Any, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise invalid_request("Each content part must be an object with a 'type'.",
                                      f"{param}[{i}]")
            text = part.get("text")
            if isinstance(text, str):
                parts.append(text)
        return " ".join(parts)
    raise invalid_request("'content' must be a string, an array of parts, or null.", param)


def _chat_prompt(body: dict[str, Any]) -> tuple[int, int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_request("'messages' must be a non-empty array.", "messages")
    texts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise invalid_request("Each message must be an object with a string 'role'.",
                                  f"messages[{i}]")
        texts.append(_content_text(m.get("content"), f"messages[{i}].content"))
    return tokens.chat_estimate(texts), tokens.chat_upper_bound(texts)


def _completion_prompt(body: dict[str, Any]) -> tuple[int, int]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return tokens.estimate(prompt), tokens.upper_bound(prompt) + 1
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return (sum(tokens.estimate(p) for p in prompt),
                    sum(tokens.upper_bound(p) + 1 for p in prompt))
        if all(type(p) is int for p in prompt):
            return len(prompt), len(prompt)
        if all(isinstance(p, list) and all(type(t) is int for t in p) for p in prompt):
            n = sum(len(p) for p in prompt)
            return n, n
    raise invalid_request(
        "'prompt' must be a string, an array of strings, or an array of token ids.", "prompt"
    )


def parse_request(raw: bytes, endpoint: Endpoint, cfg: Config) -> InferenceRequest:
    """Validate a chat/completions body against the policy config."""
    if len(raw) > cfg.max_request_body_bytes:
        raise request_too_large(cfg.max_request_body_bytes)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
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

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid_request("'stream' must be a boolean.", "stream")
    opts = body.get("stream_options")
    wants_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise invalid_request("'stream_options' must be an object.", "stream_options")
        iu = opts.get("include_usage", False)
        if not isinstance(iu, bool):
            raise invalid_request("'include_usage' must be a boolean.",
                                  "stream_options.include_usage")
        wants_usage = iu

    cap = model.max_tokens
    max_tokens = _int_field(body, "max_tokens", cap)
    if endpoint.kind is Kind.CHAT:
        mct = _int_field(body, "max_completion_tokens", cap)
        max_tokens = mct if mct is not None else max_tokens
        prompt, bound = _chat_prompt(body)
    else:
        prompt, bound = _completion_prompt(body)
    return InferenceRequest(
        alias=alias,
        model=model,
        stream=stream,
        client_wants_usage=wants_usage,
        max_tokens=max_tokens if max_tokens is not None else cap,
        prompt_estimate=prompt,
        prompt_bound=bound,
        body=body,
    )


def upstream_body(req: InferenceRequest) -> bytes:
    """The body the backend gets: `model` → upstream name; streams always report usage."""
    body = dict(req.body)
    body["model"] = req.model.upstream_model
    if req.stream:
        opts = dict(body.get("stream_options") or {})
        opts["include_usage"] = True
        body["stream_options"] = opts
    return orjson.dumps(body)


def models_list(aliases: list[str], created: int) -> bytes:
    """GET /v1/models in OpenAI's list format."""
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"id": a, "object": "model", "created": created, "owned_by": "tokenbooth"}
                for a in aliases
            ],
        }
    )


__all__ = ["ApiError", "InferenceRequest", "models_list", "parse_request", "upstream_body"]
