"""`tokenbooth keys create|list|show|update|revoke`: the secret is printed once, at
creation. `show` adds the current budget period's spend and the limits' state, read from
the limit store (Redis, or the state the running process journals in data_dir)."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final, TypeVar

import orjson
from redis.exceptions import RedisError

from authz.cli import remote
from authz.cli.common import (
    Parents,
    Subparsers,
    admin_url_parser,
    load_for_state,
    parse_time,
    positive_int,
)
from authz.runtime.cells import cell, printable
from authz.runtime.settings import Settings
from authz.state.keys.base import KeyAdmin, ReadOnlyStore
from authz.state.keys.factory import make_store
from authz.state.keys.keyring import KeyringStore
from authz.state.limits.peek import show_state
from authz.state.orgs import make_org_store
from policy.admin_schema import EVERY_MODEL
from policy.bounds import BUDGET_DECIMALS, MAX_BUDGET_USD, MAX_COUNT, PLAIN_AMOUNT
from policy.config import Config, origin, redacted
from policy.keyrecord import (
    SCOPES,
    KeyRecord,
    expiry_in_past,
    key_name_problem,
    new_org_problem,
    valid_org_name,
)
from policy.keys import (
    display_prefix,
    fingerprint,
    new_secret,
    no_key_message,
    redact_secrets,
)
from policy.names import twin_problem

T = TypeVar("T")
# `keys update --rpm none` (and the other limits, --budget, --expires): remove it.
CLEAR: Final = "none"
# keys update's options and the record fields they set.
_UPDATE_OPTIONS = (("name", "name"), ("scope", "scopes"), ("model", "models"), ("rpm", "rpm"),
                   ("tpm", "tpm"), ("max_concurrent", "max_concurrent"),
                   ("budget", "budget_usd"), ("budget_period", "budget_period"),
                   ("expires", "expires_at"))


def add_parsers(sub: Subparsers, parents: Parents) -> None:
    common = argparse.ArgumentParser(add_help=False,
                                     parents=[parents.config, admin_url_parser()])
    keys = sub.add_parser("keys", parents=[parents.config],
                          help="create, list, show and revoke API keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    c = ksub.add_parser("create", parents=[common], help="create a key; prints its secret once")
    c.add_argument("--org", required=True, type=_org)
    c.add_argument("--name", default="", type=_name)
    c.add_argument("--scope", action="append", choices=SCOPES,
                   help="repeatable; default: all scopes")
    c.add_argument("--model", action="append",
                   help=f"allowed alias (repeatable); default, or {EVERY_MODEL!r}: all")
    c.add_argument("--rpm", type=_count, help="requests per minute")
    c.add_argument("--tpm", type=_count, help="tokens per minute")
    c.add_argument("--max-concurrent", type=_count, help="in-flight requests")
    c.add_argument("--budget", type=_usd, help="USD per budget period")
    c.add_argument("--budget-period", choices=["day", "month", "total"], default="month")
    c.add_argument("--expires", type=_when, help="ISO 8601 time, e.g. 2027-01-01T00:00:00Z")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_create)
    ls = ksub.add_parser("list", parents=[common], help="list keys (never their secrets)")
    ls.add_argument("--org")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    sh = ksub.add_parser("show", parents=[common], help="one key's record")
    sh.add_argument("id")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=cmd_show)
    _add_update(ksub, common)
    rv = ksub.add_parser("revoke", parents=[common], help="revoke a key (within 2 s everywhere)")
    rv.add_argument("id")
    rv.set_defaults(func=cmd_revoke)


def _add_update(ksub: Subparsers, common: argparse.ArgumentParser) -> None:
    u = ksub.add_parser(
        "update", parents=[common],
        help="change a key in place (within 2 s everywhere; no new secret, spend is kept)")
    u.add_argument("id")
    u.add_argument("--name", type=_name)
    u.add_argument("--scope", action="append", choices=SCOPES,
                   help="replaces the key's scopes (repeatable)")
    u.add_argument("--model", action="append",
                   help=f"replaces the allowed aliases (repeatable); {EVERY_MODEL!r}: all")
    for flag, kind, what in (("--rpm", _count, "requests per minute"),
                             ("--tpm", _count, "tokens per minute"),
                             ("--max-concurrent", _count, "in-flight requests"),
                             ("--budget", _usd, "USD per budget period"),
                             ("--expires", _when, "ISO 8601 time")):
        u.add_argument(flag, type=_or_clear(kind), help=f"{what}; {CLEAR!r} removes it")
    u.add_argument("--budget-period", choices=["day", "month", "total"],
                   help="a new period counts spend in its own ledger")
    u.add_argument("--json", action="store_true")
    u.set_defaults(func=cmd_update)


def _or_clear(parse: Callable[[str], T]) -> Callable[[str], T | str]:
    """An argparse type that also takes CLEAR (kept as the string)."""
    def parse_or_clear(v: str) -> T | str:
        return CLEAR if v.lower() == CLEAR else parse(v)

    parse_or_clear.__name__ = getattr(parse, "__name__", "value")  # argparse's messages
    return parse_or_clear


def _usd(v: str) -> Decimal:
    if not PLAIN_AMOUNT.fullmatch(v):  # Decimal reads "1_00" as 100 (admin tester)
        raise argparse.ArgumentTypeError(f"expected an amount in USD (digits, one '.' "
                                         f"and an exponent, as in '1e3'), got {v!r}")
    try:
        d = Decimal(v)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"expected an amount in USD, got {v!r}") from None
    if not d.is_finite() or d < 0:
        raise argparse.ArgumentTypeError(f"expected an amount in USD, got {v!r}")
    if d > MAX_BUDGET_USD:
        raise argparse.ArgumentTypeError(f"at most {MAX_BUDGET_USD} USD, got {v!r}")
    if d != d.quantize(Decimal(1).scaleb(-BUDGET_DECIMALS)):
        raise argparse.ArgumentTypeError(
            f"at most {BUDGET_DECIMALS} decimal places (a nano-USD), got {v!r}")
    return d


def _count(v: str) -> int:
    """A limit: a positive integer the stores keep exact."""
    n = positive_int(v)
    if n > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"at most {MAX_COUNT}, got {v!r}")
    return n


def _org(v: str) -> str:
    """A key's org (OrgName); `_org_to_create` adds the rules for an org not known yet."""
    if not valid_org_name(v):
        raise argparse.ArgumentTypeError(
            f"expected 1 to 128 characters and no control character, got {v!r}")
    return v


def _org_to_create(cfg: Config, org: str) -> None:
    """As the admin API: an org name that reads as another is refused unless the org
    exists already (a key of it, its limits configured or stored)."""
    problem = new_org_problem(org)
    if problem is None and unicodedata.normalize("NFKC", org) != org:
        known = {*cfg.orgs, *(k.org for k in cfg.keys),
                 *(k.org for k in _with_store(cfg, lambda s: s.list_keys(), quiet=True)),
                 *asyncio.run(_stored_orgs(cfg))}
        problem = twin_problem(org, known, "org")
    if problem is None or org in cfg.orgs or any(k.org == org for k in cfg.keys):
        return
    if _with_store(cfg, lambda s: s.list_keys(org), quiet=True):
        return
    if org in asyncio.run(_stored_orgs(cfg)):
        return
    raise ValueError(f"--org: {problem}, got {redact_secrets(org)!r}")


async def _stored_orgs(cfg: Config) -> set[str]:
    store = make_org_store(cfg)
    try:
        return set(await store.read_all())
    except RedisError as e:
        raise OSError(f"cannot read the org limits from {redacted(cfg.state)}: {e}") from None
    finally:
        await store.close()


def _when(v: str) -> datetime:
    try:
        return parse_time(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


STORE_START_S = 10.0  # how long `keys` waits for the key store's first read


# Written beside keys.json by every write of it (keyring.py): with no keys.json, the
# keyring was deleted or moved, not never made (keys in the config file alone make none).
_KEYRING_WRITTEN = "keys.lock"


def _warn_if_keyring_gone(store: KeyringStore) -> None:
    """keys.json gone from a data_dir where one was written (the services keep the keys
    they had, and say so): one written now holds only the keys created now, and every
    other key gets 401 (retest tester: doing as the services' error line said)."""
    if not store.path.exists() and (store.path.parent / _KEYRING_WRITTEN).exists():
        print(f"tokenbooth: warning: {store.path} does not exist, though a keyring was "
              "written here: deleted or moved? A keyring written now holds only the keys "
              "created now, and every other key is refused; put the old one back first "
              "(from a backup)", file=sys.stderr)


def _with_store(cfg: Config, action: Callable[[KeyAdmin], Awaitable[T]],
                quiet: bool = False) -> T:
    """`action` on the key store; `quiet`: a look on the way to another action (its
    warnings are that action's to give)."""
    store = make_store(cfg)
    if not isinstance(store, KeyAdmin):
        raise ReadOnlyStore(
            "keys are managed by the validation service at "
            f"{origin(cfg.key_store.validation_url or '')}"
        )
    fresh = None
    if isinstance(store, KeyringStore) and not quiet:
        _warn_if_keyring_gone(store)
        if not store.path.parent.exists():
            fresh = store.path.parent

    async def run() -> T:
        try:
            # A keyring that is a named pipe, or on a stalled mount, held `keys` for good.
            await asyncio.wait_for(store.start(), STORE_START_S)
        except TimeoutError:
            await store.close()
            raise OSError(f"the key store did not answer within {STORE_START_S:g} s "
                          "(a stalled mount, or a keys.json that is not a file?)") from None
        try:
            return await action(store)
        finally:
            await store.close()

    done = asyncio.run(run())
    if fresh is not None:
        # A data_dir changed in the file: a running gateway reads the one it started
        # with until it restarts (t1 tester: a key created, then 401 without a word;
        # retest: `keys list` showed the config's keys alone, without one).
        what = ("did not exist and was created now" if fresh.exists() else
                "does not exist: no key is stored there")
        print(f"tokenbooth: warning: data_dir {fresh} {what}: a gateway already running "
              "reads its keys from the data_dir it started with (a data_dir changed in "
              "the config takes effect when it restarts)", file=sys.stderr)
    return done


def _every_or(models: Sequence[str] | None) -> tuple[str, ...]:
    """`--model` values as a key's models: `'*'` among them, every alias (as `()`)."""
    listed = tuple(dict.fromkeys(models or ()))
    return () if EVERY_MODEL in listed else listed


def _check_models(cfg: Config, models: Sequence[str]) -> None:
    unknown = sorted(set(_every_or(models)) - set(cfg.models))
    if unknown:
        raise ValueError(f"--model: unknown alias(es) {unknown}; known: {sorted(cfg.models)}")


def _not_in_config(cfg: Config, args: argparse.Namespace, what: str) -> None:
    """Keys declared in the policy file are changed there, not in the store."""
    if any(k.id == args.id for k in cfg.keys):
        raise ValueError(f"key {args.id!r} is declared in {args.config or 'the config file'}; "
                         f"{what} there")


def _client(args: argparse.Namespace, settings: Settings) -> remote.AdminClient | None:
    """The admin API's client with --admin-url (the command then reads no local state)."""
    url = getattr(args, "admin_url", None)
    return remote.AdminClient.from_settings(url, settings) if url else None


def cmd_create(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(args, settings)
    if client is not None:
        fields = {"org": args.org, "name": args.name, "rpm": args.rpm, "tpm": args.tpm,
                  "max_concurrent": args.max_concurrent, "budget_usd": args.budget,
                  "budget_period": args.budget_period, "expires_at": args.expires}
        fields |= {k: v for k, v in (("scopes", args.scope), ("models", args.model)) if v}
        created = remote.create_key(client, fields)
        record_id, org, secret = created["id"], created["org"], created["key"]
        shown = created
    else:
        cfg = load_for_state(args, settings)
        _org_to_create(cfg, args.org)
        _check_models(cfg, args.model or ())
        expired = expiry_in_past(args.expires, datetime.now(UTC))
        if expired:
            raise ValueError(expired)
        secret = new_secret()
        record = _new_record(args, secret)
        if any(k.id == record.id for k in cfg.keys):
            raise ValueError("key id collision with the config file; run the command again")
        _with_store(cfg, lambda s: s.create(record))
        record_id, org = record.id, record.org
        shown = {**_public(record), "key": secret}
    try:
        if args.json:
            print(orjson.dumps(shown).decode())
        else:
            print(f"created key {record_id} for org {org}")
            print(f"  secret (shown once, store it now): {secret}")
        sys.stdout.flush()
    except OSError as e:
        # Its secret reached no one (a full disk, a reader that left): a key nobody can
        # use stayed active, one per retry of a script (CLI tester). Revoked instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if client is not None:
            remote.revoke_key(client, record_id)
        else:
            _with_store(cfg, lambda s: s.revoke(record_id))
        raise OSError(f"the new key's secret could not be written ({e.strerror or e}): key "
                      f"{record_id} is revoked again; run the command again") from None
    return 0


def _new_record(args: argparse.Namespace, secret: str) -> KeyRecord:
    return KeyRecord(
        id="key_" + secrets.token_hex(6),
        org=args.org,
        sha256=fingerprint(secret),
        prefix=display_prefix(secret),
        name=args.name,
        scopes=tuple(args.scope or SCOPES),
        models=_every_or(args.model),
        rpm=args.rpm,
        tpm=args.tpm,
        max_concurrent=args.max_concurrent,
        budget_usd=args.budget,
        budget_period=args.budget_period,
        created_at=datetime.now(UTC),
        expires_at=args.expires,
    )


def _public(rec: KeyRecord, source: str = "store") -> dict[str, Any]:
    d: dict[str, Any] = rec.model_dump(mode="json")
    d["source"] = source
    return d


def _all_keys(cfg: Config, org: str | None) -> list[dict[str, Any]]:
    static = [_public(k, "config") for k in cfg.keys if org is None or k.org == org]
    stored = _with_store(cfg, lambda s: s.list_keys(org))
    # By id, as the admin API lists them (`--admin-url`): the same output either way.
    return sorted(static + [_public(k) for k in stored], key=lambda r: str(r["id"]))


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(args, settings)
    rows = (remote.list_keys(client, args.org) if client is not None
            else _all_keys(load_for_state(args, settings), args.org))
    if args.json:
        print(orjson.dumps(rows).decode())
        return 0
    fmt = "{:<18} {} {} {:<11} {:<8} {:<7} {}"
    print(fmt.format("id", cell("org", 14), cell("name", 16), "prefix", "status", "source",
                     "expires_at"))
    now = datetime.now(UTC)
    for r in rows:
        # Every field printable: a remote admin API's answer is another server's text.
        print(fmt.format(printable(str(r["id"])), cell(r["org"], 14), cell(r["name"], 16),
                         printable(str(r["prefix"] or "-")),
                         printable(_shown_status(r, now)),
                         printable(str(r["source"])), printable(str(r["expires_at"] or "-"))))
    return 0


def _shown_status(row: dict[str, Any], now: datetime) -> str:
    """The stored status, or `expired` for an active key past its expiry (refused since,
    but listed as active: CLI tester). `--json` keeps the stored one beside expires_at."""
    status = str(row["status"])
    try:
        expires = parse_time(str(row["expires_at"])) if row.get("expires_at") else None
    except ValueError:
        return status
    return "expired" if status == "active" and expires is not None and expires <= now \
        else status


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(args, settings)
    if client is not None:  # the record and the limits' state, from the admin API
        got = remote.show_key(client, args.id)
        state = remote.key_state(client, args.id)
        if args.json:  # as the local one: the spend is in the state
            print(orjson.dumps({**got, "state": state}).decode())
            return 0
        _print_state(got, state)
        return 0
    cfg = load_for_state(args, settings)
    found = [r for r in _all_keys(cfg, None) if r["id"] == args.id]
    if not found:
        raise LookupError(no_key_message(args.id))
    shown = found[0]
    record = KeyRecord.model_validate({k: v for k, v in shown.items() if k != "source"})
    state = asyncio.run(_state(cfg, record))
    if args.json:
        print(orjson.dumps({**shown, "state": state}).decode())
        return 0
    _print_state(shown, state)
    return 0


async def _state(cfg: Config, record: KeyRecord) -> dict[str, Any]:
    """`show_state` with the org's limits in force, as the gateway and the admin API see
    them: those stored over the admin API (`PUT /v1/orgs/{org}`), else the config's."""
    store = make_org_store(cfg)
    try:
        stored = (await store.read_all()).get(record.org)
    except RedisError as e:
        raise OSError(f"cannot read the org limits from {redacted(cfg.state)}: {e}") from None
    finally:
        await store.close()
    return await show_state(cfg, record, datetime.now(UTC), stored)


def _print_state(shown: dict[str, Any], state: dict[str, Any]) -> None:
    _print_fields(shown)
    print(f"state at {state['at']} (from {state['source']}):")
    for who in ("key", "org"):
        if state[who] is not None:
            for line in _state_lines(state[who]):
                print(f"  {who} {line}")


def _state_lines(view: dict[str, Any]) -> list[str]:
    b, r, t, c = (view[k] for k in ("budget", "requests", "tokens", "concurrency"))
    out = []
    if b is not None:
        out.append(f"budget {b['period']}: ${b['spent_usd']} spent, ${b['reserved_usd']} "
                   f"reserved, ${b['remaining_usd']} of ${b['budget_usd']} left"
                   + (f" (resets {b['resets_at']})" if b["resets_at"] else ""))
    else:
        out.append("budget: none (its spend is in `tokenbooth usage`)")
    if r is not None:
        out.append(f"requests: {r['remaining']} of {r['limit']} per minute left, "
                   f"full in {r['reset_s']}s")
    if t is not None:
        out.append(f"tokens: {t['remaining']} of {t['limit']} per minute left, "
                   f"full in {t['reset_s']}s")
    if c is not None:
        out.append(f"concurrency: {c['in_flight']} of {c['limit']} in flight")
    return out


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    """The record fields `keys update` was asked to set (None: remove the limit)."""
    out: dict[str, Any] = {}
    for option, field in _UPDATE_OPTIONS:
        value = getattr(args, option)
        if value is not None:
            out[field] = None if value == CLEAR else value
    if "scopes" in out:
        out["scopes"] = tuple(dict.fromkeys(out["scopes"]))
    if "models" in out:
        models = tuple(dict.fromkeys(out["models"]))
        out["models"] = () if EVERY_MODEL in models else models
    if not out:
        raise ValueError("nothing to change: give at least one option (see keys update --help)")
    return out


def cmd_update(args: argparse.Namespace, settings: Settings) -> int:
    changes = _changes(args)
    client = _client(args, settings)
    if client is not None:
        sent = {k: (list(v) if isinstance(v, tuple) else v) for k, v in changes.items()}
        shown = remote.update_key(client, args.id, sent)
    else:
        cfg = load_for_state(args, settings)
        _not_in_config(cfg, args, "change it")
        _check_models(cfg, changes.get("models", ()))
        new = _with_store(cfg, lambda s: s.update(args.id, changes))
        if new is None:
            raise LookupError(no_key_message(args.id))
        shown = _public(new)
    if args.json:
        print(orjson.dumps(shown).decode())
        return 0
    print(f"updated key {shown['id']} (org {shown['org']}): "
          + ", ".join(f"{f}={_shown(f, shown[f])}" for f in changes))
    return 0


def _print_fields(fields: dict[str, Any], indent: str = "") -> None:
    """`field: value` lines, a nested object (the remote spend) indented below."""
    for k, v in fields.items():
        if isinstance(v, dict):
            print(f"{indent}{k}:")
            _print_fields(v, indent + "  ")
        else:
            shown = v if v not in (None, "", []) else "-"
            print(f"{indent}{k}: {printable(str(shown))}")


def _name(v: str) -> str:
    """`--name`: as the admin API takes it (256 characters, no control character)."""
    if len(v) > 256 or not all(c.isprintable() for c in v):
        raise argparse.ArgumentTypeError("expected at most 256 printable characters")
    problem = key_name_problem(v)
    if problem is not None:  # (never echoed: it would print the secret)
        raise argparse.ArgumentTypeError(problem)
    return v


def _shown(field: str, value: Any) -> str:
    if field == "models" and not value:
        return EVERY_MODEL
    if isinstance(value, list):
        return ",".join(value)
    return CLEAR if value is None else str(value)


def cmd_revoke(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(args, settings)
    if client is not None:
        done = remote.revoke_key(client, args.id)
        print(f"revoked key {done['id']} (org {done['org']})")
        return 0
    cfg = load_for_state(args, settings)
    _not_in_config(cfg, args, "set its status to revoked")
    revoked = _with_store(cfg, lambda s: s.revoke(args.id))
    if revoked is None:
        raise LookupError(no_key_message(args.id))
    print(f"revoked key {revoked.id} (org {revoked.org})")
    return 0


__all__ = ["add_parsers"]
