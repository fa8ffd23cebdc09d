"""The principal's metadata codec: what ext_authz encodes, ext_proc decodes, unchanged."""

from __future__ import annotations

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from authz.services.principal_md import (
    METADATA_NAMESPACE,
    principal_from_metadata,
    principal_metadata,
)
from policy.keys import Principal
from policy.limits import Limits

PRINCIPALS = [
    Principal(key_id="k-1", org="acme", scopes=frozenset(), models=frozenset()),
    Principal(
        key_id="k-2", org="beta", scopes=frozenset(), models=frozenset({"demo", "other"}),
        # Past 2**53: a Struct number (a double) would lose it; it travels as a string.
        limits=Limits(rpm=60, tpm=1000, max_concurrent=2, budget_nano=2**60 + 1,
                      budget_period="day"),
    ),
    Principal(key_id="k-3", org="", scopes=frozenset(), models=frozenset(),
              limits=Limits(budget_nano=0, budget_period="total")),
]


@pytest.mark.parametrize("p", PRINCIPALS, ids=lambda p: p.key_id)
def test_round_trip_through_envoy_messages(p: Principal) -> None:
    """As it travels: ext_authz's CheckResponse, then ext_proc's ProcessingRequest."""
    check = external_auth_pb2.CheckResponse(dynamic_metadata=principal_metadata(p))
    sent = external_auth_pb2.CheckResponse.FromString(check.SerializeToString())
    msg = ep.ProcessingRequest()
    msg.metadata_context.filter_metadata[METADATA_NAMESPACE].CopyFrom(sent.dynamic_metadata)
    received = ep.ProcessingRequest.FromString(msg.SerializeToString())
    md = received.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
    assert principal_from_metadata(md) == p


def test_scopes_do_not_travel() -> None:
    p = Principal(key_id="k", org="o", scopes=frozenset({"inference:read"}),
                  models=frozenset())
    decoded = principal_from_metadata(principal_metadata(p))
    assert decoded is not None and decoded.scopes == frozenset()


def test_no_principal_without_metadata_or_key_id() -> None:
    assert principal_from_metadata(None) is None
    md = principal_metadata(PRINCIPALS[0])
    md.update({"key_id": ""})
    assert principal_from_metadata(md) is None
