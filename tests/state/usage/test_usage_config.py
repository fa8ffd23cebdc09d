"""The `usage:` config section: safe defaults, a bounded stream, a checked sink URL."""

from __future__ import annotations

from typing import Any

import pytest

from authz.state.usage.trim import EXPORT_GROUP, TrimPolicy
from policy.config import ConfigError, parse_config
from tests.helpers import policy_dict


def cfg(state: str = "redis://127.0.0.1:1/0", **usage: Any) -> Any:
    return parse_config({**policy_dict("http://127.0.0.1:1"), "state": state, "usage": usage})


def test_defaults_keep_redis_bounded() -> None:
    u = cfg().usage
    assert (u.sink, u.trim, u.retention_s, u.dedup_ttl_s) == (None, "acked", 7 * 86400.0, 600)
    assert TrimPolicy.from_config(u) == TrimPolicy("acked", 7 * 86400.0, ())


def test_a_sink_adds_the_export_group() -> None:
    u = cfg(sink="postgresql://tb@db:5432/billing", consumer_groups=["kafka", "kafka"],
            retention_s=None).usage
    assert TrimPolicy.from_config(u).groups == (EXPORT_GROUP, "kafka")


@pytest.mark.parametrize(("usage", "problem"), [
    ({"sink": "mysql://db/x"}, "usage.sink"),
    ({"retention_s": None}, "unbounded"),
    ({"retention_s": None, "trim": "retention", "consumer_groups": ["g"]}, "unbounded"),
    ({"consumer_groups": ["a b"]}, "group names"),
    ({"local_max_bytes": 10}, "local_max_bytes"),
])
def test_bad_sections_are_refused(usage: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        cfg(**usage)


def test_a_sink_needs_the_redis_stream() -> None:
    """The exporter reads the Redis stream: with state: memory a sink would silently get
    nothing, so the config is refused."""
    with pytest.raises(ConfigError, match=r"usage\.sink: the exporter reads the Redis"):
        cfg(state="memory", sink="postgresql://tb@db:5432/billing")
    assert cfg(state="memory").usage.sink is None
