"""Token usage, its cost, and the usage record every admitted request leaves."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from policy.config import Price
from policy.limits import cost_nano, nano_to_usd

_PER_1K = Decimal(1000)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def cost_usd(usage: Usage, price: Price) -> Decimal:
    """Exact cost in USD: tokens times the price per 1k tokens, in Decimal."""
    return (usage.prompt_tokens * price.input + usage.completion_tokens * price.output) / _PER_1K


def charged_usd(usage: Usage, price: Price) -> Decimal:
    """What the ledgers charge for `usage`: its cost rounded up to the nano-dollar, as
    settlement does (`cost_nano`). Equal to `cost_usd` at any price of nine decimals per
    token or fewer; above that, a record says what its budget paid, not less."""
    return nano_to_usd(cost_nano(usage.prompt_tokens, usage.completion_tokens, price))


def loads_lenient(data: bytes | bytearray) -> Any:
    """JSON from a backend's bytes, bytes that are no UTF-8 read as U+FFFD (orjson refuses
    them outright: a usage chunk with one went unread, its usage estimated, and reached
    a client that had not asked for it: hostile-backend tester). JSONDecodeError still
    for what is no JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        if data.isascii():
            raise
        return orjson.loads(bytes(data).decode("utf-8", "replace"))


def answered_choices(obj: Any) -> int:
    """Choices of a chat or completions JSON answer that carry generated text (its
    content, reasoning, tool calls; a completion's text), or a Responses answer's
    output items that do (a message's text, a function call, reasoning): a token each,
    at least."""
    if isinstance(obj, dict) and isinstance(obj.get("output"), list):
        return sum(1 for item in obj["output"] if _item_has_text(item))
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list):
        return 0
    n = 0
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if isinstance(message, dict):
            if any(message.get(k) for k in ("content", "reasoning", "reasoning_content",
                                            "tool_calls")):
                n += 1
        elif choice.get("text"):
            n += 1
    return n


def _item_has_text(item: Any) -> bool:
    if not isinstance(item, dict):
        return False
    if item.get("type") == "function_call":
        return bool(item.get("name"))
    parts: list[Any] = []
    for key in ("content", "summary"):  # a message's text; a reasoning item's too
        got = item.get(key)
        if isinstance(got, list):
            parts += got
    return any(isinstance(p, dict) and p.get("text") for p in parts)


def usage_from_obj(obj: Any, generates: bool = False) -> Usage | None:
    """Read a `usage` block; None when absent or malformed. Chat, completions and the
    pooling endpoints count `prompt_tokens` / `completion_tokens` (absent or null for
    prompt-only ones: not for an endpoint that `generates`, where it is no count);
    the Responses API `input_tokens` / `output_tokens`."""
    if not isinstance(obj, dict):
        return None
    p = obj.get("prompt_tokens")
    if p is None:
        p, c = obj.get("input_tokens"), obj.get("output_tokens")
    else:
        c = obj.get("completion_tokens")
    if c is None:
        if generates:  # (hostile-backend retest: charged 0 completion tokens, exact)
            return None
        c = 0
    if type(p) is not int or type(c) is not int or p < 0 or c < 0:
        return None
    return Usage(p, c)


# The status of a record written for a hold whose request never settled (its replica
# died): charged at its full hold, `estimated`. A later real record supersedes it.
LOST = "lost"


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One per admitted request (contract §5). `cost_usd` is an exact decimal string.
    `status` is the HTTP status (499: the client went away), or LOST."""

    request_id: str
    key_id: str
    org: str
    model: str
    upstream_model: str
    backend: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: str
    status: int | str
    stream: bool
    estimated: bool
    started_at: str
    duration_ms: float
    endpoint: str
    # The budget ledgers settlement charged: the key's and the org's period id (e.g.
    # `month:2026-12`), or None where that owner had no budget when it was admitted.
    key_budget_period: str | None = None
    org_budget_period: str | None = None
    # Sequences generated per prompt (`n`; vLLM ignores `best_of`): vLLM reads the prompt
    # once per sequence (its prompt-token counter counts it so), where usage counts it once.
    sequences: int = 1
    # The request's hold: the most prompt tokens the backend can count for its body (once
    # per sequence, as `prompt_tokens`) and the most it can generate. None: nothing was
    # held for tokens (GET /v1/models), or a record of a version before they were kept.
    # `audit --vllm` weighs estimated records by them.
    prompt_bound: int | None = None
    completion_bound: int | None = None

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: that deep-copies field by field, measurably slow per request.
        return {name: getattr(self, name) for name in _RECORD_FIELDS}


_RECORD_FIELDS = tuple(f.name for f in fields(UsageRecord))


def iso_z(moment: datetime) -> str:
    """A record's time: ISO 8601 in UTC with a `Z`."""
    return moment.isoformat().replace("+00:00", "Z")


def make_record(
    *,
    request_id: str,
    key_id: str,
    org: str,
    model: str,
    upstream_model: str,
    backend: str,
    usage: Usage,
    price: Price,
    status: int,
    stream: bool,
    estimated: bool,
    started_at: datetime,
    duration_ms: float,
    endpoint: str,
    key_budget_period: str | None = None,
    org_budget_period: str | None = None,
    sequences: int = 1,
    prompt_bound: int | None = None,
    completion_bound: int | None = None,
) -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        key_id=key_id,
        org=org,
        model=model,
        upstream_model=upstream_model,
        backend=backend,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        cost_usd=format(charged_usd(usage, price).normalize(), "f"),
        status=status,
        stream=stream,
        estimated=estimated,
        started_at=iso_z(started_at),
        duration_ms=round(duration_ms, 3),
        endpoint=endpoint,
        key_budget_period=key_budget_period,
        org_budget_period=org_budget_period,
        sequences=sequences,
        prompt_bound=prompt_bound,
        completion_bound=completion_bound,
    )
