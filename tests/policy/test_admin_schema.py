"""The admin API's models and the OpenAPI document generated from them."""

from __future__ import annotations

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from policy.admin_schema import (
    ALL_SCOPES,
    NDJSON,
    ROUTES,
    KeyCreate,
    KeyUpdate,
    openapi_document,
)
from policy.keyrecord import SCOPES


def test_scopes_match_the_key_record() -> None:
    assert ALL_SCOPES == SCOPES


def test_requests_refuse_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="colour"):
        KeyCreate.model_validate({"org": "acme", "colour": "red"})


def test_update_changes_are_the_fields_sent() -> None:
    upd = KeyUpdate.model_validate({"rpm": 5, "tpm": None, "models": [],
                                    "scopes": ["inference:read", "inference:read"],
                                    "name": None})
    assert upd.changes() == {"rpm": 5, "tpm": None, "models": (), "name": "",
                             "scopes": ("inference:read",)}
    assert KeyUpdate().changes() == {}


def test_every_model_is_star_as_in_the_cli() -> None:
    """Ops tester: PATCH `{"models": ["*"]}` was refused as an unknown alias, where
    `keys update --model '*'` means every alias."""
    assert KeyUpdate.model_validate({"models": ["*"]}).changes() == {"models": ()}
    assert KeyUpdate.model_validate({"models": ["a", "*"]}).changes() == {"models": ()}
    assert KeyCreate.model_validate({"org": "acme", "models": ["*"]}).models == ()
    assert KeyUpdate.model_validate({"models": ["a", "a"]}).changes() == {"models": ("a",)}


@pytest.mark.parametrize("field", ["scopes", "budget_period"])
def test_update_refuses_null_where_there_is_no_none(field: str) -> None:
    """`{"scopes": null}` was taken and changed nothing: a 200 that did not do what
    it was sent for."""
    with pytest.raises(ValidationError) as err:
        KeyUpdate.model_validate({field: None})
    assert err.value.errors()[0]["loc"] == (field,)


def test_document_covers_every_route_and_its_schemas_are_valid() -> None:
    doc = openapi_document("1.2.3")
    assert doc["openapi"] == "3.1.0" and doc["info"]["version"] == "1.2.3"
    for r in ROUTES:
        op = doc["paths"][r.path][r.method.lower()]
        assert str(r.status) in op["responses"] and op["x-role"] == r.role
        assert ("requestBody" in op) == (r.body is not None)
    for schema in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


def test_query_parameters_come_from_the_query_models() -> None:
    op = openapi_document()["paths"]["/v1/keys"]["get"]
    assert {p["name"] for p in op["parameters"]} == {"org", "status", "limit", "after"}


def test_usage_may_be_streamed_as_ndjson() -> None:
    """GET /v1/usage documents both answers: the page (JSON) and, with stream=true or
    `Accept: application/x-ndjson`, one document a line: a record, the totals last."""
    doc = openapi_document()
    op = doc["paths"]["/v1/usage"]["get"]
    assert "stream" in {p["name"] for p in op["parameters"]}
    content = op["responses"]["200"]["content"]
    assert set(content) == {"application/json", NDJSON}
    line = {**content[NDJSON]["schema"], "components": doc["components"]}
    validator = Draft202012Validator(line)
    record = {"request_id": "r1", "key_id": "k", "org": "acme", "model": "m",
              "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
              "cost_usd": "0.01", "status": 200, "started_at": "2026-01-01T00:00:00Z"}
    totals = {"requests": 1, "prompt_tokens": 1, "completion_tokens": 2,
              "total_tokens": 3, "cost_usd": "0.01"}
    for ok in (record, {"object": "usage.totals", "totals": totals, "groups": None},
               {"error": {"message": "m", "type": "server_error", "code": "x"}}):
        validator.validate(ok)
    assert not validator.is_valid({"object": "usage.totals"})
    # Only routes that offer it document it.
    others = [r for r in ROUTES if r.stream is None]
    assert others and all(
        NDJSON not in doc["paths"][r.path][r.method.lower()]["responses"][str(r.status)][
            "content"] for r in others)


def test_a_since_whose_plus_became_a_space_is_read_as_the_offset() -> None:
    """`?since=2026-12-04T10:00:00+01:00` typed unencoded (curl, a browser) arrives with
    a space for the `+`: the offset meant, not a 400."""
    from datetime import timedelta

    from policy.admin_schema import UsageQuery

    got = UsageQuery.model_validate({"since": "2026-12-04T10:00:00 01:00"}).since
    assert got is not None and got.utcoffset() == timedelta(hours=1)
    assert UsageQuery.model_validate({"since": "2026-12-04T10:00:00+01:00"}).since == got


def test_a_since_outside_the_years_utc_can_hold_is_a_400_not_a_500() -> None:
    """`0001-01-01T00:00:00+01:00` is a valid RFC 3339 time before the year 1 in UTC:
    PostgreSQL's query failed (a 500). Refused as input, as a time without its zone is
    (the README: the admin API wants the zone written)."""
    from pydantic import ValidationError

    from policy.admin_schema import UsageQuery

    for since in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
                  "2026-12-04T10:00:00"):
        with pytest.raises(ValidationError, match="since"):
            UsageQuery.model_validate({"since": since})
    assert UsageQuery.model_validate({"since": "0001-01-01T00:00:00Z"}).since is not None
