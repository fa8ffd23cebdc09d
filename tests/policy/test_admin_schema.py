"""The admin API's models and the OpenAPI document generated from them."""

from __future__ import annotations

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from policy.admin_schema import (
    ALL_SCOPES,
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
    assert upd.changes() == {"rpm": 5, "tpm": None, "models": (),
                             "scopes": ("inference:read",)}
    assert KeyUpdate().changes() == {}


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
