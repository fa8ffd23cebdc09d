"""The CLI: one-line errors, non-zero exits, never a traceback."""

from __future__ import annotations

import argparse
import ast
import asyncio
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from authz.cli import check
from authz.cli.main import main
from authz.runtime.settings import Settings
from authz.state.keys.keyring import KeyringStore
from policy.keyrecord import KeyRecord
from tests.helpers import free_port, write_policy

ROOT = Path(__file__).resolve().parents[2]


def tb(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authz.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def test_check_config_ok_and_errors(tmp_path: Path) -> None:
    good = write_policy(tmp_path, "http://127.0.0.1:8000")
    r = tb("check-config", str(good))
    assert r.returncode == 0 and "ok" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  m:\n    upstream_model: x\n    backends: [{url: 'ftp://h'}]\n")
    r = tb("check-config", str(bad))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert str(bad) in r.stderr and "models.m.backends" in r.stderr


def test_missing_config_and_bad_flags_are_one_line(tmp_path: Path) -> None:
    for args in (["check-config", str(tmp_path / "none.yaml")],
                 ["serve", "--config", str(tmp_path / "none.yaml")],
                 ["up", "--config", str(tmp_path / "none.yaml")],
                 ["up", "--sim", "--upstream", "http://127.0.0.1:1"],
                 ["sim", "--listen", "nope"],
                 ["usage", "--config", str(tmp_path / "none.yaml")]):
        r = tb(*args)
        # Bad input, exit 2 (operators tester: `up` without its config exited 1).
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, (args, r.stderr)


def test_the_simulator_on_a_busy_port_says_so_as_serve_does() -> None:
    """Retest: `sim` said `[Errno 98] error while attempting to bind on address
    ('127.0.0.1', P)`; `serve` and `up` name the address and the setting."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = tb("sim", "--listen", f"127.0.0.1:{port}")
    assert (r.returncode, r.stderr) == (
        1, f"tokenbooth: error: 127.0.0.1:{port} (--listen) is already in use\n")


def test_usage_totals(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    data = tmp_path / "data"
    data.mkdir()
    recs = [
        {"request_id": "a", "key_id": "k1", "org": "o1", "model": "demo", "prompt_tokens": 3,
         "completion_tokens": 4, "total_tokens": 7, "cost_usd": "0.1",
         "started_at": "2026-11-01T00:00:00Z", "status": 200},
        {"request_id": "b", "key_id": "k2", "org": "o2", "model": "demo", "prompt_tokens": 1,
         "completion_tokens": 1, "total_tokens": 2, "cost_usd": "0.2",
         "started_at": "2026-11-20T00:00:00Z", "status": 200},
    ]
    # A duplicate delivery of "a" counts once.
    (data / "usage.jsonl").write_text("\n".join(json.dumps(r) for r in [*recs, recs[0]]) + "\n")
    r = tb("usage", "--config", str(path), "--json")
    out = json.loads(r.stdout)
    assert out["totals"] == {"requests": 2, "prompt_tokens": 4, "completion_tokens": 5,
                             "total_tokens": 9, "cost_usd": "0.3"}
    r = tb("usage", "--config", str(path), "--json", "--org", "o2")
    assert [x["request_id"] for x in json.loads(r.stdout)["records"]] == ["b"]
    r = tb("usage", "--config", str(path), "--json", "--since", "2026-11-10")
    assert [x["request_id"] for x in json.loads(r.stdout)["records"]] == ["b"]
    r = tb("usage", "--config", str(path))
    assert "total: 2 request(s)" in r.stdout
    r = tb("usage", "--config", str(path), "--since", "yesterday")
    assert r.returncode == 2 and "--since" in r.stderr
    r = tb("usage", "--config", str(path), "--since", "")  # was read as no filter
    assert r.returncode == 2 and "--since" in r.stderr
    # Out of UTC's years: one line of bad input (with a PostgreSQL sink it was the store's
    # failure); a lowercase `z` is RFC 3339's too.
    r = tb("usage", "--config", str(path), "--since", "0001-01-01T00:00:00+01:00")
    assert r.returncode == 2 and "out of range" in r.stderr and r.stderr.count("\n") == 1
    r = tb("usage", "--config", str(path), "--since", "2026-11-10T00:00:00z")
    assert r.returncode == 0, r.stderr


def test_a_reader_that_leaves_stops_the_command_quietly(tmp_path: Path) -> None:
    """`tokenbooth usage | head`: the status a SIGPIPE gives and nothing on stderr (it
    printed `tokenbooth: error: [Errno 32] Broken pipe`, exit 1)."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    (tmp_path / "data").mkdir()
    rec = {"key_id": "k1", "org": "o1", "model": "demo", "prompt_tokens": 3,
           "completion_tokens": 4, "total_tokens": 7, "cost_usd": "0.1",
           "started_at": "2026-11-01T00:00:00Z", "status": 200}
    (tmp_path / "data" / "usage.jsonl").write_text("".join(
        json.dumps({**rec, "request_id": f"r{i}"}) + "\n" for i in range(20_000)))
    proc = subprocess.Popen([sys.executable, "-m", "authz.cli", "usage", "--config",
                             str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"request_id")
    proc.stdout.close()  # the reader leaves after one line
    with proc.stderr:
        err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141
    assert err == b""
    # Output still buffered when the command returns (a short listing, stdout buffered):
    # flushed inside the command, not at exit, where Python printed its own error.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    for _ in range(3):
        r = subprocess.run(f"{sys.executable} -m authz.cli keys list --config {path} | true",
                           shell=True, capture_output=True, env=env, timeout=60)
        assert r.stderr == b"", r.stderr


def test_keys_list_is_by_id_as_the_admin_api_lists_them(tmp_path: Path) -> None:
    """The same output with or without --admin-url: the config's keys and the stored ones
    together, by id (it listed the config's first, each in file order)."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    (tmp_path / "data").mkdir()
    r = tb("keys", "create", "--org", "acme", "--config", str(path), "--json")
    stored = json.loads(r.stdout)["id"]
    rows = json.loads(tb("keys", "list", "--config", str(path), "--json").stdout)
    ids = [row["id"] for row in rows]
    assert stored in ids and "k-main" in ids and ids == sorted(ids)


def test_keys_warns_of_a_keyring_gone_from_a_used_data_dir(tmp_path: Path) -> None:
    """Retest tester: with keys.json deleted (the services keep their keys, and say so),
    `keys create` wrote a keyring of the new key alone, and every earlier key got 401,
    without a word. A data_dir where a keyring was written, with no keys.json, is warned
    of."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    (tmp_path / "data").mkdir()
    r = tb("keys", "create", "--org", "acme", "--config", str(path))
    assert r.returncode == 0 and "warning" not in r.stderr  # a new data_dir: no warning
    (tmp_path / "data" / "keys.json").unlink()
    for args in (("list",), ("create", "--org", "acme")):
        r = tb("keys", *args, "--config", str(path))
        assert r.returncode == 0 and "keys.json does not exist, though a keyring was " \
            "written here" in r.stderr, r.stderr
    # Keys in the config file alone, records written: no keyring ever, no warning.
    other = tmp_path / "other"
    path = write_policy(other, "http://127.0.0.1:8000")
    (other / "data").mkdir()
    (other / "data" / "usage.jsonl").write_text("")
    r = tb("keys", "list", "--config", str(path))
    assert (r.returncode, r.stderr) == (0, "")


def test_keys_create_takes_star_for_every_model(tmp_path: Path) -> None:
    """Retest tester: `keys create --model '*'` was refused as an unknown alias, where
    `keys update --model '*'` and the admin API take it for every alias."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    (tmp_path / "data").mkdir()
    r = tb("keys", "create", "--org", "acme", "--model", "*", "--config", str(path),
           "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["models"] == []


def test_usage_groups_name_a_missing_value(tmp_path: Path) -> None:
    """GET /v1/models leaves records of no model: their group is shown as `(none)` in
    the table (a blank cell read as a misaligned row), and stays "" in JSON."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    (tmp_path / "data").mkdir()
    recs = [{"request_id": rid, "key_id": "k1", "org": "o1", "model": model,
             "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cost_usd": "0",
             "started_at": "2026-11-01T00:00:00Z", "status": 200}
            for rid, model in (("a", "demo"), ("b", ""))]
    (tmp_path / "data" / "usage.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    lines = tb("usage", "--config", str(path), "--group-by", "model").stdout.splitlines()
    assert [line.split()[:2] for line in lines[1:]] == [["(none)", "1"], ["demo", "1"],
                                                        ["total", "2"]]
    r = tb("usage", "--config", str(path), "--group-by", "model", "--json")
    assert [g["model"] for g in json.loads(r.stdout)["groups"]] == ["", "demo"]


def test_the_entry_point_and_python_m_reach_the_same_main() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["tokenbooth"].partition(":")
    assert getattr(importlib.import_module(module), attr) is main
    r = tb("--help")
    assert r.returncode == 0
    for command in ("up", "serve", "sim", "envoy", "check-config", "keys", "usage", "audit"):
        assert f"    {command}" in r.stdout


def cli_imports(path: Path) -> set[str]:
    """The authz.cli modules a module imports (at any depth of its body)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "authz.cli":
            out |= {f"authz.cli.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("authz.cli."):
            out.add(str(node.module))
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("authz.cli.")}
    return out


def test_one_module_per_command_group_and_no_import_cycle() -> None:
    cli = ROOT / "authz" / "cli"
    graph = {f"authz.cli.{p.stem}": cli_imports(p) for p in cli.glob("*.py")
             if p.stem != "__init__"}
    groups = {"audit", "check", "envoy", "keys", "serve", "sim", "usage"}
    # Shared helpers: common (parsing, loading) and remote (the admin API's client).
    helpers = {"authz.cli.common", "authz.cli.remote"}
    assert set(graph) == {"authz.cli.main", "authz.cli.__main__"} | helpers | {
        f"authz.cli.{g}" for g in groups}
    assert graph["authz.cli.main"] == {"authz.cli.common"} | {f"authz.cli.{g}" for g in groups}
    assert graph["authz.cli.common"] == set()
    assert graph["authz.cli.remote"] <= {"authz.cli.common"}
    for g in groups:  # a command module needs only the shared helpers
        assert graph[f"authz.cli.{g}"] <= helpers, g


def test_tokenbooth_config_names_the_default_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    assert main(["envoy", "render"], env={"TOKENBOOTH_CONFIG": str(path)}) == 0
    assert "tokenbooth_ingress" in capsys.readouterr().out
    # --config wins over the variable.
    assert main(["envoy", "render", "--config", str(tmp_path / "none.yaml")],
                env={"TOKENBOOTH_CONFIG": str(path)}) == 2
    assert "none.yaml: cannot read" in capsys.readouterr().err


def test_config_is_taken_before_or_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """`--config` before the command was refused ("unrecognized arguments") though the
    README says every command takes it; now it works at either place, and at the `keys`
    group's, and the one nearest the command wins."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    (tmp_path / "data").mkdir()
    none = str(tmp_path / "none.yaml")
    assert main(["--config", str(path), "envoy", "render"], env={}) == 0
    assert "tokenbooth_ingress" in capsys.readouterr().out
    assert main(["--config", str(path), "keys", "list", "--json"], env={}) == 0
    assert main(["keys", "--config", str(path), "list", "--json"], env={}) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0] == out[1] and "k-main" in out[0]
    assert main(["--config", str(path), "envoy", "render", "--config", none], env={}) == 2
    assert "none.yaml: cannot read" in capsys.readouterr().err
    assert main(["--config", none, "keys", "--config", str(path), "list"], env={}) == 0
    assert main(["envoy", "--config", str(path), "render"], env={}) == 0  # (review)


def test_usage_filters_that_are_not_utf8_are_bad_input(tmp_path: Path) -> None:
    """Records tester: `usage --org $'\\xff'` with a PostgreSQL sink failed as an
    unreadable store (exit 1); it is bad input, refused before any store is asked."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    for flag in ("--org", "--key"):
        r = subprocess.run([sys.executable, "-m", "authz.cli", "usage", "--config",
                            str(path), flag, b"\xff".decode("utf-8", "surrogateescape")],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert r.returncode == 2, r.stderr
        assert f"argument {flag}: '\\udcff' is not UTF-8 text" in r.stderr
        assert "Traceback" not in r.stderr


def test_an_internal_error_is_one_line_unless_tokenbooth_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    def broken(args: argparse.Namespace, settings: Settings) -> int:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(check, "cmd_check", broken)
    assert main(["check-config", "x.yaml"], env={}) == 1
    assert capsys.readouterr().err == "tokenbooth: internal error: ZeroDivisionError: boom\n"
    with pytest.raises(ZeroDivisionError):
        main(["check-config", "x.yaml"], env={"TOKENBOOTH_DEBUG": "1"})


def test_keys_flags_refuse_bad_values_in_one_line(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    for flag, value in (("--expires", "soon"), ("--rpm", "0"), ("--budget", "-1"),
                        ("--rpm", "1_000"), ("--tpm", "\u0661\u0662"), ("--rpm", "+5"),
                        ("--budget", "1_00"), ("--budget", "\u0661\u0662"),
                        ("--budget", " 2 "),
                        ("--name", "a\x1b[2Jb"), ("--name", "n" * 257),
                        # A secret pasted as the name: kept in clear and listed (security
                        # tester); never echoed in the refusal.
                        ("--name", "sk-tb-BQk9NFV1_MpXaFVYOZmV0vFaZK9iOSBqmhTmmAPjPic"),
                        ("--org", "o\u200b"), ("--org", "o ")):
        r = tb("keys", "create", "--config", str(path), "--org", "o", flag, value)
        assert r.returncode == 2, (flag, r.stderr)
        assert r.stderr.count("\n") == 1 and flag in r.stderr and "Traceback" not in r.stderr
        assert "BQk9NFV1_Mp" not in r.stderr
    # A key created already expired could never be used: refused before any store is read.
    r = tb("keys", "create", "--config", str(path), "--org", "o",
           "--expires", "2020-01-01T00:00:00Z")
    assert r.returncode == 2 and "not in the future" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


def test_an_org_that_exists_keeps_a_name_the_rule_now_refuses(tmp_path: Path) -> None:
    """`keys create --org 'acme '` for an org an earlier release stored (here: a key of
    it in the keyring) is accepted; a new org of that shape is refused in one line."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    (tmp_path / "data").mkdir()
    store = KeyringStore(tmp_path / "data")
    asyncio.run(store.create(KeyRecord(id="key_0ld", org="acme ", sha256="0" * 64,
                                       prefix="sk-tb-0ld",
                                       created_at=datetime(2026, 1, 1, tzinfo=UTC))))
    r = tb("keys", "create", "--config", str(path), "--org", "acme ", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["org"] == "acme "
    r = tb("keys", "create", "--config", str(path), "--org", "beta ")
    assert r.returncode == 2 and "--org" in r.stderr and r.stderr.count("\n") == 1


def test_a_store_that_does_not_answer_is_one_line_and_nothing_on_stdout(
        tmp_path: Path) -> None:
    """Redis down: each command says so in one line (it was a log line, then the error;
    `usage` printed its table header first)."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000",
                        state=f"redis://127.0.0.1:{free_port()}/0")
    for command, code in ((("keys", "list"), 1), (("keys", "show", "k-x"), 1),
                          (("usage",), 1), (("audit",), 2)):
        r = tb(*command, "--config", str(path))
        assert r.returncode == code, (command, r.stderr)
        assert r.stdout == "", (command, r.stdout)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("tokenbooth: error: "), (
            command, r.stderr)
        assert "Traceback" not in r.stderr


def test_printed_names_cannot_drive_the_terminal() -> None:
    from authz.runtime.cells import printable

    assert printable("team\x1b[2J\nstatus: active\x07") == \
        "team\\x1b[2J\\nstatus: active\\x07"
    assert printable("équipe 42") == "équipe 42"


def test_table_cells_keep_columns_for_any_script() -> None:
    """A cell is cut and padded by terminal columns, not characters: a CJK name takes two
    columns a character, a combining mark none (the tables misaligned with such names)."""
    from authz.runtime.cells import cell, display_width

    assert display_width("研究チーム") == 10 and display_width("e\u0301quipe") == 6
    assert display_width("\u0939\u093f\u0902") == 2  # हिं: a sign, a mark
    assert display_width("\u2764\ufe0f") == 1 and display_width("a\u200db") == 2
    fullwidth = "\uff57\uff49\uff44\uff45"
    for name in ("研究チーム研究チーム", "équipe", "e\u0301quipe", "acme", "x" * 30, fullwidth):
        shown = cell(name, 12)
        assert display_width(shown) == 12, name
        kept = shown.rstrip()
        # A cut name ends in "…" (one column): it was read as a whole, shorter name.
        assert name.startswith(kept.removesuffix("…")), name
        assert kept.endswith("…") == (display_width(name) > 12), name
    assert cell("研究チーム研究", 9) == "研究チー…"
    assert cell("研究チーム研究", 8) == "研究チ…" + " "  # a wide character never split
    assert cell("研究チーム研究", 14) == "研究チーム研究"
    assert cell("a\x1b[2Jb", 8) == "a\\x1b[2…"  # shown escaped, then cut


def test_usage_table_lines_up_wide_org_names(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    (tmp_path / "data").mkdir()
    recs = [{"request_id": rid, "key_id": "k1", "org": org, "model": "demo",
             "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "cost_usd": "0",
             "started_at": "2026-11-01T00:00:00Z", "status": 200}
            for rid, org in (("a", "研究チーム"), ("b", "acme"))]
    (tmp_path / "data" / "usage.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    from authz.runtime.cells import display_width

    for args in ((), ("--group-by", "org")):
        lines = tb("usage", "--config", str(path), *args).stdout.splitlines()
        table = [line for line in lines if not line.startswith("total:")]
        # every row's numbers end in the same terminal column
        assert len({display_width(line) for line in table}) == 1, lines


def test_version() -> None:
    r = tb("--version")
    assert r.returncode == 0
    assert r.stdout == f"tokenbooth {importlib.metadata.version('tokenbooth')}\n"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_run_passes_the_four_ports_and_the_upstream() -> None:
    def run_line(*assignments: str) -> str:
        # Under `make test` the outer make's flags would make this one print directories.
        env = {k: v for k, v in os.environ.items()
               if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
        r = subprocess.run(["make", "--no-print-directory", "-n", "run", *assignments],
                           cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
                           env=env)
        return r.stdout.strip().splitlines()[-1]

    assert run_line() == ".venv/bin/tokenbooth up"
    assert run_line("LISTEN=127.0.0.1:18080", "GRPC_LISTEN=127.0.0.1:18081",
                    "HTTP_LISTEN=127.0.0.1:18082", "ADMIN_LISTEN=127.0.0.1:18083",
                    "UPSTREAM=http://10.0.0.5:8000") == (
        ".venv/bin/tokenbooth up --upstream http://10.0.0.5:8000 --listen 127.0.0.1:18080 "
        "--grpc-listen 127.0.0.1:18081 --http-listen 127.0.0.1:18082 "
        "--admin-listen 127.0.0.1:18083")


def test_limits_past_what_the_stores_keep_exact_are_refused_where_written(
    tmp_path: Path,
) -> None:
    """A budget of 2**53 nano-USD or more (or a count past 2**53) cannot be kept exact by
    Redis's Lua: refused by `keys`, `check-config`, in one line each, naming the value;
    never accepted and then a 500 on every request of the key."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    for flag, value in (("--budget", "9007199.254740992"), ("--budget", "1e400"),
                        ("--budget", "0.0000000015"),  # finer than a nano-USD
                        ("--tpm", "99999999999999999999999"), ("--org", "")):
        args = ("--org", "o") if flag != "--org" else ()
        r = tb("keys", "create", "--config", str(path), *args, flag, value)
        assert r.returncode == 2, (flag, r.stderr)
        assert r.stderr.count("\n") == 1 and flag in r.stderr and "Traceback" not in r.stderr
    r = tb("keys", "create", "--config", str(path), "--org", "o", "--budget",
           "9007199.254740991", "--json")
    assert r.returncode == 0, r.stderr
    big = write_policy(tmp_path / "big", "http://127.0.0.1:8000",
                       orgs={"acme": {"budget_usd": "1e12"}})
    r = tb("check-config", str(big))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert str(big) in r.stderr and "orgs.acme.budget_usd" in r.stderr


def test_odd_input_is_one_line_naming_what_is_wrong(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    r = tb("usage", "--config", str(path), "--since", "99999999999d")
    assert r.returncode == 2 and "--since" in r.stderr and r.stderr.count("\n") == 1
    for flag, value in (("--batch", "0"), ("--batch", "1_0"), ("--claim-idle", "inf"),
                        ("--claim-idle", "nan"), ("--claim-idle", "-1")):
        r = tb("usage", "export", "--config", str(path), flag, value)
        assert r.returncode == 2 and flag in r.stderr and r.stderr.count("\n") == 1, r.stderr
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    r = tb("check-config", str(binary))
    assert r.returncode == 2 and str(binary) in r.stderr and "UTF-8" in r.stderr
    assert r.stderr.count("\n") == 1


def test_a_data_dir_error_names_the_setting(tmp_path: Path) -> None:
    """serve on a read-only data_dir said only `[Errno 30] Read-only file system: '…'`."""
    import errno

    from authz.cli.common import naming_data_dir

    data = tmp_path / "data"
    with pytest.raises(OSError, match=r"^data_dir .*/data: .*/data/usage\.jsonl: "
                                      r"read-only file system$"), naming_data_dir(data):
        raise OSError(errno.EROFS, "Read-only file system", str(data / "usage.jsonl"))
    elsewhere = OSError(errno.EACCES, "Permission denied", "/etc/shadow")
    with pytest.raises(OSError) as e, naming_data_dir(data):
        raise elsewhere
    assert e.value is elsewhere


def test_keys_on_a_keyring_that_never_answers_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A named pipe at keys.json (a stalled mount plays the same) held `keys` for good."""
    from authz.cli import keys as keys_cli
    from authz.state.keys import keyring

    monkeypatch.setattr(keys_cli, "STORE_START_S", 0.3)
    monkeypatch.setattr(keyring, "CLOSE_WAIT_S", 0.1)
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    (tmp_path / "data").mkdir()
    fifo = tmp_path / "data" / "keys.json"
    os.mkfifo(fifo)
    try:
        assert main(["keys", "list", "--config", str(path)]) == 1
    finally:  # let the read that waits on the pipe end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    err = capsys.readouterr().err
    assert err.startswith("tokenbooth: error: the key store did not answer within 0.3 s")
    assert err.count("\n") == 1


def test_keys_and_usage_warn_of_a_data_dir_no_gateway_wrote(tmp_path: Path) -> None:
    """t1 tester: `data_dir` changed in the file while a gateway ran (it keeps the one it
    started with until a restart): `keys create` made the new directory and a key no
    gateway read (401), and `usage` showed nothing, neither with a word why."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    r = tb("usage", "--config", str(path))
    assert r.returncode == 0 and "data_dir" in r.stderr and "does not exist" in r.stderr
    for args in (("keys", "list"), ("keys", "show", "k-main")):
        r = tb(*args, "--config", str(path))
        assert "does not exist: no key is stored there" in r.stderr, (args, r.stderr)
    r = tb("keys", "create", "--org", "acme", "--config", str(path))
    assert r.returncode == 0 and "did not exist and was created now" in r.stderr
    # Once there, neither says a word.
    for args in (("keys", "create", "--org", "acme"), ("usage",)):
        r = tb(*args, "--config", str(path))
        assert (r.returncode, "warning" in r.stderr) == (0, False), r.stderr


def test_keys_create_refuses_an_org_in_another_unicode_form_of_a_known_one(
        tmp_path: Path) -> None:
    """Full-width `acme` beside the config's acme: two orgs that print alike."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    (tmp_path / "data").mkdir()
    r = tb("keys", "create", "--config", str(path), "--org", "\uff41\uff43\uff4d\uff45")
    assert r.returncode == 2 and "reads as the org 'acme'" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


def test_a_secret_that_cannot_be_printed_leaves_no_active_key(tmp_path: Path) -> None:
    """CLI tester: `keys create > /dev/full` stored an active key whose secret nobody
    got (one more per retry of a script), and said nothing of it."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    (tmp_path / "data").mkdir()
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "authz.cli", "keys", "create", "--org",
                            "acme", "--json", "--config", str(path)], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "could not be written (No space left on device)" in r.stderr
    listed = json.loads(tb("keys", "list", "--json", "--config", str(path)).stdout)
    made = [k for k in listed if k["source"] == "store"]
    assert len(made) == 1 and made[0]["status"] == "revoked"
    assert made[0]["id"] in r.stderr


def test_a_key_past_its_expiry_is_listed_as_expired(tmp_path: Path) -> None:
    """CLI tester: an expired key (refused with 401 since) was listed as `active`."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    (tmp_path / "data").mkdir()
    soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    made = tb("keys", "create", "--org", "acme", "--expires", soon, "--json", "--config",
              str(path))
    assert made.returncode == 0, made.stderr
    key_id = json.loads(made.stdout)["id"]
    time.sleep(2.2)
    text = tb("keys", "list", "--config", str(path)).stdout
    (line,) = [ln for ln in text.splitlines() if ln.startswith(key_id)]
    assert " expired " in line
    listed = json.loads(tb("keys", "list", "--json", "--config", str(path)).stdout)
    assert [k["status"] for k in listed if k["id"] == key_id] == ["active"]  # as stored
