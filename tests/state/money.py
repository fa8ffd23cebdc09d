"""Helpers for the money tests (lost holds, the settle spool): an injected clock, asks
that carry lost-record material, the record a request's end writes, and the check
that the ledger is the sum of the records."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from authz.state.usage.records import one_per_request
from policy.limits import Ask, HoldRecord, nano_to_usd, usd_to_nano
from policy.usage import UsageRecord

T0 = 1_700_000_000.25
P = "day:2023-11-14"


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def at(self, dt: float = 0.0) -> datetime:
        return datetime.fromtimestamp(self.t + dt, UTC)


def ask(i: int, key: str = "k1", *, cost: int = 300, lease: float = 5.0) -> Ask:
    rec = HoldRecord(model="demo", upstream_model="tiny", endpoint="chat", stream=True,
                     prompt_tokens=20, completion_tokens=10, started_at="2023-11-14T22:13:20Z",
                     key_budget_period=P)
    return Ask(f"r{i}", key, "acme", 30, cost, P, lease, rec)


def real_record(a: Ask, cost_nano: int) -> dict[str, Any]:
    """What the lifecycle writes when a request ends (before it settles)."""
    return UsageRecord(
        request_id=a.request_id, key_id=a.key_id, org=a.org, model="demo",
        upstream_model="tiny", backend="http://b", prompt_tokens=20, completion_tokens=5,
        total_tokens=25, cost_usd=format(nano_to_usd(cost_nano).normalize(), "f"),
        status=200, stream=True, estimated=False, started_at="2023-11-14T22:13:20Z",
        duration_ms=10.0, endpoint="chat", key_budget_period=P).to_dict()


def ledger_is_the_records(spent: int, records: list[dict[str, Any]], admitted: int) -> None:
    kept = list(one_per_request(records))
    assert len(kept) == admitted  # one record per admitted request
    assert sum(usd_to_nano(Decimal(r["cost_usd"])) for r in kept) == spent


