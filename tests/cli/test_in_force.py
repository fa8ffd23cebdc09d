"""The state commands act on what a running `serve` acts on (reload tester): a refused
file on disk blocked every `keys revoke` while the services ran on their last good
config, and a file whose `state` changed had `keys create` write keys to a store the
running services do not read (they apply `state` at their restart)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from authz.runtime.in_force import RECORD
from authz.runtime.procs import http_ok, wait_until
from tests.cli.test_cli import tb
from tests.helpers import free_port, write_policy

# A Redis nobody listens on: a command that used it would fail.
NOWHERE = "redis://127.0.0.1:1/0"


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    http = f"127.0.0.1:{free_port()}"
    path = write_policy(tmp_path, "http://127.0.0.1:8000", services={
        "grpc_listen": f"127.0.0.1:{free_port()}", "http_listen": http})
    proc = subprocess.Popen([sys.executable, "-m", "authz.cli", "serve", "--config",
                             str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: http_ok(f"http://{http}/readyz"), "serve", timeout=20,
                   alive=[proc])
        yield path, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def key_ids(path: Path) -> list[str]:
    r = tb("keys", "list", "--json", "--config", str(path))
    assert r.returncode == 0, r.stderr
    return [k["id"] for k in json.loads(r.stdout)]


def test_a_refused_file_does_not_stop_a_revocation(
        serving: tuple[Path, subprocess.Popen[bytes]]) -> None:
    path, proc = serving
    made = tb("keys", "create", "--org", "acme", "--json", "--config", str(path))
    assert made.returncode == 0, made.stderr
    key_id = json.loads(made.stdout)["id"]
    good = path.read_text()
    data = yaml.safe_load(good)
    data["models"]["demo"]["price_per_1k_tokens"]["input"] = -3  # refused on reload
    path.write_text(yaml.safe_dump(data))
    r = tb("keys", "revoke", key_id, "--config", str(path))
    assert r.returncode == 0, r.stderr
    assert "tokenbooth: warning:" in r.stderr and f"pid {proc.pid}" in r.stderr
    assert "price_per_1k_tokens.input" in r.stderr  # what is wrong with the file, said
    shown = tb("keys", "show", key_id, "--json", "--config", str(path))
    assert json.loads(shown.stdout)["status"] == "revoked"
    assert tb("check-config", str(path)).returncode == 2  # the file itself: still refused


def test_a_state_changed_in_the_file_applies_to_the_cli_when_the_services_restart(
        serving: tuple[Path, subprocess.Popen[bytes]]) -> None:
    path, proc = serving
    data = yaml.safe_load(path.read_text())
    data["state"] = NOWHERE
    path.write_text(yaml.safe_dump(data))
    made = tb("keys", "create", "--org", "acme", "--json", "--config", str(path))
    assert made.returncode == 0, made.stderr
    assert "state changed since the services" in made.stderr
    assert json.loads(made.stdout)["id"] in key_ids(path)  # in the store they read
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert not (path.parent / "data" / RECORD).exists()  # a clean stop takes it back
    # Stopped: the file as it is (a Redis nobody listens on).
    r = tb("keys", "list", "--config", str(path))
    assert r.returncode != 0 and "warning" not in r.stderr


def test_a_killed_services_record_is_not_followed(
        serving: tuple[Path, subprocess.Popen[bytes]]) -> None:
    path, proc = serving
    proc.kill()
    proc.communicate(timeout=30)
    assert (path.parent / "data" / RECORD).exists()
    path.write_text("data_dir: data\nmodels: [not, a, mapping]\n")  # its record found
    r = tb("keys", "list", "--config", str(path))
    assert r.returncode == 2 and "warning" not in r.stderr
