"""What a real usage record says its request owes (policy/recorded.py), and the seen-key
mark that carries it to every replica's sweep."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from policy.recorded import SLACK_S, Owes, from_seen_mark, owes, seen_mark

REC: dict[str, Any] = {"total_tokens": 10, "cost_usd": "0.000000007",
                       "started_at": "2026-12-06T23:59:59.5Z", "duration_ms": 1250,
                       "stream": True}


def lease(stream: bool) -> float:
    return 90.0 if stream else 30.0


def test_a_record_owes_its_tokens_and_cost_until_its_end_plus_its_lease() -> None:
    end = datetime(2026, 12, 6, 23, 59, 59, 500000, UTC).timestamp() + 1.25
    assert owes(REC, lease) == Owes(10, 7, end + 90 + SLACK_S)
    assert owes(REC | {"stream": False}, lease).latest == end + 30 + SLACK_S
    # cost rounded up to the nano-dollar, as the settlement charges it
    assert owes(REC | {"cost_usd": "0.0000000071"}, lease).cost_nano == 8


@pytest.mark.parametrize("bad", [{"total_tokens": -1}, {"total_tokens": 1.0},
                                 {"total_tokens": None}, {"cost_usd": "x"},
                                 {"cost_usd": "NaN"}, {"cost_usd": "-1"},
                                 {"started_at": "?"}, {"duration_ms": "x"}])
def test_a_record_that_does_not_say_owes_nothing_readable(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        owes(REC | bad, lease)


def test_the_mark_round_trips_exactly_and_nothing_else_reads_as_one() -> None:
    o = owes(REC, lease)
    assert from_seen_mark(seen_mark(o)) == o
    assert from_seen_mark(seen_mark(o).encode()) == o
    for other in (None, b"lost", b"1", b"r:", b"r:1:2", b"r:1:2:x", b"r:-1:2:3.0",
                  b"r:1:2:nan", b"r:1:2:inf", b"r:1:-2:3.0", b"\xff"):
        assert from_seen_mark(other) is None, other
