"""`tokenbooth keys update` on a running gateway: a new limit is in force within 2 s with
either state backend, no restart and no new secret; a budget lowered below what the key
has spent refuses it (429 insufficient_quota), since an update never resets spend."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

import openai
import pytest

from tests.e2e.conftest import Gateway
from tests.e2e.test_keys import MESSAGES, tb, works

pytestmark = pytest.mark.e2e
BACKENDS = ["gateway", "redis_gateway"]


def new_key(gw: Gateway, *options: str) -> tuple[str, str]:
    """A key made with the CLI, once usable: (id, secret)."""
    created = json.loads(tb(gw, "keys", "create", "--org", "upd", *options, "--json"))
    within_2s(lambda: works(gw, created["key"]), "a new key was not usable")
    return created["id"], created["key"]


def within_2s(check: Callable[[], bool], what: str) -> None:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < 2.0, f"{what} within 2 s"
        time.sleep(0.02)


def refused(gw: Gateway, key: str, code: str) -> bool:
    try:
        gw.client(key).chat.completions.create(model="demo", messages=MESSAGES, max_tokens=1)
    except openai.RateLimitError as e:
        assert e.code == code, e
        return True
    return False


@pytest.mark.parametrize("backend", BACKENDS)
def test_rpm_update_takes_effect_within_2s(backend: str, request: pytest.FixtureRequest
                                           ) -> None:
    gw: Gateway = request.getfixturevalue(backend)
    key_id, key = new_key(gw, "--rpm", "1000")
    tb(gw, "keys", "update", key_id, "--rpm", "1")
    # Within 2 s a second request in the same minute is refused.
    within_2s(lambda: refused(gw, key, "rate_limit_exceeded"), "rpm 1 was not enforced")
    shown = json.loads(tb(gw, "keys", "show", key_id, "--json"))
    assert shown["rpm"] == 1 and key not in json.dumps(shown)
    tb(gw, "keys", "update", key_id, "--rpm", "none")
    within_2s(lambda: not refused(gw, key, "rate_limit_exceeded"), "the rpm was not lifted")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_budget_lowered_below_spend_refuses(backend: str, request: pytest.FixtureRequest
                                              ) -> None:
    gw: Gateway = request.getfixturevalue(backend)
    key_id, key = new_key(gw, "--budget", "10", "--budget-period", "total")
    for _ in range(3):
        assert works(gw, key)  # some spend, far below the budget
    tb(gw, "keys", "update", key_id, "--budget", "0.000001")
    within_2s(lambda: refused(gw, key, "insufficient_quota"), "the lower budget was not seen")
    tb(gw, "keys", "update", key_id, "--budget", "10")
    within_2s(lambda: not refused(gw, key, "insufficient_quota"), "the budget was not raised")


def _charged(gw: Gateway, key_id: str, key: str, period: str | None) -> None:
    """An update is in force within 2 s: requests for 2 s, then the last one's record
    must say it was charged to the key's `period` ledger (None: to no key ledger). The
    records are read after the 2 s (a CLI start can take a second on a busy machine)."""
    t0, rids = time.monotonic(), []
    while not rids or time.monotonic() - t0 < 2.0:
        raw = gw.client(key).chat.completions.with_raw_response.create(
            model="demo", messages=MESSAGES, max_tokens=1)
        rids.append(raw.headers["x-request-id"])
        time.sleep(0.05)
    deadline = time.monotonic() + 15  # a record reaches the log or stream in a moment
    while True:
        out = json.loads(tb(gw, "usage", "--key", key_id, "--json"))
        [rec] = [r for r in out["records"] if r["request_id"] == rids[-1]] or [None]
        if rec is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert rec is not None, "the last request left no record"
    day = rec["started_at"][:10]  # YYYY-MM-DD, UTC
    want = {None: None, "day": f"day:{day}", "month": f"month:{day[:7]}"}[period]
    assert rec["key_budget_period"] == want, f"not charged to the key's {period} ledger"


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_audit_balances_across_budget_changes(backend: str,
                                                  request: pytest.FixtureRequest) -> None:
    """A key with no budget is given one, its period changed, the budget removed and
    given back: each record says which ledger its request was charged to, and the audit
    balances every ledger of the key (it compared every record with the key's present
    period, and exited 1)."""
    gw: Gateway = request.getfixturevalue(backend)
    key_id, key = new_key(gw)
    _charged(gw, key_id, key, None)
    tb(gw, "keys", "update", key_id, "--budget", "10", "--budget-period", "day")
    _charged(gw, key_id, key, "day")
    tb(gw, "keys", "update", key_id, "--budget-period", "month")
    _charged(gw, key_id, key, "month")
    tb(gw, "keys", "update", key_id, "--budget", "none")
    _charged(gw, key_id, key, None)
    tb(gw, "keys", "update", key_id, "--budget", "10")
    _charged(gw, key_id, key, "month")
    deadline = time.monotonic() + 5
    while True:  # a settlement may trail its record by a moment
        ledgers = [x for x in json.loads(_audit(gw))["ledgers"] if x["owner"] == key_id]
        if not any(x["drift"] or x["settling"] for x in ledgers) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted(x["period"].partition(":")[0] for x in ledgers) == ["day", "month"]
    assert [x for x in ledgers if x["drift"] or x["settling"]] == []
    assert sum(x["records"] for x in ledgers) >= 3


def _audit(gw: Gateway) -> str:
    """`tokenbooth audit --json` (exit 1 when another test's key drifts: read the JSON)."""
    r = subprocess.run([sys.executable, "-m", "authz.cli", "audit", "--json", "--config",
                        str(gw.config_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode in (0, 1), r.stderr
    return r.stdout
