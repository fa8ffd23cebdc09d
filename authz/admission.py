"""Admission and settlement against the limit store, and their OpenAI-shaped refusals."""

from __future__ import annotations

import logging
from datetime import datetime

from authz.limits.base import LimitStore, LimitStoreUnavailable
from policy.errors import ApiError, service_unavailable
from policy.limits import (
    Ask,
    Decision,
    Limits,
    period_reset_s,
    rate_headers,
    retry_after_header,
)

log = logging.getLogger("tokenbooth.limits")

_MESSAGES = {
    "requests": "Rate limit reached for requests per minute. Retry after the time given.",
    "tokens": "Rate limit reached for tokens per minute. Retry after the time given.",
    "tokens_too_large": "This request reserves more tokens than the per-minute limit allows; "
                        "lower max_tokens or the prompt.",
    "concurrency": "Too many requests in flight for this API key.",
}


class Admission:
    def __init__(self, store: LimitStore) -> None:
        self._store = store

    async def admit(self, limits: Limits, ask: Ask, now: datetime) -> Decision:
        """A Decision that allowed the request, or an ApiError (429 or fail-closed 503)."""
        if not limits.any:
            return Decision(True)
        try:
            decision = await self._store.admit(limits, ask, now.timestamp())
        except LimitStoreUnavailable as e:
            log.error("admission failed closed: %s", e, extra={"request_id": ask.request_id})
            raise service_unavailable(
                "Rate limits cannot be checked right now; retry shortly."
            ) from None
        if decision.allowed:
            return decision
        raise refusal(decision, limits, now)

    async def settle(self, limits: Limits, ask: Ask, used_tokens: int, cost_nano: int,
                     now: datetime) -> None:
        if not limits.any:
            return
        try:
            await self._store.settle(limits, ask, used_tokens, cost_nano, now.timestamp())
        except LimitStoreUnavailable as e:
            # The reservation expires with its lease; the usage record is still written.
            log.error("settlement failed: %s", e, extra={"request_id": ask.request_id})


def refusal(d: Decision, limits: Limits, now: datetime) -> ApiError:
    headers = rate_headers(d)
    if d.reason == "budget":
        reset = period_reset_s(limits.budget_period, now)
        if reset is not None:
            headers.append(("retry-after", retry_after_header(reset)))
        return ApiError(
            429, "insufficient_quota",
            "This API key's budget for the period is exhausted."
            + ("" if reset is not None else " It does not reset."),
            type="insufficient_quota", headers=tuple(headers),
        )
    if d.retry_after_s is not None and d.reason != "tokens_too_large":
        headers.append(("retry-after", retry_after_header(d.retry_after_s)))
    return ApiError(429, "rate_limit_exceeded", _MESSAGES.get(d.reason, "Rate limit reached."),
                    type=d.reason if d.reason in ("requests", "tokens") else None,
                    headers=tuple(headers))
