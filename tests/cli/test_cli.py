"""The CLI: one-line errors, non-zero exits, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import write_policy


def tb(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authz.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def test_check_config_ok_and_errors(tmp_path: Path) -> None:
    good = write_policy(tmp_path, "http://127.0.0.1:8000")
    r = tb("check-config", str(good))
    assert r.returncode == 0 and "ok" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  m:\n    upstream_model: x\n    backends: []\n")
    r = tb("check-config", str(bad))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert str(bad) in r.stderr and "models.m.backends" in r.stderr


def test_missing_config_and_bad_flags_are_one_line(tmp_path: Path) -> None:
    for args in (["check-config", str(tmp_path / "none.yaml")],
                 ["serve", "--config", str(tmp_path / "none.yaml")],
                 ["up", "--config", str(tmp_path / "none.yaml")],
                 ["sim", "--listen", "nope"],
                 ["usage", "--config", str(tmp_path / "none.yaml")]):
        r = tb(*args)
        assert r.returncode != 0, args
        assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, (args, r.stderr)


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
