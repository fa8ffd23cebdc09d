"""What a request's real usage record says it owes its holds, for settling them from
the record when the request's own settlement never came (its replica died between
writing the record and settling): the tokens and cost to charge, and the latest lease
end a hold of that request can have.

A request's own hold was admitted before its end (the record's start plus duration);
a later request reusing its id is admitted only after the first settled, so its lease
ends past `end + lease`. Settling only holds whose lease ends by `latest` leaves such
a request untouched. The slack covers the rounding of the record's times (to the
millisecond); a lease the config has since made shorter leaves the own hold unsettled
(charged as lost, as before), never another's settled.

The mark (`seen_mark`) is how the Redis usage sink hands this to every replica's
lost-hold sweep: the value of the record's seen key (authz/state/usage/redis_sink.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from policy.admission import check_usage
from policy.limits import usd_to_nano

SLACK_S = 0.002
_MARK = "r:"


@dataclass(frozen=True, slots=True)
class Owes:
    tokens: int  # the record's total_tokens, as its settlement charges them
    cost_nano: int
    latest: float  # no hold of this request has a lease ending later (epoch seconds)


def owes(rec: Mapping[str, Any], lease_s: Callable[[bool], float]) -> Owes:
    """What the request of a real record owes each of its holds; `lease_s(stream)` is
    the lease its admission gave. ValueError for a record that does not say."""
    tokens = rec.get("total_tokens")
    if type(tokens) is not int:
        raise ValueError("a record without total_tokens")
    try:
        cost = usd_to_nano(Decimal(str(rec["cost_usd"])))
        started = datetime.fromisoformat(str(rec["started_at"]))
        duration_s = float(rec.get("duration_ms") or 0) / 1000
    except (KeyError, InvalidOperation, TypeError) as e:
        raise ValueError(f"a record without its cost or start: {e}") from None
    check_usage(tokens, cost)
    end = started.timestamp() + duration_s
    return Owes(tokens, cost, end + lease_s(rec.get("stream") is True) + SLACK_S)


def seen_mark(o: Owes) -> str:
    """The mark a delivered real record leaves (never `lost`, which marks a lost one)."""
    return f"{_MARK}{o.tokens}:{o.cost_nano}:{o.latest!r}"


def from_seen_mark(raw: bytes | str | None) -> Owes | None:
    """The Owes of a seen key's value; None for any other (`lost`, `1`: a record from a
    release before this one, or none)."""
    if raw is None:
        return None
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    if not text.startswith(_MARK):
        return None
    try:
        tokens, cost, latest = text[len(_MARK):].split(":")
        o = Owes(int(tokens), int(cost), float(latest))
        check_usage(o.tokens, o.cost_nano)
    except ValueError:
        return None
    return o if math.isfinite(o.latest) else None
