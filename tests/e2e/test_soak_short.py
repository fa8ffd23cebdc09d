"""The soak and chaos suite's short form (issue 18 part 3; `make soak` runs the long one):
tests/soak for 45 s with 20 clients through Envoy against two replicas sharing one
Redis, with one of each chaos event: Redis SIGKILLed and restarted, a replica SIGKILLed
and restarted, the upstream SIGKILLed and restarted (and, all along, a few upstream 500s
and cut streams asked of the simulator, clients leaving streams). Then: every admitted
request recorded exactly once, no refused one recorded, no key over its budget, the
audit clean with no hold left (tests/soak/checks.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from policy.usage import LOST
from tests.soak.checks import Settled, Verdict, judge_money, judge_records
from tests.soak.load import Outcome
from tests.soak.run import Options, run_soak

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(400)
def test_soak_with_one_of_each_chaos_event_loses_nothing(tmp_path: Path) -> None:
    res = run_soak(tmp_path, Options(duration_s=45, clients=20, chaos_interval_s=12))
    report = "\n".join(res.lines)
    print(report)
    assert not res.verdict.failures, report
    # What the run must have gone through for the verdict to mean something.
    assert [e.what for e in res.events] == ["redis", "replica 0", "upstream"], report
    out = res.outcomes
    assert sum(1 for x in out if x.admitted) >= 500, report
    assert any(x.code == "insufficient_quota" for x in out), report  # the small budget
    assert any(x.code == "rate_limit_exceeded" for x in out), report  # the rpm key
    assert any(x.kind == "leave" and x.status == 200 for x in out), report
    assert any(x.fault == "cut" and x.broken for x in out), report
    assert any(x.fault == "500" and x.code == "upstream_error" for x in out), report
    assert res.verdict.figures["records"] >= res.verdict.figures["admitted"], report


def _outcome(rid: str, status: int, code: str = "") -> Outcome:
    return Outcome("chat", "k-soak-main", status, rid, code, 0.1)


def _record(rid: str, status: int | str = 200, cost: str = "0.01",
            key: str = "k-soak-main") -> dict[str, Any]:
    return {"request_id": rid, "key_id": key, "status": status, "cost_usd": cost}


def test_the_soak_checks_catch_what_they_are_for() -> None:
    """The verdict on made-up records: a missing, a duplicated, a refused-but-recorded
    request, one recorded that nobody sent, an overspent key, a hold left."""
    outcomes = [_outcome("a", 200), _outcome("b", 200), _outcome("c", 502, "upstream_error"),
                _outcome("d", 429, "insufficient_quota"), _outcome("e", 200)]
    raw = [_record("a"), _record("b"), _record("b"), _record("d"), _record("x"),
           _record("e", LOST), _record("e"), _record("y", cost="6", key="k-soak-budget")]
    ledger = {"owner": "k-soak-main", "period": "total", "spent_nano": 0, "spent_usd": "0",
              "records_usd": "0", "drift": False, "problems": [], "reserved_nano": 5,
              "live_holds": 1, "expired_holds": 0, "settling": 0}
    v = Verdict()
    settled = Settled(0, {"ledgers": [ledger]}, raw, 0.0)
    judge_records(outcomes, settled, v)
    judge_money(settled, v)
    text = "\n".join(v.failures)
    assert "1 admitted requests have no record: ['c']" in text
    assert "1 requests recorded twice: ['b']" in text
    assert "refused requests with a record: ['d']" in text
    assert "2 records of requests never seen, but only 0" in text  # x and y
    assert "k-soak-budget overspent: $6 > $5" in text
    assert "holds left behind" in text
    assert len(v.failures) == 6, v.failures
    assert v.figures["lost holds superseded by a late record"] == 1
