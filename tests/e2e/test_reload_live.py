"""Day-2 config edits on a gateway serving traffic, through the real Envoy and `tokenbooth
serve`: every way a file can be broken (invalid YAML, an invalid value, gone, a
Kubernetes ConfigMap's `..data` swap to a bad version) is refused with one log line and
`tokenbooth_config_last_reload_successful 0`, the last good config keeps serving, and the
next good file is in force; a read that blocks does not stop the services answering."""

from __future__ import annotations

import contextlib
import os
import re
import urllib.request
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import yaml

from authz.runtime.procs import wait_until
from authz.state.usage.records import USAGE_FILE, read_records
from tests.e2e.conftest import Gateway, run_gateway
from tests.helpers import SECRET

pytestmark = pytest.mark.e2e
AUTH = {"authorization": f"Bearer {SECRET}"}
BODY = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def module_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("gw-reload-live")) as gw:
        yield gw


@pytest.fixture
def gw(module_gateway: Gateway) -> Iterator[Gateway]:
    """The gateway; its original config file is put back (and in force) afterwards."""
    path = module_gateway.config_path
    original = path.read_text()
    yield module_gateway
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a symlink or a named pipe a test left there
    replace(path, original)
    wait_until(lambda: reload_ok(module_gateway) == 1, "the original config back")
    wait_until(lambda: price_of(module_gateway) == Decimal("0.50"), "the original price")


def replace(path: Path, text: str) -> None:
    """Write the file whole and rename it into place, as the safe way is."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def metric(gw: Gateway, name: str) -> float:
    with urllib.request.urlopen(f"{gw.side_url}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not exported"
    return float(m.group(1))


def reload_ok(gw: Gateway) -> float:
    return metric(gw, "tokenbooth_config_last_reload_successful")


def failures(gw: Gateway) -> float:
    return metric(gw, 'tokenbooth_config_reloads_total{result="failure"}')


def refusals_logged(gw: Gateway) -> int:
    return (gw.logs / "serve.log").read_text().count("config reload refused")


def request(gw: Gateway, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{gw.base_url}/v1/chat/completions", json=BODY, headers=AUTH,
                      timeout=timeout)


def price_of(gw: Gateway) -> Decimal:
    """The input price per 1k tokens the next `demo` request is charged, from its record."""
    r = request(gw)
    assert r.status_code == 200, r.text
    rid = r.headers["x-request-id"]
    rec = next(x for x in read_records(gw.data_dir / USAGE_FILE) if x["request_id"] == rid)
    # 7 prompt tokens, 3 completion tokens at an output price 3 times the input's.
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (7, 3), rec
    return Decimal(rec["cost_usd"]) * 1000 / 16


def with_price(text: str, input_usd: str) -> str:
    data = yaml.safe_load(text)
    data["models"]["demo"]["price_per_1k_tokens"] = {
        "input": input_usd, "output": str(Decimal(input_usd) * 3)}
    return yaml.safe_dump(data, sort_keys=False)


def invalid_yaml(path: Path, good: str) -> None:
    path.write_text(good[: len(good) // 2] + "\n  : [unclosed\n")


def invalid_value(path: Path, good: str) -> None:
    path.write_text(good.replace("max_tokens: 256", "max_tokens: -4"))


def removed(path: Path, good: str) -> None:
    path.unlink()


@pytest.mark.parametrize("breaking", [invalid_yaml, invalid_value, removed])
def test_a_refused_reload_says_so_and_the_next_good_file_loads(
        gw: Gateway, breaking: Callable[[Path, str], None]) -> None:
    good = gw.config_path.read_text()
    before, logged = failures(gw), refusals_logged(gw)
    breaking(gw.config_path, good)
    wait_until(lambda: failures(gw) == before + 1, "the refusal counted")
    assert reload_ok(gw) == 0
    # The last good config keeps serving, at its prices.
    assert price_of(gw) == Decimal("0.50")
    assert refusals_logged(gw) == logged + 1  # one line, not one per poll
    replace(gw.config_path, with_price(good, "5"))
    wait_until(lambda: reload_ok(gw) == 1, "the good file loaded")
    assert price_of(gw) == Decimal("5")
    assert failures(gw) == before + 1


def test_a_configmap_swap_to_a_bad_version_is_refused_and_the_next_is_loaded(
        gw: Gateway) -> None:
    """Kubernetes mounts a ConfigMap as `config.yaml -> ..data/config.yaml`, `..data ->
    ..<timestamp>/`, and updates it by swapping `..data` to a new directory."""
    good, path = gw.config_path.read_text(), gw.config_path
    mount = path.parent / "configmap"
    mount.mkdir()

    def publish(version: str, text: str) -> None:
        (mount / version).mkdir()
        (mount / version / path.name).write_text(text)
        tmp = mount / "..data_tmp"
        tmp.symlink_to(version)
        tmp.rename(mount / "..data")

    publish("..v1", good)
    link = path.with_name(path.name + ".link")
    link.symlink_to(mount / "..data" / path.name)
    link.rename(path)
    before = failures(gw)
    publish("..v2", "models: {demo: {upstream_model: [not, a, name]}}\n")
    wait_until(lambda: failures(gw) == before + 1, "the bad version refused")
    assert price_of(gw) == Decimal("0.50")
    publish("..v3", with_price(good, "2"))
    wait_until(lambda: reload_ok(gw) == 1, "the next version loaded")
    assert price_of(gw) == Decimal("2")


def test_a_named_pipe_at_the_config_path_is_refused_and_the_next_file_loads(
        gw: Gateway) -> None:
    """A named pipe at the config's path was read as a file that blocks: with no writer,
    the reload worker waited in it for good, logging nothing, its metric still saying
    success, and no later edit was ever applied (ops tester). It is refused at once, with
    one error line and the failure metric; requests go on; the next file loads."""
    good, path = gw.config_path.read_text(), gw.config_path
    fifo = path.with_name("config.fifo")
    os.mkfifo(fifo)
    fifo.rename(path)
    wait_until(lambda: reload_ok(gw) == 0, "the pipe refused")
    assert "not a regular file" in (gw.logs / "serve.log").read_text()
    r = request(gw, timeout=20)
    assert r.status_code == 200, r.text
    path.unlink()
    publish_plain(path, with_price(good, "3"))
    wait_until(lambda: price_of(gw) == Decimal("3"), "the next file loaded")
    assert reload_ok(gw) == 1


def publish_plain(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def test_the_reload_metrics_are_exported_at_start(gw: Gateway) -> None:
    text = urllib.request.urlopen(f"{gw.side_url}/metrics", timeout=5).read().decode()
    assert 'tokenbooth_config_reloads_total{result="success"}' in text
    assert 'tokenbooth_config_reloads_total{result="failure"}' in text
    assert reload_ok(gw) == 1
