"""policy/admission.py: the transitions on a key's state with a fixed clock (every `now`
is an argument), org limits, and the 429 a denial becomes."""

from __future__ import annotations

import copy

import pytest

from policy.admission import (
    LOST_TTL_S,
    Hold,
    KeyState,
    Ledger,
    Settled,
    admit,
    bucket_now,
    consume,
    expire,
    hold_live,
    lost_record,
    settle,
    settle_charges,
    sweep,
)
from policy.limits import Ask, Decision, HoldRecord, Limits
from policy.usage import LOST, UsageRecord

T0 = 1_000.0


def ask(rid: str = "r1", *, tokens: int = 0, cost: int = 0, lease: float = 30.0,
        period: str = "day:2026-11-23") -> Ask:
    return Ask(rid, "k1", "acme", tokens, cost, period, lease)


# -- each denial, with its exact header material ----------------------------------------


def test_requests() -> None:
    key, lim = KeyState(), Limits(rpm=2)
    assert admit(lim, ask("a"), key, None, T0) == Decision(True, "", None, 2, 1, 30.0)
    assert admit(lim, ask("b"), key, None, T0) == Decision(True, "", None, 2, 0, 60.0)
    assert admit(lim, ask("c"), key, None, T0) == Decision(False, "requests", 30.0, 2, 0, 60.0)
    assert (key.requests, key.rts) == (0.0, T0)


def test_a_burst_is_exactly_the_limit_however_large_at_an_epoch_clock() -> None:
    """The GCRA kept an absolute theoretical arrival time: at an epoch-sized clock a
    double holds it to ~0.24 us, and adding 60/rpm s per request drifted, one way or
    the other: a burst at rpm 50,000 admitted 50,001, at 100,000 it admitted 99,983
    (17 refused with room)."""
    for rpm in (50_000, 100_000):
        key, lim, now, n = KeyState(), Limits(rpm=rpm), 1_733_000_000.0, 0
        while admit(lim, ask(f"r{n}"), key, None, now).allowed:
            n += 1
        assert n == rpm
        later = now + 1.5 * 60.0 / rpm  # one refilled, and half of the next
        d = admit(lim, ask("one-more"), key, None, later)
        assert (d.allowed, d.remaining_requests) == (True, 0)
        assert not admit(lim, ask("and-another"), key, None, later).allowed


def test_concurrency() -> None:
    key, lim = KeyState(), Limits(rpm=2, max_concurrent=1)
    assert admit(lim, ask("a"), key, None, T0).allowed
    # Admissible by the GCRA, refused by concurrency: the request slot was not taken.
    assert admit(lim, ask("b"), key, None, T0) == Decision(False, "concurrency", None, 2, 1,
                                                           30.0)
    assert key.leased == {"a"}


def test_tokens_and_tokens_too_large() -> None:
    key, lim = KeyState(), Limits(tpm=600)
    assert admit(lim, ask("a", tokens=500), key, None, T0) == Decision(
        True, "", None, None, None, 0.0, 600, 100, 50.0)
    assert admit(lim, ask("b", tokens=200), key, None, T0) == Decision(
        False, "tokens", 10.0, None, None, 0.0, 600, 100, 50.0)  # 100 short at 600/min
    assert admit(lim, ask("c", tokens=601), key, None, T0 + 60) == Decision(
        False, "tokens_too_large", None, None, None, 0.0, 600, 600, 0.0)


def test_budget() -> None:
    key, ledger, lim = KeyState(), Ledger(), Limits(budget_nano=1000)
    assert admit(lim, ask("a", cost=600), key, ledger, T0).allowed
    # Unspent, but held by "a" in flight: it fits once "a" ends.
    assert admit(lim, ask("b", cost=401), key, ledger, T0) == Decision(False, "budget_held")
    assert admit(lim, ask("c", cost=400), key, ledger, T0).allowed  # exactly full
    assert (ledger.spent, ledger.reserved) == (0, 1000)
    a = ask("a", cost=600)
    assert settle(lim, a, 0, 600, key, ledger, T0 + 1) == Settled(True)
    # Spent: only the period's reset (or a larger budget) makes room.
    assert admit(lim, ask("d", cost=401), key, ledger, T0 + 1) == Decision(False, "budget")
    assert admit(lim, ask("e", cost=1), key, ledger, T0 + 1) == Decision(False, "budget_held")


def test_duplicate_request_id() -> None:
    key, ledger, lim = KeyState(), Ledger(), Limits(budget_nano=200)
    a = ask("same", cost=60, lease=10.0)
    assert admit(lim, a, key, ledger, T0).allowed
    assert admit(lim, a, key, ledger, T0 + 1) == Decision(False, "duplicate")
    assert settle(lim, a, 0, 10, key, ledger, T0 + 2) == Settled(True)
    assert admit(lim, a, key, ledger, T0 + 2).allowed  # settled: the id may be reused
    # Its lease ended unsettled: still held until the sweep claims it as lost.
    assert admit(lim, a, key, ledger, T0 + 12).reason == "duplicate"
    assert [h.ask for h in sweep(key, T0 + 12)] == [a]
    assert admit(lim, a, key, ledger, T0 + 12).allowed  # claimed: likewise free again
    assert ledger.balance(T0 + 12) == (10 + 60, 60)  # the lost hold was charged in full
    # A key with only an RPM limit holds nothing, so it keeps no ids.
    rpm_only = KeyState()
    assert admit(Limits(rpm=5), a, rpm_only, None, T0).allowed
    assert admit(Limits(rpm=5), a, rpm_only, None, T0).allowed


# -- check order, and a denial changes nothing --------------------------------------------


def everything_spent() -> tuple[KeyState, Ledger]:
    """A key over every limit at T0: the RPM slot taken, one lease, an empty bucket, a
    spent budget."""
    key = KeyState(requests=0.0, rts=T0, level=0.0, ts=T0,
                   holds={"x": Hold(0, T0 + 100, ask("x", lease=100))}, leased={"x"},
                   heap=[(T0 + 100, "x")])
    return key, Ledger(spent=5)


@pytest.mark.parametrize(("lim", "reason"), [
    (Limits(rpm=1, max_concurrent=1, tpm=10, budget_nano=5), "requests"),
    (Limits(max_concurrent=1, tpm=10, budget_nano=5), "concurrency"),
    (Limits(tpm=10, budget_nano=5), "tokens"),
    (Limits(tpm=1, budget_nano=5), "tokens_too_large"),
    (Limits(budget_nano=5), "budget"),
])
def test_check_order_and_a_denial_changes_nothing(lim: Limits, reason: str) -> None:
    key, ledger = everything_spent()
    before = copy.deepcopy((key, ledger))
    d = admit(lim, ask("new", tokens=2, cost=1), key, ledger, T0)
    assert (d.allowed, d.reason) == (False, reason)
    assert (key, ledger) == before


# -- settlement ---------------------------------------------------------------------------

LIM = Limits(tpm=1000, max_concurrent=1, budget_nano=10_000)


def admitted(a: Ask) -> tuple[KeyState, Ledger]:
    key, ledger = KeyState(), Ledger()
    assert admit(LIM, a, key, ledger, T0).allowed
    assert (key.level, ledger.reserved) == (1000.0 - a.tokens, a.cost_nano)
    assert key.leased == {a.request_id}
    return key, ledger


def test_settle_charges_the_real_cost_and_refunds_unused_tokens() -> None:
    a = ask(tokens=600, cost=4_000)
    key, ledger = admitted(a)
    assert settle(LIM, a, 100, 1_500, key, ledger, T0 + 3) == Settled(True, 0, 0)
    assert (ledger.spent, ledger.reserved, ledger.holds) == (1_500, 0, {})
    # The 500 unused are added to the bucket as stored (its time unchanged: the tpm in
    # force at the next admission refills it); read now, the 50 refilled are there too.
    assert (key.level, key.ts) == (400.0 + 500.0, T0)
    assert bucket_now(key, 1000, T0 + 3, 60.0) == 400.0 + 50.0 + 500.0
    assert (key.holds, key.leased) == ({}, set())
    assert admit(LIM, ask("r2"), key, ledger, T0 + 3).allowed  # the lease is free again


def test_an_overrun_is_charged_reported_and_then_refuses() -> None:
    a = ask(tokens=600, cost=4_000)
    key, ledger = admitted(a)
    assert settle(LIM, a, 700, 10_600, key, ledger, T0 + 3) == Settled(True, 6_600, 100)
    assert Settled(True, 6_600, 100).bound_violated
    assert not Settled(True, 0, 100).bound_violated  # tokens past the TPM estimate only
    assert (ledger.spent, ledger.reserved) == (10_600, 0)  # past the budget: the real cost
    assert key.level == 450.0 - 100.0
    for cost in (0, 1):
        assert admit(LIM, ask(f"c{cost}", cost=cost), key, ledger, T0 + 4).reason == "budget"


def test_a_second_settle_changes_nothing() -> None:
    a = ask(tokens=600, cost=4_000)
    key, ledger = admitted(a)
    settle(LIM, a, 100, 1_500, key, ledger, T0 + 3)
    before = copy.deepcopy((key, ledger))
    assert settle(LIM, a, 100, 1_500, key, ledger, T0 + 3) == Settled(False)
    assert (key, ledger) == before
    assert settle(LIM, ask("unknown", cost=5), 3, 50, key, ledger, T0) == Settled(False, 45, 3)
    assert settle(LIM, a, 0, 0, None, None, T0) == Settled(False)


def test_bad_usage_is_refused() -> None:
    with pytest.raises(ValueError):
        settle(LIM, ask(), -1, 0, KeyState(), None, T0)
    with pytest.raises(ValueError):
        admit(LIM, ask(cost=2**53), KeyState(), Ledger(), T0)


# -- expiry -------------------------------------------------------------------------------


def test_the_liveness_rule() -> None:
    assert hold_live(10.0, 9.999) and not hold_live(10.0, 10.0)
    assert settle_charges(10.0, 9.999) and not settle_charges(10.0, 10.0)


def test_a_lost_hold_is_charged_in_full_and_a_late_settle_corrects_it() -> None:
    a = ask("lost", tokens=600, cost=4_000, lease=10.0)
    key, ledger = admitted(a)
    assert admit(LIM, ask("b"), key, ledger, T0 + 9.999).reason == "concurrency"
    assert ledger.balance(T0 + 9.999) == (0, 4_000)
    # The lease ended unsettled: spent + reserved does not move, the hold is spent.
    assert ledger.balance(T0 + 10) == (4_000, 0)
    assert ledger.lost == {"lost": (4_000, T0 + 10)}
    expire(key, T0 + 10)
    assert (key.holds, key.leased, list(key.ended)) == ({}, set(), ["lost"])
    assert [h.ask for h in sweep(key, T0 + 10)] == [a]
    assert sweep(key, T0 + 11) == [] and key.ended == {}  # claimed once
    level = key.level  # its tokens stay taken
    # The settlement arrives late: the charge becomes the real cost, exactly once.
    assert settle(LIM, a, 100, 1_500, key, ledger, T0 + 20) == Settled(True, corrected=True)
    assert (ledger.spent, ledger.reserved, ledger.lost, key.level) == (1_500, 0, {}, level)
    assert settle(LIM, a, 100, 1_500, key, ledger, T0 + 20) == Settled(False)
    assert ledger.spent == 1_500
    # An overrun corrects upwards, past the hold.
    b = ask("lost2", cost=1_000, lease=10.0)
    assert admit(LIM, b, key, ledger, T0 + 20).allowed
    assert ledger.balance(T0 + 30) == (2_500, 0)
    assert settle(LIM, b, 0, 1_200, key, ledger, T0 + 31) == Settled(True, 200, 0, True)
    assert ledger.balance(T0 + 31) == (2_700, 0)


def test_a_late_settle_before_the_sweep_charges_the_real_cost_without_refund() -> None:
    a = ask("late", tokens=600, cost=4_000, lease=10.0)
    key, ledger = admitted(a)
    assert settle(LIM, a, 100, 1_500, key, ledger, T0 + 10) == Settled(True)
    assert (ledger.spent, ledger.reserved, key.level, key.holds) == (1_500, 0, 400.0, {})
    assert sweep(key, T0 + 10) == []  # settled: nothing lost, no lost record
    assert ledger.balance(T0 + 10) == (1_500, 0)


def test_a_lost_charge_is_correctable_for_lost_ttl() -> None:
    a, b = ask("a", cost=300, lease=10.0), ask("b", cost=200, lease=10.0)
    key, ledger = admitted(a)
    assert admit(Limits(budget_nano=10_000), b, key, ledger, T0).allowed
    assert ledger.balance(T0 + 10) == (500, 0)
    assert set(ledger.lost) == {"a", "b"} and len(sweep(key, T0 + 10)) == 2
    assert settle(LIM, a, 0, 100, key, ledger, T0 + 10 + LOST_TTL_S - 1).applied
    assert ledger.balance(T0 + 10 + LOST_TTL_S) == (300, 0)
    assert ledger.lost == {} and ledger.lost_heap == []  # forgotten: a settle is a no-op
    assert settle(LIM, b, 0, 1, key, ledger, T0 + 10 + LOST_TTL_S) == Settled(False)
    assert ledger.spent == 300


def test_the_lost_record_is_the_full_hold_estimated() -> None:
    rec = HoldRecord(model="demo", upstream_model="tiny", endpoint="chat", stream=True,
                     prompt_tokens=120, completion_tokens=380,
                     started_at="2026-11-23T12:00:00Z")
    a = Ask("r9", "k1", "acme", 500, 1_500_000, "day:2026-11-23", 150.0, rec)
    assert lost_record(a) == UsageRecord(
        request_id="r9", key_id="k1", org="acme", model="demo", upstream_model="tiny",
        backend="", prompt_tokens=120, completion_tokens=380, total_tokens=500,
        cost_usd="0.0015", status=LOST, stream=True, estimated=True,
        started_at="2026-11-23T12:00:00Z", duration_ms=150_000.0, endpoint="chat",
        prompt_bound=120, completion_bound=380)
    org_hold_of_k1 = Ask("r9", "org:acme", "acme", 500, 0, "total", 150.0,
                         HoldRecord("demo", "tiny", "chat", False, 1, 2, "", key_id="k1"))
    lost = lost_record(org_hold_of_k1)
    assert lost is not None and (lost.key_id, lost.cost_usd) == ("k1", "0")
    assert lost_record(ask()) is None  # no material: this hold writes no record


# -- usage admitted elsewhere -------------------------------------------------------------


def test_consume() -> None:
    key = KeyState()
    consume(Limits(rpm=3, tpm=1000), key, 2, 1_500, T0)
    assert (key.requests, key.rts, key.level, key.ts) == (1.0, T0, -500.0, T0)
    d = admit(Limits(rpm=3, tpm=1000), ask(tokens=1), key, None, T0)
    assert (d.reason, d.retry_after_s, d.remaining_tokens) == ("tokens", 30.06, -500)
    consume(Limits(), key, 5, 5, T0)  # no limits: nothing to count
    assert (key.requests, key.level) == (1.0, -500.0)
