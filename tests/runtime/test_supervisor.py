"""`up`'s watch of its usage exporter (authz/runtime/supervisor.py, `_Exporter`): the
exporter's exit never stops the gateway, it is started again later. With real processes:
tests/e2e/test_usage_sink.py."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from authz.runtime import supervisor
from authz.runtime.settings import Settings
from authz.runtime.supervisor import _Exporter
from policy.config import parse_config
from tests.helpers import policy_dict, write_policy


class _Child:
    """A child whose poll() answers from a script (its last answer repeated)."""

    def __init__(self, *polls: int | None, pid: int = 4242) -> None:
        self.polls, self.pid, self.returncode = list(polls), pid, None

    def poll(self) -> int | None:
        value = self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]
        self.returncode = value  # type: ignore[assignment]
        return value


def _exporter(procs: list[Any], monkeypatch: pytest.MonkeyPatch) -> tuple[_Exporter, list[Any]]:
    spawned: list[Any] = []

    def spawn(args: list[str]) -> Any:
        child = _Child(None, pid=5000 + len(spawned))
        spawned.append(child)
        return child

    monkeypatch.setattr(supervisor, "spawn", spawn)
    cfg = parse_config(policy_dict("http://127.0.0.1:8000", state="redis://127.0.0.1:1/0",
                                   usage={"sink": "postgresql://u@127.0.0.1:1/db"}))
    return _Exporter(cfg, supervisor.Path("policy.yaml"), procs), spawned


def test_an_exporter_exiting_between_two_looks_stops_nothing(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The loop watched the exporter, then asked every child whether it had exited: an
    exporter that exited in between stopped the gateway after all (a review)."""
    envoy = _Child(None)
    procs: list[Any] = [envoy]
    exporter, spawned = _exporter(procs, monkeypatch)
    [first] = spawned
    assert procs == [envoy, first]
    first.polls = [None, 1]  # alive at the watch, exited at the next look
    exporter.watch()
    assert not exporter.others_dead()
    monkeypatch.setattr(supervisor, "EXPORTER_RESTART_S", 0.0)
    exporter.watch()  # takes it out, says so, and starts the next one at once
    assert "usage exporter (pid 5000) exited with status 1; requests go on" in \
        capsys.readouterr().err
    assert procs == [envoy, spawned[1]] and not exporter.others_dead()
    envoy.polls = [0]
    assert exporter.others_dead()


def test_no_exporter_without_a_sink(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "spawn", lambda args: pytest.fail("spawned"))
    procs: list[subprocess.Popen[bytes]] = []
    exporter = _Exporter(parse_config(policy_dict("http://127.0.0.1:8000")),
                         supervisor.Path("policy.yaml"), procs)
    exporter.watch()
    assert procs == [] and exporter.proc is None and not exporter.others_dead()


def test_envoy_is_not_given_tokenbooths_own_settings() -> None:
    """Envoy ran with all of `up`'s environment: the admin token, the webhook secret."""
    assert supervisor.envoy_env({"TOKENBOOTH_ADMIN_TOKEN": "t", "tokenbooth_debug": "1",
                                 "VLLM_KEY": "k", "PATH": "/bin"}) == {
        "VLLM_KEY": "k", "PATH": "/bin"}



def test_up_warns_of_a_price_left_out_before_it_starts_anything(
        tmp_path: supervisor.Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A model without a price served its tokens at $0 without a word (tester)."""
    class Stop(Exception):
        pass

    def stop(*args: object) -> None:
        raise Stop

    monkeypatch.setattr(supervisor, "_check_ports_free", stop)
    path = write_policy(tmp_path, "http://127.0.0.1:8000")  # "other" has no price
    with pytest.raises(Stop):
        supervisor.run_up(supervisor.UpOptions(config_path=path), Settings())
    assert capsys.readouterr().err == (
        f"tokenbooth: warning: {path}: models.other.price_per_1k_tokens: not set, so its "
        "input and output tokens cost $0 (write 0 for a free model)\n")


def test_one_long_alias_does_not_widen_every_row_of_the_banner() -> None:
    """A 300-character alias padded every row to ~310 columns (tester)."""
    data = policy_dict("http://127.0.0.1:8000")
    data["models"]["m" * 300] = data["models"]["demo"]
    lines = supervisor._backend_lines(parse_config(data), None)
    assert [line.index(" -> ") for line in lines] == [4 + supervisor.ALIAS_COLUMNS] * 3
    assert lines[0].startswith("    demo" + " " * (supervisor.ALIAS_COLUMNS - 4) + " -> ")
    assert lines[1].startswith("    " + "m" * (supervisor.ALIAS_COLUMNS - 1) + "… -> ")
    # Short aliases keep a column as wide as the widest of them.
    assert supervisor._backend_lines(parse_config(policy_dict("http://h:1")), None)[0] == (
        "    demo  -> http://h:1  (model tiny-llama)")


def test_the_line_for_a_child_that_died_names_it() -> None:
    """New-user tester: `up` said "a child process (pid N) exited with status -9", where
    the README promises a line naming it."""
    py = ["/usr/bin/python3", "-m", "authz.cli"]
    assert supervisor.child_name([*py, "serve", "--config", "x"]) == (
        "the services (tokenbooth serve)")
    assert supervisor.child_name([*py, "sim", "--listen", "x"]) == "the simulator"
    assert supervisor.child_name([*py, "usage", "export"]) == "the usage exporter"
    assert supervisor.child_name(["/opt/bin/envoy", "-c", "x.yaml"]) == "Envoy"
    assert supervisor.how_it_ended(-9) == "was killed by SIGKILL"
    assert supervisor.how_it_ended(-15) == "was killed by SIGTERM"
    assert supervisor.how_it_ended(1) == "exited with status 1"
