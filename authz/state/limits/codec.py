"""JSON for the limit values that leave the process: a hold's Ask in the Redis index of
holds, a settlement in the on-disk settle spool. Explicit, so a damaged or foreign
value is refused (ValueError) rather than half-read."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from policy.limits import Ask, HoldRecord, Limits

# Fields another release may add are passed over, as the snapshot's reader does: a hold
# written by a newer release (a rollback) is restored, not skipped with its spend.
_HOLD_FIELDS = frozenset(f.name for f in dataclasses.fields(HoldRecord))
_LIMITS_FIELDS = frozenset(f.name for f in dataclasses.fields(Limits))


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
            record=None if rec is None else HoldRecord(**_known(rec, _HOLD_FIELDS)),
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"not an ask: {e}") from None


def limits_from(obj: Any) -> Limits:
    if not isinstance(obj, dict):
        raise ValueError("limits must be a JSON object")
    try:
        return Limits(**_known(obj, _LIMITS_FIELDS))
    except TypeError as e:
        raise ValueError(f"not limits: {e}") from None


def _known(obj: Any, fields: frozenset[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise TypeError(f"expected an object, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if k in fields}


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {type(v).__name__}")
    return v


def _int(v: Any) -> int:
    if type(v) is not int:
        raise ValueError(f"expected an integer, got {type(v).__name__}")
    return v
