"""`up` and `serve` options: the four ports from flags or the environment, the simulator
for models without a backend (`RunOverrides`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from authz.cli.common import run_overrides
from authz.cli.main import parser
from authz.runtime.defaults import RunOverrides
from authz.runtime.settings import Settings
from policy.config import ConfigError, load_config
from tests.cli.test_cli import tb
from tests.helpers import write_policy

PORT_VARS = {"TOKENBOOTH_LISTEN": "127.0.0.1:18080", "TOKENBOOTH_GRPC_LISTEN": "127.0.0.1:18081",
             "TOKENBOOTH_HTTP_LISTEN": "127.0.0.1:18082",
             "TOKENBOOTH_ADMIN_LISTEN": "127.0.0.1:18083"}


def test_the_four_ports_come_from_the_environment_and_a_flag_wins() -> None:
    settings = Settings.from_env(PORT_VARS)
    assert (settings.listen, settings.grpc_listen, settings.http_listen,
            settings.admin_listen) == tuple(PORT_VARS.values())
    for command in ("up", "serve"):
        args = parser().parse_args([command, "--grpc-listen", "127.0.0.1:19001"])
        o = run_overrides(args, settings)
        assert (o.listen, o.grpc_listen, o.http_listen, o.admin_listen) == (
            "127.0.0.1:18080", "127.0.0.1:19001", "127.0.0.1:18082", "127.0.0.1:18083")
    assert run_overrides(parser().parse_args(["up"]), Settings()) == RunOverrides()


def test_overrides_replace_the_ports_and_fill_only_models_without_a_backend(
    tmp_path: Path,
) -> None:
    path = write_policy(tmp_path, "http://10.0.0.5:8000")
    data = yaml.safe_load(path.read_text())
    data["models"]["other"]["backends"] = []
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path)
    eff = RunOverrides(listen="127.0.0.1:18080", grpc_listen="127.0.0.1:18081",
                       http_listen="127.0.0.1:18082", admin_listen="127.0.0.1:18083",
                       default_upstream="http://127.0.0.1:20000").apply(cfg)
    assert (eff.listen, eff.services.grpc_listen, eff.services.http_listen,
            eff.envoy.admin_listen) == tuple(PORT_VARS.values())
    assert [b.url for b in eff.models["demo"].backends] == ["http://10.0.0.5:8000"]
    assert [b.url for b in eff.models["other"].backends] == ["http://127.0.0.1:20000"]
    # --upstream still sends every model to one URL.
    eff = RunOverrides(upstream="http://10.0.0.9:8000").apply(cfg)
    assert {b.url for m in eff.models.values() for b in m.backends} == {"http://10.0.0.9:8000"}


def test_overridden_ports_that_clash_or_are_malformed_are_refused(tmp_path: Path) -> None:
    cfg = load_config(write_policy(tmp_path, "http://10.0.0.5:8000"))
    with pytest.raises(ConfigError, match=r"^envoy.admin_listen: 0.0.0.0:8080 clashes with "
                                          r"listen \(127.0.0.1:8080\)"):
        RunOverrides(admin_listen="0.0.0.0:8080").apply(cfg)
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        RunOverrides(http_listen="nope").apply(cfg)


def test_a_bad_port_is_one_line_naming_its_flag_or_variable(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    r = tb("serve", "--config", str(path), "--grpc-listen", "nope")
    assert r.returncode == 2
    assert r.stderr == ("tokenbooth serve: error: argument --grpc-listen: expected HOST:PORT, "
                        "got 'nope' (see tokenbooth serve --help)\n")
    r = subprocess.run([sys.executable, "-m", "authz.cli", "up", "--config", str(path)],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "TOKENBOOTH_ADMIN_LISTEN": "nope"})
    assert r.returncode == 2
    assert r.stderr == ("tokenbooth: error: $TOKENBOOTH_ADMIN_LISTEN: expected HOST:PORT, "
                        "got 'nope'\n")
