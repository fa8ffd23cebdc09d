"""policy/keyrecord.py: the stored form of a key, validated."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from policy.admin_schema import KeyCreate
from policy.keyrecord import SCOPES, KeyRecord, new_org_problem, valid_org_name

FP = "0123456789abcdef" * 4


def test_defaults() -> None:
    rec = KeyRecord(id="k-1", org="acme", sha256=FP)
    assert rec.scopes == SCOPES == ("inference:read", "inference:write")
    assert (rec.prefix, rec.name, rec.models, rec.status, rec.budget_period) == (
        "", "", (), "active", "month")
    assert (rec.rpm, rec.tpm, rec.max_concurrent, rec.budget_usd) == (None, None, None, None)
    assert (rec.created_at, rec.expires_at) == (None, None)


def test_round_trips_through_json() -> None:
    rec = KeyRecord(id="k.1_x-y", org="acme", sha256=FP, scopes=("inference:read",),
                    models=("demo",), rpm=5, budget_usd=Decimal("1.25"), status="revoked",
                    expires_at=datetime(2027, 1, 1, tzinfo=UTC))
    assert KeyRecord.model_validate_json(rec.model_dump_json()) == rec
    assert rec.model_dump(mode="json")["budget_usd"] == "1.25"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("id", "", "should match pattern"),
    ("id", "has space", "should match pattern"),
    ("id", "x" * 65, "should match pattern"),
    ("org", "", "at least 1 character"),
    ("sha256", FP.upper(), "should match pattern"),
    ("sha256", FP[:-1], "should match pattern"),
    ("scopes", ("inference:read", "admin"), "unknown scope(s) ['admin']"),
    ("rpm", 0, "greater than or equal to 1"),
    ("budget_usd", Decimal(-1), "greater than or equal to 0"),
    ("budget_period", "week", "'day', 'month' or 'total'"),
    ("status", "paused", "'active' or 'revoked'"),
    ("expires_at", datetime(2027, 1, 1), "a time needs a timezone"),
    ("created_at", datetime(2027, 1, 1), "a time needs a timezone"),
    ("secret", "sk-tb-x", "Extra inputs are not permitted"),
])
def test_invalid_fields_are_refused(field: str, value: Any, message: str) -> None:
    data: dict[str, Any] = {"id": "k", "org": "o", "sha256": FP, field: value}
    with pytest.raises(ValidationError) as err:
        KeyRecord.model_validate(data)
    assert err.value.errors()[0]["loc"] == (field,)
    assert message in str(err.value)


def test_is_frozen() -> None:
    rec = KeyRecord(id="k", org="o", sha256=FP)
    with pytest.raises(ValidationError):
        rec.org = "other"  # type: ignore[misc]
    assert rec.model_copy(update={"status": "revoked"}).status == "revoked"


@pytest.mark.parametrize(("org", "why"), [
    ("acme\u200b", "U+200B (ZERO WIDTH SPACE)"),
    ("acme\u200c", "U+200C"),
    ("\u202eemca", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
    ("ac\u0085me", "U+0085"),
    ("acme\ufeff", "U+FEFF"),
    ("a\u2028b", "U+2028"),
    ("   ", "not only whitespace"),
    (" acme", "no whitespace at its start or end"),
    ("acme\u3000", "no whitespace at its start or end"),
    ("", "1 to 128 characters"),
    ("U\u0308nico\u0301de", "composed (NFC) form"),  # prints as "Ünicóde"
    ("sk-tb-" + "Ab3_-x" * 7, "a key's secret"),  # pasted where the org belongs
    ("team sk-tb-" + "Ab3_-x" * 7, "a key's secret"),
])
def test_a_new_org_name_that_reads_as_another_is_refused(org: str, why: str) -> None:
    problem = new_org_problem(org)
    assert problem is not None and why in problem
    # A stored key of such an org still loads: the rule is for new names only.
    if valid_org_name(org):
        assert KeyRecord(id="k", org=org, sha256=FP).org == org


@pytest.mark.parametrize("org", ["acme", "sk-tb-team", "Ünïcödé GmbH", "研究部", "a b", "x" * 128,
                                 "\u0645\u06cc\u200c\u0634\u0648\u062f"])  # Persian ZWNJ
def test_printable_org_names_pass(org: str) -> None:
    assert new_org_problem(org) is None
    assert KeyCreate.model_validate({"org": org}).org == org


@pytest.mark.parametrize("when", [99999999999, 1.5e10, "1.0e11", "0", True])
def test_an_expiry_written_as_a_number_is_refused(when: object) -> None:
    """A number was read as Unix seconds (milliseconds past 2e10): the year 5138 meant,
    a key expired in 1973, from the config file as from the admin API (admin retest)."""
    with pytest.raises(ValueError, match="not a number"):
        KeyRecord.model_validate({"id": "k-1", "org": "acme", "sha256": "0" * 64,
                                  "expires_at": when})
