"""The principal's metadata codec: how ext_authz hands the key it accepted to ext_proc.

ext_authz puts the principal into its dynamic metadata; Envoy forwards that namespace
to ext_proc (see `ext_proc`'s `forwarding_namespaces` in authz/envoy_config/http_filters.py),
so the two services need not share a replica or a cache, and ext_proc looks nothing up.
Integers travel as strings: Struct numbers are doubles, and nano-USD must stay exact.
Scopes do not travel: ext_authz has already checked them.
"""

from __future__ import annotations

from authz.envoy_config.names import EXT_AUTHZ
from authz.services import protos
from policy.keys import Principal
from policy.limits import Limits

# The dynamic-metadata namespace of the principal: ext_authz's own.
METADATA_NAMESPACE = EXT_AUTHZ


def principal_metadata(p: Principal) -> protos.Msg:
    """Who, which models, which limits, as a `Struct` for ext_authz's dynamic metadata."""
    lim = p.limits
    md = protos.Struct()
    md.update({
        "key_id": p.key_id,
        "org": p.org,
        "models": sorted(p.models),
        "rpm": _opt(lim.rpm),
        "tpm": _opt(lim.tpm),
        "max_concurrent": _opt(lim.max_concurrent),
        "budget_nano": _opt(lim.budget_nano),
        "budget_period": lim.budget_period,
    })
    return md


def principal_from_metadata(md: protos.Msg | None) -> Principal | None:
    """The principal in `md` (the Struct `principal_metadata` made), or None when there is
    none: no metadata, or no key id."""
    if md is None:
        return None
    fields = md.fields
    key_id = fields["key_id"].string_value if "key_id" in fields else ""
    if not key_id:
        return None
    models = fields["models"].list_value.values if "models" in fields else ()

    def opt_int(name: str) -> int | None:
        raw = fields[name].string_value if name in fields else ""
        return int(raw) if raw else None

    return Principal(
        key_id=key_id,
        org=fields["org"].string_value if "org" in fields else "",
        scopes=frozenset(),  # ext_authz checked them
        models=frozenset(v.string_value for v in models),
        limits=Limits(
            rpm=opt_int("rpm"),
            tpm=opt_int("tpm"),
            max_concurrent=opt_int("max_concurrent"),
            budget_nano=opt_int("budget_nano"),
            budget_period=(fields["budget_period"].string_value
                           if "budget_period" in fields else "month"),
        ),
    )


def _opt(v: int | None) -> str:
    return "" if v is None else str(v)
