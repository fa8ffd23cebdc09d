"""The mark of a log line that a fault writes once per request (a store away fails every
request closed): `log.warning(..., extra={..., **REPEATS})`. The log handler's filter
(authz/runtime/logs.py, `Repeats`) lets a burst of each kind pass and counts the rest.
Here, below every package that logs such lines (imports flow toward `state`)."""

from __future__ import annotations

REPEATS: dict[str, object] = {"_repeats": True}
