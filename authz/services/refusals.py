"""The log line of a refused request: who asked, for what, and the refusal's status and
code. Never its message, which can quote what the client sent. A flood (unknown keys,
a spent budget) writes a burst of lines per code and counts the rest (`REPEATS`); the
decision metrics count every one."""

from __future__ import annotations

import logging

from authz.state.repeats import REPEATS
from policy.errors import ApiError
from policy.keys import Principal


def log_refusal(log: logging.Logger, err: ApiError, request_id: str,
                principal: Principal | None, model: str = "") -> None:
    log.info(f"request refused: {err.status} {err.code}", extra={
        "request_id": request_id,
        "org": principal.org if principal is not None else "",
        "key_id": principal.key_id if principal is not None else "",
        "model": model,
        "status": err.status,
        "code": err.code,
        "param": _field(err.param),
        **REPEATS,
    })


def _field(param: str | None) -> str | None:
    """The top-level field a refusal names: what follows it can be the client's own text
    (an object's keys: `logit_bias.<anything>`; review)."""
    if param is None:
        return None
    return param.split(".", 1)[0].split("[", 1)[0][:64]
