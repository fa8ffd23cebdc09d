"""What a real usage record says its request owes (policy/recorded.py), and the seen-key
mark that carries it to every replica's sweep."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from policy.recorded import SLACK_S, Owes, from_seen_mark, owes, seen_mark

REC: dict[str, Any] = {"total_tokens": 10, "cost_usd": "0.000000007",
                       "started_at": "2026-12-06T23:59:59.5Z", "duration_ms": 1250,
                       "stream": True, "key_id": "k-a", "org": "acme"}


def lease(stream: bool) -> float:
    return 90.0 if stream else 30.0


def test_a_record_owes_its_tokens_and_cost_until_its_end_plus_its_lease() -> None:
    """And its holds are its key's and its org's, admitted at its start (exactly: the
    admission's `now` is the record's `started_at`)."""
    start = datetime(2026, 12, 6, 23, 59, 59, 500000, UTC).timestamp()
    end = start + 1.25
    o = owes(REC, lease)
    assert o == Owes(10, 7, end + 90 + SLACK_S, start, "k-a", "acme")
    assert o.owns("k-a", "org:") and o.owns("org:acme", "org:")
    assert not o.owns("k-b", "org:") and not o.owns("org:beta", "org:")
    assert not owes(REC | {"org": ""}, lease).owns("org:", "org:")
    assert owes(REC | {"stream": False}, lease).latest == end + 30 + SLACK_S
    # cost rounded up to the nano-dollar, as the settlement charges it
    assert owes(REC | {"cost_usd": "0.0000000071"}, lease).cost_nano == 8


@pytest.mark.parametrize("bad", [{"total_tokens": -1}, {"total_tokens": 1.0},
                                 {"total_tokens": None}, {"cost_usd": "x"},
                                 {"cost_usd": "NaN"}, {"cost_usd": "-1"},
                                 {"started_at": "?"}, {"duration_ms": "x"},
                                 {"key_id": ""}, {"key_id": None}, {"org": None}])
def test_a_record_that_does_not_say_owes_nothing_readable(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        owes(REC | bad, lease)


def test_the_mark_round_trips_exactly_and_nothing_else_reads_as_one() -> None:
    o = owes(REC, lease)
    assert from_seen_mark(seen_mark(o)) == o
    assert from_seen_mark(seen_mark(o).encode()) == o
    good = json.loads(seen_mark(o)[1:])
    bad = [{**good, "t": -1}, {**good, "t": 1.0}, {**good, "c": -2}, {**good, "l": "x"},
           {**good, "a": None}, {**good, "k": ""}, {**good, "o": None}, {"t": 1}]
    for other in (None, b"lost", b"1", b"r", b"r{", b"r:1:2:3.0", b"\xff",
                  b'r{"t":1,"c":2,"l":NaN,"a":1,"k":"k","o":""}',
                  *(b"r" + json.dumps(d).encode() for d in bad)):
        assert from_seen_mark(other) is None, other
