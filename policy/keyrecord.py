"""The stored form of an API key: identity, permissions, limits — and no secret."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from policy.bounds import MAX_COUNT, BudgetUsd
from policy.names import lookalike_problem

SCOPES = ("inference:read", "inference:write")
# An org's name travels in a request header (x-tokenbooth-org) and in metric labels: no
# control characters, which no header value can carry (Envoy refused every request).
OrgName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
# A key's display name: printed by `keys list` / `keys show`, so no control character
# (an escape sequence would drive the reader's terminal).
KeyName = Annotated[str, Field(max_length=256, pattern=r"^[^\x00-\x1f\x7f-\x9f]*$")]
BudgetPeriod = Literal["day", "month", "total"]


class KeyRecord(BaseModel):
    """One API key as every store keeps it. `sha256` is the fingerprint of the secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    org: OrgName
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    prefix: str = ""  # the first characters of the secret, for people to recognise it
    name: str = ""
    scopes: tuple[str, ...] = SCOPES
    models: tuple[str, ...] = ()  # empty: every alias
    rpm: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    tpm: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    max_concurrent: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    budget_usd: BudgetUsd | None = None
    budget_period: BudgetPeriod = "month"
    status: Literal["active", "revoked"] = "active"
    created_at: datetime | None = None
    expires_at: datetime | None = None

    @field_validator("scopes")
    @classmethod
    def _known_scopes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(v) - set(SCOPES))
        if unknown:
            raise ValueError(f"unknown scope(s) {unknown}; known: {list(SCOPES)}")
        return v

    @field_validator("expires_at", "created_at", mode="before")
    @classmethod
    def _written(cls, v: Any) -> Any:
        return written_time(v)

    @field_validator("expires_at", "created_at")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            raise ValueError("a time needs a timezone, e.g. 2027-01-01T00:00:00Z")
        return v


def written_time(v: Any) -> Any:
    """A time as ISO 8601 text (or a datetime): a number, or text that reads as one
    (`99999999999`, `"1.0e11"`), was taken as Unix seconds, or milliseconds past 2e10,
    and the year 5138 meant expired a key in 1973 (admin review)."""
    if isinstance(v, str):
        try:
            float(v)
        except ValueError:
            return v
    elif not isinstance(v, int | float):  # (bool too) else pydantic says what it is
        return v
    raise ValueError("expected an ISO 8601 time with a timezone, e.g. "
                     "2027-01-01T00:00:00Z (not a number)")


def expiry_in_past(expires_at: datetime | None, now: datetime) -> str | None:
    """Why a new key's expiry is refused: a key created already expired could never be
    used (a typo in the year, most likely). An update may set a past time: that is how a
    key is expired at once, beside revoking it."""
    if expires_at is not None and expires_at <= now:
        return (f"expires_at {expires_at.isoformat()} is not in the future: a new key "
                "would be expired already")
    return None


KEY_PREFIX = "sk-tb-"  # every tokenbooth key's secret begins so (policy/keys.py)
_SECRETS = re.compile(re.escape(KEY_PREFIX) + r"([A-Za-z0-9_\-]{0,4})[A-Za-z0-9_\-]*")
_A_SECRET = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_\-]{16,}")


def redact_secrets(text: str) -> str:
    """`text` with every tokenbooth key in it cut to the prefix listings show (for a log
    line of something a caller typed: a secret given where an id belongs)."""
    return _SECRETS.sub(lambda m: f"{KEY_PREFIX}{m[1]}…", text)


def reads_as_secret(text: str) -> bool:
    """Whether `text` holds what reads as a tokenbooth key's secret (one pasted where a
    name or an id belongs)."""
    return _A_SECRET.search(text) is not None


def key_name_problem(name: str) -> str | None:
    """Why `name` is refused as a key's display name (new or changed), or None: a name is
    stored as it is and printed by every listing, so a secret pasted there would be
    kept in clear (security tester). A name stored before this check keeps loading."""
    if reads_as_secret(name):
        return "expected a key's name, got what reads as a key's secret"
    return None


def valid_org_name(org: str) -> bool:
    """Whether `org` is an OrgName (the admin API's path parameter is checked by hand)."""
    return 1 <= len(org) <= 128 and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in org)


def new_org_problem(org: str) -> str | None:
    """Why `org` is refused as the name of a new org (a key created for it, or its
    limits stored), or None. Stricter than OrgName, which stored keys and configs keep
    passing (a name written before this check still loads): no surrounding or
    whitespace-only name, nothing invisible (`policy.names.lookalike_problem`). An org
    that exists already (a key of it, its limits configured or stored) keeps its name:
    callers ask `new_org_problem` only of an org they do not know (see
    authz/runtime/admin_api.py `_org_to_create`)."""
    if not valid_org_name(org):
        return "expected 1 to 128 characters and no control character"
    if reads_as_secret(org):
        # A key's secret pasted where its org belongs: an org name goes upstream in a
        # header, into every record and every listing.
        return "expected an org's name, got what reads as a key's secret"
    return lookalike_problem(org)
