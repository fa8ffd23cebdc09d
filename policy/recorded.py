"""What a request's real usage record says it owes its holds, for settling them from
the record when the request's own settlement never came (its replica died between
writing the record and settling): the tokens and cost to charge, and which holds are
its own.

A hold is the request's own when it is held for the record's key or the key's org and
was admitted at the record's start: the admission's `now` is the record's
`started_at` (the same datetime, exact to the microsecond), which each hold keeps
(`at`, redis_scripts.py). Another request under the same id (a client's reused
`x-request-id`, another key's concurrent one) was admitted at another moment, whatever
the replicas' clocks say. A hold admitted by a release before this one keeps no `at`:
for it, the lease end decides (no later than `latest`, the record's end plus its
lease: a later request under the id is admitted only after this one ended), which a
clock skew between replicas can fool; a lease the config has since made shorter
leaves the own hold unsettled (charged as lost, as before).

The mark (`seen_mark`) is how the Redis usage sink hands this to every replica's
lost-hold sweep: the value of the record's seen key (authz/state/usage/redis_sink.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from policy.admission import check_usage
from policy.limits import usd_to_nano

SLACK_S = 0.002
_MARK = "r"


@dataclass(frozen=True, slots=True)
class Owes:
    tokens: int  # the record's total_tokens, as its settlement charges them
    cost_nano: int
    latest: float  # no hold of this request has a lease ending later (epoch seconds)
    admitted: float  # its holds' admission `now` (epoch seconds): the record's start
    key_id: str
    org: str  # "" for none

    def owns(self, owner: str, org_prefix: str) -> bool:
        """Whether a hold of `owner` (a key id, or `org_prefix` + an org) is this
        request's key's or org's."""
        return owner == self.key_id or (bool(self.org) and owner == org_prefix + self.org)


def owes(rec: Mapping[str, Any], lease_s: Callable[[bool], float]) -> Owes:
    """What the request of a real record owes each of its holds; `lease_s(stream)` is
    the lease its admission gave. ValueError for a record that does not say."""
    tokens, key_id, org = rec.get("total_tokens"), rec.get("key_id"), rec.get("org")
    if type(tokens) is not int:
        raise ValueError("a record without total_tokens")
    if not (isinstance(key_id, str) and key_id and isinstance(org, str)):
        raise ValueError("a record without its key id or org")
    try:
        cost = usd_to_nano(Decimal(str(rec["cost_usd"])))
        started = datetime.fromisoformat(str(rec["started_at"])).timestamp()
        duration_s = float(rec.get("duration_ms") or 0) / 1000
    except (KeyError, InvalidOperation, TypeError) as e:
        raise ValueError(f"a record without its cost or start: {e}") from None
    check_usage(tokens, cost)
    if not (math.isfinite(started) and math.isfinite(duration_s)):
        raise ValueError("a record without a readable start or duration")
    latest = started + duration_s + lease_s(rec.get("stream") is True) + SLACK_S
    return Owes(tokens, cost, latest, started, key_id, org)


def seen_mark(o: Owes) -> str:
    """The mark a delivered real record leaves (never `lost`, which marks a lost one)."""
    return _MARK + json.dumps({"t": o.tokens, "c": o.cost_nano, "l": o.latest,
                               "a": o.admitted, "k": o.key_id, "o": o.org},
                              separators=(",", ":"))


def from_seen_mark(raw: bytes | str | None) -> Owes | None:
    """The Owes of a seen key's value; None for any other (`lost`, `1`: a record from a
    release before this one, or none)."""
    if raw is None:
        return None
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    if not text.startswith(_MARK + "{"):
        return None
    try:
        d = json.loads(text[len(_MARK):])
        o = Owes(d["t"], d["c"], float(d["l"]), float(d["a"]), d["k"], d["o"])
    except (ValueError, KeyError, TypeError):
        return None
    if not (type(o.tokens) is int and type(o.cost_nano) is int and isinstance(o.key_id, str)
            and o.key_id and isinstance(o.org, str) and math.isfinite(o.latest)
            and math.isfinite(o.admitted)):
        return None
    try:
        check_usage(o.tokens, o.cost_nano)
    except ValueError:
        return None
    return o
