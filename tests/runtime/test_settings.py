"""authz/runtime/settings.py: the environment, read once into one frozen object."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from authz.runtime.defaults import RunOverrides
from authz.runtime.settings import Settings
from authz.runtime.snapshot import Runtime, restart_only_changes
from tests.helpers import write_policy


def test_an_empty_environment_gives_the_defaults() -> None:
    assert Settings.from_env({}) == Settings() == Settings(
        config=None, debug=False, redis_password=None, otlp_endpoint=None,
        service_name="tokenbooth")


def test_every_variable() -> None:
    s = Settings.from_env({
        "TOKENBOOTH_CONFIG": "/etc/tb.yaml",
        "TOKENBOOTH_DEBUG": "1",
        "TOKENBOOTH_REDIS_PASSWORD": "s3cret",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4317",
        "OTEL_SERVICE_NAME": "gateway-eu",
        "PATH": "/usr/bin",  # anything else is ignored
    })
    assert s == Settings(config=Path("/etc/tb.yaml"), debug=True, redis_password="s3cret",
                         otlp_endpoint="http://otel:4317", service_name="gateway-eu")


def test_empty_values_count_as_unset() -> None:
    env = {k: "" for k in ("TOKENBOOTH_CONFIG", "TOKENBOOTH_DEBUG", "TOKENBOOTH_REDIS_PASSWORD",
                           "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME")}
    assert Settings.from_env(env) == Settings()


def test_backends_keys_are_read_by_name_and_kept_out_of_repr() -> None:
    s = Settings.from_env({"VLLM_KEY": "sk-backend", "PATH": "/usr/bin"})
    assert s.backend_keys["VLLM_KEY"] == "sk-backend"  # api_key_env names any variable
    assert "sk-backend" not in repr(s)


def test_frozen_and_the_password_is_not_in_repr() -> None:
    s = Settings(redis_password="s3cret")
    assert "s3cret" not in repr(s)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.debug = True  # type: ignore[misc]


def test_the_password_reaches_the_config_and_survives_a_reload(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "http://127.0.0.1:8000", state="redis://redis:6379/0")
    settings = Settings(redis_password="p@ss")
    assert settings.load_config(path).state == "redis://:p%40ss@redis:6379/0"
    assert Settings().load_config(path).state == "redis://redis:6379/0"
    rt = Runtime.from_file(path, settings=settings)
    assert rt.snapshot.config.state == "redis://:p%40ss@redis:6379/0"
    path.write_text(path.read_text().replace("redis:6379/0", "redis:6379/1"))
    rt._stamp = ()  # as if the file had moved on
    assert rt.reload_if_changed()
    # `state` is read at start: the running one stays, password and all, until a restart.
    assert rt.snapshot.config.state == "redis://:p%40ss@redis:6379/0"


def test_a_change_that_keeps_the_mtime_is_still_seen(tmp_path: Path) -> None:
    """A file rewritten within one mtime tick, or replaced by one carrying the old mtime
    (`touch -r`, a copy that keeps times), changes its size, inode or ctime."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    rt = Runtime.from_file(path)
    assert not rt.reload_if_changed()
    before = path.stat()
    path.write_text(path.read_text().replace("max_tokens", "max_tokens", 1) + "\n# edited\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    assert rt.reload_if_changed()
    assert not rt.reload_if_changed()


def test_a_reload_names_the_models_it_leaves_without_a_backend(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Ops tester: a model added with `backends: []` answered 503 and the reload said only
    "config reloaded". Without a default upstream the warning names it; with one (`up`'s
    simulator) it is served and nothing is said."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    data = yaml.safe_load(path.read_text())
    data["models"]["later"] = {"upstream_model": "later-7b", "backends": []}
    for overrides, warned in ((None, True),
                              (RunOverrides(default_upstream="http://127.0.0.1:9"), False)):
        rt = Runtime.from_file(path, overrides=overrides)
        path.write_text(yaml.safe_dump(data))
        caplog.clear()
        with caplog.at_level("WARNING", logger="tokenbooth"):
            assert rt.reload_if_changed()
        assert ("no backend and this process no --default-upstream: they answer 503 "
                "until one is given: later" in caplog.text) is warned
        # Under `up` the simulator serves it: said too, as a typo'd `backends: []` would
        # otherwise answer (and bill) simulated text silently.
        assert ("no backend of their own and go to the default upstream (`up`'s "
                "simulator): later" in caplog.text) is not warned
        path.write_text(yaml.safe_dump({**data, "models": {
            k: v for k, v in data["models"].items() if k != "later"}}))


def test_a_reload_names_the_changes_only_a_restart_applies(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    rt = Runtime.from_file(path)
    old = rt.snapshot.config
    text = path.read_text()
    path.write_text(text.replace(old.listen, "127.0.0.1:1") + "\n# moved\n")
    with caplog.at_level("WARNING", logger="tokenbooth"):
        assert rt.reload_if_changed()
    assert "take effect only when the process (or Envoy) restarts: listen" in caplog.text
    assert rt.snapshot.config.listen == old.listen  # what Envoy listens on until a restart
    new = rt.settings.load_config(path)
    assert restart_only_changes(old, new) == ["listen"]
    assert restart_only_changes(old, old) == []
    # The records' sink is made at start: a reload of `usage.*` is named, not ignored
    # silently (outside test: a new local_max_bytes never rotated the file).
    sink = old.model_copy(update={"usage": old.usage.model_copy(
        update={"local_max_bytes": 65536})})
    assert restart_only_changes(old, sink) == ["usage"]


def test_a_reload_keeps_the_restart_only_settings_the_process_runs_with(
        tmp_path: Path) -> None:
    """Envoy keeps its bootstrap until a restart, so the services keep its settings too:
    with the file's shorter timeouts a hold's lease ended while Envoy still let the
    stream run (the sweep charged it as lost mid-stream and freed its concurrency slot),
    and `on_metering_loss: cut` charged only what was seen of a stream Envoy still served
    on. The live settings (models, prices, keys) change at once."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000", state="redis://redis:6379/0",
                        envoy={"route_timeout_s": 120, "max_stream_duration_s": 600})
    rt = Runtime.from_file(path)
    old = rt.snapshot.config
    data = yaml.safe_load(path.read_text())
    data["envoy"] = {"route_timeout_s": 1, "max_stream_duration_s": 1,
                     "on_metering_loss": "cut", "decision_timeout_ms": 100}
    data.update(state="redis://other:6379/0", data_dir="elsewhere",
                max_request_body_bytes=4096, key_store={"timeout_s": 9})
    data["models"]["demo"]["price_per_1k_tokens"] = {"input": "9", "output": "9"}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert rt.reload_if_changed()
    cfg = rt.snapshot.config
    assert cfg.envoy == old.envoy
    assert cfg.envoy.hold_lease_s(True) == old.envoy.hold_lease_s(True) == 630
    assert (cfg.state, cfg.data_dir, cfg.max_request_body_bytes, cfg.key_store) == (
        old.state, old.data_dir, old.max_request_body_bytes, old.key_store)
    assert cfg.models["demo"].price_per_1k_tokens.input == 9  # live: changed
    # Longer limits in the file count at once: Envoy may be restarted with them first.
    data["envoy"] = {"route_timeout_s": 300, "max_stream_duration_s": 1800}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert rt.reload_if_changed()
    cfg = rt.snapshot.config
    assert (cfg.envoy.hold_lease_s(False), cfg.envoy.hold_lease_s(True)) == (330, 1830)
    assert cfg.envoy.on_metering_loss == "serve"  # the running one


@pytest.mark.parametrize("bad", [
    "x: " + "[" * 5000 + "]" * 5000 + "\n",  # past the YAML reader's recursion
    "x: " + "9" * 5000 + "\n",  # past Python's integer digits limit
])
def test_a_file_no_reader_can_take_is_refused_and_reloads_go_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: str) -> None:
    """Such a file ended the reload task (a RecursionError or ValueError, not a
    ConfigError): every later edit, a removed admin token too, was ignored."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    good = path.read_text()
    rt = Runtime.from_file(path)
    path.write_text(good + bad)
    with caplog.at_level("ERROR", logger="tokenbooth"):
        assert not rt.reload_if_changed()
    assert "config reload refused" in caplog.text
    path.write_text(good.replace("max_tokens", "max_tokens", 1) + "\n# fixed\n")
    assert rt.reload_if_changed()


def test_a_file_written_moments_ago_waits_to_settle(tmp_path: Path) -> None:
    """A config rewritten in place may be read half-written (its first half parses, with
    fewer keys): one modified less than `settle_s` ago waits; a file moved into place
    whole keeps its older time and loads at once; one dated ahead of the clock (another
    host's) cannot be waited out and loads."""
    from datetime import UTC, datetime

    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    now = [datetime.now(UTC)]
    rt = Runtime.from_file(path)
    rt.clock = lambda: now[0]
    edited = path.read_text() + "\n# edited\n"
    path.write_text(edited)
    mtime = path.stat().st_mtime
    now[0] = datetime.fromtimestamp(mtime + 0.1, UTC)
    assert not rt.reload_if_changed(settle_s=0.25)
    assert rt.unsettled
    now[0] = datetime.fromtimestamp(mtime + 0.3, UTC)
    assert rt.reload_if_changed(settle_s=0.25)
    assert not rt.unsettled
    # Moved into place with an old time: at once.
    new = tmp_path / "new.yaml"
    new.write_text(edited + "# again\n")
    os.utime(new, (mtime - 60, mtime - 60))
    new.replace(path)
    assert rt.reload_if_changed(settle_s=0.25)
    # Dated 10 s ahead of the clock.
    path.write_text(edited + "# ahead\n")
    os.utime(path, (mtime + 10.3, mtime + 10.3))
    assert rt.reload_if_changed(settle_s=0.25)


def test_a_file_rewritten_while_it_was_read_is_read_again(tmp_path: Path) -> None:
    """An editor that starts rewriting the file in place just after the services looked
    at it (stat) and before they read it: what was read may be its first half (valid
    YAML with fewer keys: 401s). It is not swapped in; the file is read again once it
    stands still."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    good = path.read_text()
    rt = Runtime.from_file(path)
    path.write_text(good + "\n# edited\n")
    stamp = rt.changed()
    assert stamp is not None
    with path.open("r+") as f:  # the rewrite has begun: truncated, first half written
        f.truncate(0)
        f.write(good[: good.index("keys:")])
    half = rt.read_config()
    assert not isinstance(half, Exception) and not half[0].keys  # it parses, keyless
    path.write_text(good + "\n# edited, whole\n")  # the rewrite ends
    assert not rt.finish_reload(stamp, half)
    assert rt.unsettled
    assert rt.snapshot.config.keys  # the half file never was in force
    assert rt.reload_if_changed()
    assert rt.snapshot.config.keys


def test_a_file_rewritten_over_and_over_loads_within_the_settle_cap(tmp_path: Path) -> None:
    """A tool rewriting the file every 0.2 s (each write restarting the settle wait) held
    every change back, a revocation included, until the writes stopped (t1 tester: 8 s
    of a revoked key admitted). After MAX_SETTLE_S of changes it is read all the same."""
    from datetime import UTC, datetime

    from authz.runtime.snapshot import MAX_SETTLE_S

    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    base = path.read_text()
    rt = Runtime.from_file(path)
    now, mono = [datetime.now(UTC)], [100.0]
    rt.clock, rt.monotonic = (lambda: now[0]), (lambda: mono[0])
    loaded_at = None
    for i in range(40):  # a write every 0.2 s, each looked at 0.1 s after it
        path.write_text(base + f"\n# write {i}\n")
        now[0] = datetime.fromtimestamp(path.stat().st_mtime + 0.1, UTC)
        if rt.reload_if_changed(settle_s=0.25):
            loaded_at = i * 0.2
            break
        assert rt.unsettled
        mono[0] += 0.2
    assert loaded_at is not None and loaded_at <= MAX_SETTLE_S + 0.2
    assert rt.snapshot.config is not None
    # Once loaded, the next change waits its settle time again.
    path.write_text(base + "\n# after\n")
    now[0] = datetime.fromtimestamp(path.stat().st_mtime + 0.1, UTC)
    assert not rt.reload_if_changed(settle_s=0.25)


def test_the_admin_token_is_read_as_the_cli_reads_it() -> None:
    """A Secret made `--from-file` ends in a line break: the services hashed it with the
    line break, the CLI without, and no client could ever match (admin review)."""
    assert Settings.from_env({"TOKENBOOTH_ADMIN_TOKEN": "env-tok-1\n"}).admin_token == "env-tok-1"
    assert Settings.from_env({"TOKENBOOTH_ADMIN_TOKEN": " \r\n"}).admin_token is None
