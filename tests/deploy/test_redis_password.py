"""How the manifests hand the Redis password over: a Secret becomes
TOKENBOOTH_REDIS_PASSWORD, the config holds only redis://host:port/db. Against a real
redis-server that requires a password (as base/redis.yaml runs it)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz.cli.main import main as tokenbooth
from policy.config import REDIS_PASSWORD_ENV
from tests.helpers import free_port, write_policy

PASSWORD = "0f3c-not-a-url-safe:@/password"


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[str]:
    exe = shutil.which("redis-server")
    assert exe is not None, "redis-server is not installed (apt-get install redis-server)"
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--requirepass", PASSWORD],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def test_keys_reach_a_redis_that_needs_the_secrets_password(
        redis_with_password: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = str(write_policy(tmp_path, "http://127.0.0.1:8000", state=redis_with_password,
                              keys=[]))
    create = ["keys", "create", "--config", config, "--org", "acme", "--json"]

    monkeypatch.delenv(REDIS_PASSWORD_ENV, raising=False)
    assert tokenbooth(create) != 0  # the file alone does not get in
    assert "AuthenticationError" in capsys.readouterr().err

    monkeypatch.setenv(REDIS_PASSWORD_ENV, PASSWORD)
    assert tokenbooth(create) == 0
    created = json.loads(capsys.readouterr().out)
    assert tokenbooth(["keys", "list", "--config", config, "--json"]) == 0
    listed = capsys.readouterr().out
    assert created["id"] in listed
    assert PASSWORD not in listed and created["key"] not in listed
