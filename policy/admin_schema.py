"""The admin API's contract: request and response models, the route table, and the
OpenAPI 3.1 document generated from both (the HTTP server reads the same table)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    field_validator,
)
from pydantic.json_schema import models_json_schema

from policy.bounds import BudgetUsd, Count
from policy.config import OrgLimits
from policy.keyrecord import (
    KEY_PREFIX,
    BudgetPeriod,
    KeyName,
    KeyRecord,
    OrgName,
    key_name_problem,
    redact_secrets,
    written_time,
)

Role = Literal["read", "admin"]
Scope = Literal["inference:read", "inference:write"]
ALL_SCOPES: tuple[Scope, ...] = ("inference:read", "inference:write")
# At least one: a key with none could call nothing (`models: []` means every alias, so
# `scopes: []` reads as "every scope" too; it is refused rather than guessed).
Scopes = Annotated[tuple[Scope, ...], Field(min_length=1)]
REF = "#/components/schemas/{model}"
MAX_PAGE = 1000
NDJSON = "application/x-ndjson"
# On every answer of the admin API: `--admin-url` tells it from another server's (the
# gateway's own listener answers OpenAI-shaped errors too).
ADMIN_API_HEADER = "X-Tokenbooth-Admin-Api"


class _In(BaseModel):
    """Requests: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


IsoTime = Annotated[AwareDatetime, BeforeValidator(written_time)]


class _Limits(_In):
    rpm: Count | None = None
    tpm: Count | None = None
    max_concurrent: Count | None = None
    budget_usd: BudgetUsd | None = None
    expires_at: IsoTime | None = None


# `"*"` among a key's models: every alias, as `keys update --model '*'` (ops tester: PATCH
# refused it as an unknown alias); the same as `[]`.
EVERY_MODEL = "*"


def _every_model(models: tuple[str, ...]) -> tuple[str, ...]:
    return () if EVERY_MODEL in models else tuple(dict.fromkeys(models))


Models = Annotated[tuple[str, ...], AfterValidator(_every_model)]


def _not_a_secret(name: str) -> str:
    problem = key_name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return name


# A new or changed key name (`keyrecord.key_name_problem`: no secret kept in clear).
NewKeyName = Annotated[KeyName, AfterValidator(_not_a_secret)]


class KeyCreate(_Limits):
    """POST /v1/keys (as `tokenbooth keys create`)."""

    org: OrgName  # and, for an org not known yet, keyrecord.new_org_problem's rules
    name: NewKeyName = ""
    scopes: Scopes = ALL_SCOPES
    models: Models = ()  # empty (or "*"): every alias
    budget_period: BudgetPeriod = "month"


class KeyUpdate(_Limits):
    """PATCH /v1/keys/{key_id} (as `keys update`): only the fields sent change; null
    removes a limit, the expiry or the name; `models: []` (or `["*"]`) allows every
    alias. `scopes`
    and `budget_period` have no "none": null is refused (it was taken, and changed
    nothing)."""

    name: NewKeyName | None = None
    scopes: Scopes = ALL_SCOPES
    models: Models | None = None
    budget_period: BudgetPeriod = "month"

    def changes(self) -> dict[str, Any]:
        """The record fields to set (those sent), in the form `keys update` gives."""
        out = {f: getattr(self, f) for f in sorted(self.model_fields_set)}
        if "name" in out and out["name"] is None:
            out["name"] = ""
        if "scopes" in out:
            out["scopes"] = tuple(dict.fromkeys(out["scopes"]))
        if "models" in out:
            out["models"] = tuple(dict.fromkeys(out["models"] or ()))
        return out


class KeyQuery(_In):
    """GET /v1/keys query parameters."""

    org: str | None = None
    status: Literal["active", "revoked"] | None = None
    limit: int = Field(default=100, ge=1, le=MAX_PAGE)
    after: str | None = Field(default=None, description="the last id of the previous page")


# An ISO 8601 time whose `+HH:MM` offset lost its `+` to form decoding.
_SPACED_OFFSET = re.compile(r"T[0-9:.]+ [0-9]{2}:[0-9]{2}$")
_AGE = re.compile(r"[0-9]+ ?[smhdw]")  # the CLI's `--since 90m`


class UsageQuery(_In):
    """GET /v1/usage query parameters (the filters of `tokenbooth usage`)."""

    org: str | None = None
    key: str | None = Field(default=None, description="a key id")
    since: AwareDatetime | None = Field(default=None, description=(
        "RFC 3339, its zone written (`Z` or an offset)"))
    group_by: Literal["key", "org", "model"] | None = None
    limit: int = Field(default=100, ge=1, le=MAX_PAGE)
    after: str | None = Field(default=None, description="the last request_id of the "
                                                        "previous page")
    stream: bool = Field(default=False, description=(
        f"every selected record, one JSON object a line ({NDJSON}, as with `Accept: "
        f"{NDJSON}`), written as it is read; the totals last; no paging"))

    @field_validator("key")
    @classmethod
    def _key_id(cls, v: str | None) -> str | None:
        # A secret matches no record, and the answer said 0 requests (admin tester);
        # never echoed past its listed prefix.
        if v is not None and v.startswith(KEY_PREFIX):
            raise ValueError("that is a key's secret, not its id: `keys list` shows each "
                             "key's id beside its prefix")
        return v

    @field_validator("since", mode="before")
    @classmethod
    def _plus_offset(cls, v: object) -> object:
        """`2026-12-04T10:00:00+01:00` typed into a URL unencoded arrives with a space for
        its `+` (form encoding): the offset it meant, not a 400."""
        if isinstance(v, str) and _SPACED_OFFSET.search(v):
            return v[:-6] + "+" + v[-5:]
        if isinstance(v, str) and _AGE.fullmatch(v.strip()):
            raise ValueError("expected an RFC 3339 time with its zone (ages such as 90m "
                             "are the CLI's: it sends the time they name)")
        # (a number was Unix time: `20261207` read as 1970-08-23: admin retest)
        return written_time(v)

    @field_validator("since")
    @classmethod
    def _in_utc_range(cls, v: datetime | None) -> datetime | None:
        """A time the stores can compare: years 1 to 9999 in UTC (PostgreSQL refused
        `0001-01-01T00:00:00+01:00` with a 500)."""
        if v is not None:
            try:
                v.astimezone(UTC)
            except OverflowError:
                raise ValueError("out of range (years 1 to 9999 in UTC)") from None
        return v


class UnknownCursor(ValueError):
    """`after` names no record of the selection: an empty page would read as the end."""

    def __init__(self, after: str) -> None:
        super().__init__(f"after: no usage record with request_id "
                         f"{redact_secrets(after)!r} in this "
                         "selection (pass the last_id of the previous page, with the "
                         "same filters)")


class Empty(_In):
    """A request without a body or query parameters."""


class KeyOut(KeyRecord):
    """A key as the API shows it: never its secret."""

    source: Literal["store", "config"] = "store"


class KeyCreated(KeyOut):
    key: str = Field(description="the secret, returned only in this answer")


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyOut]
    has_more: bool
    last_id: str | None = None


class Spend(BaseModel):
    """Current-period spend of a key or an org (USD)."""

    owner: Literal["key", "org"]
    id: str
    org: str
    budget_period: BudgetPeriod
    period: str
    # Exact decimal strings, as usage records' cost_usd; null without a budget (no
    # ledger is kept: the owner's spend is in GET /v1/usage).
    budget_usd: str | None
    spent_usd: str | None
    reserved_usd: str | None
    remaining_usd: str | None


class BudgetState(BaseModel):
    period: str
    budget_usd: str
    spent_usd: str
    reserved_usd: str
    remaining_usd: str
    resets_at: str | None  # None: a total budget never resets


class RateState(BaseModel):
    limit: int
    remaining: int
    reset_s: float  # until the limit is full again


class ConcurrencyState(BaseModel):
    limit: int
    in_flight: int


class OwnerState(BaseModel):
    """One owner's limits as they stand (None: no such limit)."""

    budget: BudgetState | None
    requests: RateState | None
    tokens: RateState | None
    concurrency: ConcurrencyState | None


class KeyState(BaseModel):
    """A key's (and its org's) budget and limits now, from the limit store."""

    at: str
    source: str
    key: OwnerState
    org: OwnerState | None


class OrgOut(BaseModel):
    org: str
    source: Literal["store", "config", "none"]
    limits: OrgLimits | None


class UsageRecordOut(BaseModel):
    request_id: str
    key_id: str
    org: str
    model: str
    upstream_model: str = ""
    backend: str = ""
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: str
    status: int | str
    stream: bool = False
    estimated: bool = False
    started_at: str
    duration_ms: float = 0.0
    endpoint: str = ""
    # The budget periods the request was held under ("" for no budget; absent, null,
    # in records written before these fields existed), as in usage.jsonl.
    key_budget_period: str | None = None
    org_budget_period: str | None = None
    sequences: int | None = None  # per prompt (`n`); null in older records
    # The request's hold: prompt tokens the backend can count (per sequence) and tokens
    # it can generate, at most; null where nothing was held, or in older records.
    prompt_bound: int | None = None
    completion_bound: int | None = None


class UsageTotals(BaseModel):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: str


class UsageGroup(UsageTotals):
    group: str


class UsagePage(BaseModel):
    object: Literal["list"] = "list"
    data: list[UsageRecordOut]
    totals: UsageTotals
    groups: list[UsageGroup] | None = None
    has_more: bool
    last_id: str | None = None


class UsageStreamEnd(BaseModel):
    """The last line of a streamed usage answer."""

    object: Literal["usage.totals"] = "usage.totals"
    totals: UsageTotals
    groups: list[UsageGroup] | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class UsageStreamLine(RootModel[UsageRecordOut | UsageStreamEnd | ErrorBody]):
    """One line of a streamed usage answer: a record; last, the totals (or, if reading
    failed after the answer began, an error)."""


@dataclass(frozen=True, slots=True)
class Route:
    """One admin endpoint. `body` for a JSON request body, `query` for parameters."""

    name: str
    method: str
    path: str
    response: type[BaseModel]
    role: Role = "read"
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    status: int = 200
    summary: str = ""
    stream: type[BaseModel] | None = None  # the line of an NDJSON answer, if offered


ROUTES: tuple[Route, ...] = (
    Route("create_key", "POST", "/v1/keys", KeyCreated, "admin", body=KeyCreate, status=201,
          summary="Create a key; its secret is in this answer only"),
    Route("list_keys", "GET", "/v1/keys", KeyList, query=KeyQuery,
          summary="List keys (config and store), by id, paged"),
    Route("get_key", "GET", "/v1/keys/{key_id}", KeyOut, summary="One key"),
    Route("update_key", "PATCH", "/v1/keys/{key_id}", KeyOut, "admin", body=KeyUpdate,
          summary="Change a key in place (no new secret; spend is kept)"),
    Route("revoke_key", "POST", "/v1/keys/{key_id}/revoke", KeyOut, "admin",
          summary="Revoke a key (refused everywhere within 2 s)"),
    Route("key_spend", "GET", "/v1/keys/{key_id}/spend", Spend, summary="A key's spend"),
    Route("key_state", "GET", "/v1/keys/{key_id}/state", KeyState,
          summary="A key's and its org's budget and limits now (as `keys show`)"),
    Route("get_org", "GET", "/v1/orgs/{org}", OrgOut,
          summary="An org's limits: stored, else the config's"),
    Route("set_org", "PUT", "/v1/orgs/{org}", OrgOut, "admin", body=OrgLimits,
          summary="Store an org's limits and budget (replaces the config's)"),
    Route("delete_org", "DELETE", "/v1/orgs/{org}", OrgOut, "admin",
          summary="Drop the stored limits: the config's apply again"),
    Route("org_spend", "GET", "/v1/orgs/{org}/spend", Spend, summary="An org's spend"),
    Route("usage", "GET", "/v1/usage", UsagePage, query=UsageQuery,
          summary="Usage records and totals (as `tokenbooth usage`), paged, or streamed "
                  "one record a line", stream=UsageStreamLine),
)

# status -> (description, error code) shared by every route
_ERRORS = {"400": "invalid request (param names the field)", "401": "no or unknown token",
           "403": "a read token cannot write", "404": "no such key",
           "408": "the body did not arrive within 10 s",
           "409": "keys are read-only here (validation service, or a key of the config)",
           "413": "the body is too large",
           "415": "a compressed body (Content-Encoding other than identity): send it "
                  "uncompressed",
           "429": "too many failed authentications from this address",
           "500": "the gateway failed (a bug: its log has the trace)",
           "503": "the state store did not answer"}


def _parameters(route: Route) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": seg[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
        for seg in route.path.split("/") if seg.startswith("{")]
    if route.query is not None:
        props = route.query.model_json_schema()["properties"]
        params += [{"name": n, "in": "query", "required": False, "schema": s}
                   for n, s in props.items()]
    return params


Refs = Mapping[tuple[Any, Any], Any]


def _json(schema: Any) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(route: Route, refs: Refs) -> dict[str, Any]:
    content = _json(refs[route.response, "serialization"])
    if route.stream is not None:  # each line is one document of this schema
        content[NDJSON] = {"schema": refs[route.stream, "serialization"]}
    responses: dict[str, Any] = {str(route.status): {"description": route.summary,
                                                     "content": content}}
    codes = ["400", "401", "429", "500", "503"] + (["403", "409"] if route.role == "admin"
                                                   else [])
    if "{key_id}" in route.path:
        codes.append("404")
    if route.body is not None:
        codes += ["408", "413", "415"]
    for code in sorted(codes):
        responses[code] = {"description": _ERRORS[code],
                           "content": _json(refs[ErrorBody, "serialization"])}
    op: dict[str, Any] = {"operationId": route.name, "summary": route.summary,
                          "parameters": _parameters(route), "responses": responses,
                          "x-role": route.role}
    if route.body is not None:
        op["requestBody"] = {"required": True,
                             "content": _json(refs[route.body, "validation"])}
    return op


def openapi_document(version: str = "0") -> dict[str, Any]:
    """The OpenAPI 3.1 document of ROUTES; schemas in `components` (JSON Schema 2020-12)."""
    models: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (ErrorBody, "serialization")]
    for r in ROUTES:
        models.append((r.response, "serialization"))
        if r.stream is not None:
            models.append((r.stream, "serialization"))
        if r.body is not None:
            models.append((r.body, "validation"))
    refs, defs = models_json_schema(list(dict.fromkeys(models)), ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        paths.setdefault(r.path, {})[r.method.lower()] = _operation(r, refs)
    return {
        "openapi": "3.1.0",
        "info": {"title": "tokenbooth admin API", "version": version},
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": paths,
    }
