"""`tokenbooth keys update` on a running gateway: a new limit is in force within 2 s with
either state backend, no restart and no new secret; a budget lowered below what the key
has spent refuses it (429 insufficient_quota), since an update never resets spend."""

from __future__ import annotations

import json
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
