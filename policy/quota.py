"""A key's and an org's quota as the admission sees it: the limits built from a key
record or an org entry, the hold an org takes of its key's request, and the 429 a denial
becomes, with a retry hint that says whether retrying can help."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from typing import Protocol

from policy.config import OrgLimits
from policy.errors import ApiError
from policy.limits import (
    Ask,
    Decision,
    Limits,
    period_id,
    period_reset_s,
    rate_headers,
    retry_after_header,
    tightest,
    usd_text,
    usd_to_nano,
)

# Sent when waiting cannot make the same request succeed; the openai SDKs then make no
# automatic retry (they honour it over their status-based rule).
NO_RETRY = ("x-should-retry", "false")
# The longest retry-after the openai SDKs wait for (python: up to 60 s; node: under 60 s);
# past it they retry after their own backoff (about 0.5 to 8 s), which cannot help.
SDK_MAX_RETRY_AFTER_S = 60
# A budget refusal: "budget", too little unspent; "budget_held", enough unspent but not
# beside the holds of requests in flight (it fits once they end).
BUDGET_REASONS = ("budget", "budget_held")


# -- org limits -------------------------------------------------------------------------

# An org's holds are taken under the pseudo-key `org:<name>`.
ORG_KEY_PREFIX = "org:"


class LimitFields(Protocol):
    """A key record or an org entry of the policy file: the fields limits are built from."""

    @property
    def rpm(self) -> int | None: ...
    @property
    def tpm(self) -> int | None: ...
    @property
    def max_concurrent(self) -> int | None: ...
    @property
    def budget_usd(self) -> Decimal | None: ...
    @property
    def budget_period(self) -> str: ...


def limits_from(src: LimitFields) -> Limits:
    """The enforceable limits of a key record or an org (budget in exact nano-USD)."""
    budget = None if src.budget_usd is None else usd_to_nano(src.budget_usd)
    return Limits(src.rpm, src.tpm, src.max_concurrent, budget, src.budget_period)


def org_hold(org: OrgLimits, ask: Ask, started: datetime) -> tuple[Limits, Ask]:
    """The org's limits and the hold its key's request takes of them: the same request
    under the pseudo-key `org:<name>`, in the org's own budget period."""
    org_ask = replace(ask, key_id=f"{ORG_KEY_PREFIX}{ask.org}",
                      period=period_id(org.budget_period, started))
    return limits_from(org), org_ask


# -- refusals ---------------------------------------------------------------------------

# {owner}: "API key" or "organization", whose limit refused.
_MESSAGES = {
    "requests": "Rate limit reached for requests per minute{of}. Retry after the time given.",
    "tokens": "Rate limit reached for tokens per minute{of}. Retry after the time given.",
    "tokens_too_large": "This request reserves more tokens than the per-minute limit{of} "
                        "allows; lower max_tokens or the prompt.",
    "concurrency": "Too many requests in flight for this {owner}.",
}


def untaken(d: Decision, tokens: int) -> Decision:
    """A look's Decision (`take=False`) as the rates stand, not as they would stand after
    the request it asked about: an allowed look reports one request and `tokens` fewer
    left than there are (a key with one of one left showed 0)."""
    if not d.allowed:
        return d  # a denial reports the rates unchanged
    return replace(
        d,
        remaining_requests=None if d.remaining_requests is None or d.limit_requests is None
        else min(d.limit_requests, d.remaining_requests + 1),
        remaining_tokens=None if d.remaining_tokens is None or d.limit_tokens is None
        else min(d.limit_tokens, d.remaining_tokens + tokens))


def exhausted(d: Decision, limits: Limits, cost_nano: int) -> bool:
    """Whether a refusal is the budget's own, for the alerts (`budget.request_refused`):
    too little is left for this request's worst case. Not a request larger than the
    whole budget, nor one waiting for holds in flight: neither says much is spent.
    (Spend alone seldom reaches the budget: a request is refused once what is left is
    below its worst case.)"""
    return d.reason == "budget" and not (
        limits.budget_nano is not None and cost_nano > limits.budget_nano)


def refusal(d: Decision, limits: Limits, now: datetime, cost_nano: int = 0,
            org: bool = False, other: Decision | None = None) -> ApiError:
    """The OpenAI-shaped 429 for a denied Decision, with its rate-limit headers, and a
    retry-after when waiting helps (a budget: only if its period resets) or
    `x-should-retry: false` when it cannot (a budget that never resets, a request larger
    than the limit: its worst-case `cost_nano` past the whole budget, or its tokens past
    the per-minute limit). `org`: the limits are the key's org's, not the key's own.
    `other`: the other party's state (the org's when the key refuses, the key's when
    the org does), so the headers show both, as on an admitted response."""
    headers = rate_headers(d if other is None else tightest(d, other))
    owner = "organization" if org else "API key"
    if d.reason in BUDGET_REASONS and limits.budget_nano is not None \
            and cost_nano > limits.budget_nano:
        headers.append(NO_RETRY)  # more than a whole period's budget: never fits
        return ApiError(
            429, "insufficient_quota",
            f"This request's worst-case cost (${usd_text(cost_nano)}: its prompt's bound, with "
            "the chat template's own tokens the gateway allows for, and max_tokens, at the "
            f"model's prices) is more than this {owner}'s whole budget for a period "
            f"(${usd_text(limits.budget_nano)}); lower max_tokens or the prompt.",
            type="insufficient_quota", headers=tuple(headers),
        )
    if d.reason == "budget_held":  # unspent, but held by requests in flight
        headers.append(("retry-after", "1"))
        return ApiError(
            429, "insufficient_quota",
            f"Requests in flight hold the rest of this {owner}'s budget for the period "
            "(each holds its worst-case cost until it ends); retry when they have ended.",
            type="insufficient_quota", headers=tuple(headers),
        )
    if d.reason == "budget":
        reset = period_reset_s(limits.budget_period, now)
        headers.extend(_wait(reset) if reset is not None else (NO_RETRY,))
        return ApiError(
            429, "insufficient_quota",
            f"This {owner}'s budget for the period is exhausted, or too little is left for "
            "this request's worst-case cost (its prompt and max_tokens at the model's "
            "prices, held until it ends)."
            + ("" if reset is not None else " It does not reset."),
            type="insufficient_quota", headers=tuple(headers),
        )
    if d.reason == "tokens_too_large":
        headers.append(NO_RETRY)  # larger than the limit itself: never fits
    elif d.retry_after_s is not None:
        # The other party's rate spent too (the key's, when its org refuses): the longer
        # wait, so a client waiting it out is not refused again by the other.
        wait = d.retry_after_s
        if other is not None and other.reason in _TYPES and other.retry_after_s is not None:
            wait = max(wait, other.retry_after_s)
        headers.extend(_wait(wait))
    else:  # concurrency, a duplicate id: free again when a request in flight ends
        headers.append(("retry-after", "1"))
    # The key's own limits read as before; an org's say so.
    message = _MESSAGES.get(d.reason, "Rate limit reached.").format(
        owner=owner, of=" of this organization" if org else "")
    return ApiError(429, "rate_limit_exceeded", message, type=_TYPES.get(d.reason),
                    headers=tuple(headers))


# OpenAI's `type` for a rate limit names the one reached; a request too large for the
# tokens per minute is on that one too (as OpenAI's "Request too large ... on tokens per
# min"), not the generic `rate_limit_error`. Concurrency has no OpenAI counterpart.
_TYPES = {"requests": "requests", "tokens": "tokens", "tokens_too_large": "tokens"}


def _wait(seconds: float) -> tuple[tuple[str, str], ...]:
    """`retry-after`, and `x-should-retry: false` beside it when the wait is longer than
    the SDKs honour (a budget's period that resets in hours): their automatic retries
    would come within seconds and be refused; the header still says when to come back."""
    after = retry_after_header(seconds)
    return (("retry-after", after),) if int(after) <= SDK_MAX_RETRY_AFTER_S \
        else (("retry-after", after), NO_RETRY)
