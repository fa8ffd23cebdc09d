"""What a soak run is judged on, once every hold has settled: the usage records against
what the clients saw (each admitted request recorded exactly once, no refused one
recorded), `tokenbooth audit` (ledgers against records: no drift, no hold left), and
each key's recorded spend against its budget."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from authz.state.usage.records import one_per_request
from policy.limits import usd_to_nano
from policy.usage import LOST
from tests.e2e.test_money_faults import audit, stream_raw
from tests.soak.cluster import KEYS
from tests.soak.load import Outcome

HOLD_FIELDS = ("reserved_nano", "live_holds", "expired_holds", "settling")


@dataclass
class Settled:
    """The state read once the ledgers settled (or the wait ran out)."""

    audit_rc: int
    audit: dict[str, Any]
    raw: list[dict[str, Any]]  # every entry of the usage stream, duplicates included
    waited_s: float


def _holds_left(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [x for x in report["ledgers"] if any(x[f] for f in HOLD_FIELDS)]


def wait_settled(config: Path, redis_url: str, admitted: set[str],
                 timeout_s: float) -> Settled:
    """Audit until it passes with no hold left and every admitted request recorded,
    or `timeout_s` passes (a dead replica's holds are swept when their lease ends)."""
    t0 = time.monotonic()
    while True:
        rc, report = audit(config)
        raw = stream_raw(redis_url)
        done = (rc == 0 and not _holds_left(report)
                and admitted <= {r["request_id"] for r in raw})
        if done or time.monotonic() - t0 > timeout_s:
            return Settled(rc, report, raw, time.monotonic() - t0)
        time.sleep(2.0)


@dataclass
class Verdict:
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def fail_if(self, bad: object, what: str) -> None:
        if bad:
            self.failures.append(f"{what}: {bad}")


def _sample(ids: set[str] | list[str], n: int = 5) -> list[str]:
    return sorted(ids)[:n]


def judge_records(outcomes: Sequence[Outcome], s: Settled, v: Verdict) -> None:
    admitted = {o.rid for o in outcomes if o.admitted}
    refused = {o.rid for o in outcomes if o.refused}
    seen = {o.rid for o in outcomes if o.rid}
    no_answer = sum(1 for o in outcomes if not o.rid)
    real = Counter(r["request_id"] for r in s.raw if r["status"] != LOST)
    lost = Counter(r["request_id"] for r in s.raw if r["status"] == LOST)
    rids = set(real) | set(lost)
    twice = {rid for rid, n in real.items() if n > 1}
    twice |= {rid for rid, n in lost.items() if n > 1}
    missing = admitted - rids
    unseen = rids - seen
    v.figures.update({
        "admitted": len(admitted), "refused": len(refused), "records": len(rids),
        "record entries": len(s.raw), "missing (admitted, no record)": len(missing),
        "duplicated": len(twice), "refused with a record": len(refused & rids),
        "lost holds charged (status lost)": sum(1 for rid in lost if rid not in real),
        "lost holds superseded by a late record": sum(1 for rid in lost if rid in real),
        "records of requests the clients got no answer for": len(unseen),
    })
    v.fail_if(_sample(missing), f"{len(missing)} admitted requests have no record")
    v.fail_if(_sample(twice), f"{len(twice)} requests recorded twice")
    v.fail_if(_sample(refused & rids), "refused requests with a record")
    if len(unseen) > no_answer:
        v.failures.append(f"{len(unseen)} records of requests never seen, but only "
                          f"{no_answer} requests got no answer: {_sample(unseen)}")


def judge_money(s: Settled, v: Verdict) -> None:
    recs = list(one_per_request(s.raw))
    for k in KEYS:
        spend = sum((Decimal(r["cost_usd"]) for r in recs if r["key_id"] == k.id), Decimal(0))
        v.figures[f"spend {k.id}"] = f"${spend} of ${k.budget}"
        v.fail_if(spend > k.budget, f"{k.id} overspent: ${spend} > ${k.budget}")
        for led in s.audit["ledgers"]:
            if led["owner"] == k.id and led["spent_nano"] > usd_to_nano(k.budget):
                v.failures.append(f"{k.id}'s ledger overspent: {led['spent_usd']}")
    keyed = [x for x in s.audit["ledgers"] if not x["owner"].startswith("org:")]
    v.figures["ledgers vs records"] = (
        f"spent ${sum(Decimal(x['spent_usd']) for x in keyed)}, "
        f"records ${sum(Decimal(x['records_usd']) for x in keyed)}")
    drift = [(x["owner"], x["period"], x["problems"]) for x in s.audit["ledgers"] if x["drift"]]
    held = [(x["owner"], {f: x[f] for f in HOLD_FIELDS}) for x in _holds_left(s.audit)]
    v.figures["audit"] = (f"exit {s.audit_rc}, {len(s.audit['ledgers'])} ledgers, "
                          f"{len(drift)} drifting, {len(held)} with holds left "
                          f"(settled {s.waited_s:.0f} s after the load)")
    v.fail_if(s.audit_rc != 0, f"audit exit {s.audit_rc}")
    v.fail_if(drift, "ledgers drift from their records")
    v.fail_if(held, "holds left behind")


def tracebacks(logs: Path) -> dict[str, int]:
    """Lines with "Traceback" in each process log."""
    out = {}
    for log in sorted(logs.glob("*.log")):
        n = log.read_bytes().count(b"Traceback")
        if n:
            out[log.name] = n
    return out
