"""`tokenbooth up`: starts everything, prints a working key and curl line, stops it all."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from authz.runtime.defaults import DEFAULT_CONFIG, read_demo_key, write_default_config
from policy.config import load_config
from policy.keys import fingerprint
from tests.helpers import free_port

pytestmark = pytest.mark.e2e


def test_default_config_is_valid_and_holds_only_the_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / DEFAULT_CONFIG
    secret = write_default_config(path)
    cfg = load_config(path)
    assert [k.sha256 for k in cfg.keys] == [fingerprint(secret)]
    assert secret not in path.read_text()
    assert read_demo_key(path) == secret
    assert (path.parent / "demo.key").stat().st_mode & 0o777 == 0o600


def port_open(hostport: str) -> bool:
    host, port = hostport.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) == 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="the printed line needs curl")
def test_up_runs_everything_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    # A first-run config in the default place, moved onto free ports.
    path = tmp_path / DEFAULT_CONFIG
    write_default_config(path)
    data = yaml.safe_load(path.read_text())
    listen = f"127.0.0.1:{free_port()}"
    data["listen"] = listen
    data["services"] = {"grpc_listen": f"127.0.0.1:{free_port()}",
                        "http_listen": f"127.0.0.1:{free_port()}"}
    data["envoy"] = {"admin_listen": f"127.0.0.1:{free_port()}"}
    path.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != "TOKENBOOTH_CONFIG"}
    up = subprocess.Popen([sys.executable, "-m", "authz.cli", "up"], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert up.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        out = "".join(lines)
        assert "Ctrl-C stops everything" in out, out
        curl = next(ln.strip() for ln in lines if ln.strip().startswith("curl "))
        # Wait for the simulator backend's first health check, then run the printed line.
        for _ in range(100):
            done = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=30)
            body = json.loads(done.stdout or "{}")
            if "choices" in body:
                break
            time.sleep(0.2)
        assert body["choices"][0]["message"]["content"], body
        assert body["usage"]["total_tokens"] > 0
        assert re.search(r"demo API key: sk-tb-\S+", out)
    finally:
        up.send_signal(signal.SIGINT)
        rc = up.wait(30)
        assert up.stdout is not None
        rest = up.stdout.read()
        up.stdout.close()
    assert rc == 0, rest
    for hostport in (listen, data["services"]["grpc_listen"], data["services"]["http_listen"],
                     data["envoy"]["admin_listen"]):
        assert not port_open(hostport), f"{hostport} still open after Ctrl-C"
