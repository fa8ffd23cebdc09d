"""JSON for the limit values that leave the process: a hold's Ask in the Redis index of
holds, a settlement in the on-disk settle spool. Explicit, so a damaged or foreign
value is refused (ValueError) rather than half-read."""

from __future__ import annotations

from typing import Any

import orjson

from policy.limits import Ask, HoldRecord, Limits


def dumps(value: Any) -> bytes:
    """Limits, Ask (with its HoldRecord) and plain values, as compact JSON."""
    return orjson.dumps(value)


def ask_from(obj: Any) -> Ask:
    if not isinstance(obj, dict):
        raise ValueError("an ask must be a JSON object")
    rec = obj.get("record")
    try:
        return Ask(
            request_id=_str(obj["request_id"]), key_id=_str(obj["key_id"]),
            org=_str(obj["org"]), tokens=_int(obj["tokens"]), cost_nano=_int(obj["cost_nano"]),
            period=_str(obj["period"]), lease_s=float(obj["lease_s"]),
            record=None if rec is None else HoldRecord(**rec),
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"not an ask: {e}") from None


def limits_from(obj: Any) -> Limits:
    if not isinstance(obj, dict):
        raise ValueError("limits must be a JSON object")
    try:
        return Limits(**obj)
    except TypeError as e:
        raise ValueError(f"not limits: {e}") from None


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {type(v).__name__}")
    return v


def _int(v: Any) -> int:
    if type(v) is not int:
        raise ValueError(f"expected an integer, got {type(v).__name__}")
    return v
