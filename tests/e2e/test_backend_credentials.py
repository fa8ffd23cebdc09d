"""Backends that want an API key (vLLM's --api-key), through the real Envoy (issue 14 item 4).

The simulator is started with `--api-key`: without `Authorization: Bearer <key>` it
answers 401, as vLLM does. One alias reads the key from an environment variable, one
from a file, one names a variable that is not set. Envoy reads the key itself (an SDS
secret served over ADS names only where it is); it never appears in a log, a record,
the metrics, a file the gateway wrote, or Envoy's config dump.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from authz.runtime.procs import http_ok, spawn, stop, wait_until
from authz.state.usage.records import USAGE_FILE
from policy.config import load_config
from tests.e2e.conftest import Gateway, run_gateway
from tests.e2e.test_gateway import MESSAGES, records_for
from tests.helpers import SECRET, free_port

pytestmark = pytest.mark.e2e

BACKEND_KEY = "vllm-backend-key-e2e-5b1d0c9e7a"
KEY_VAR = "TB_E2E_VLLM_KEY"
UNSET_VAR = "TB_E2E_VLLM_KEY_NOT_SET"


@contextlib.contextmanager
def sim_process(log: Path, *extra: str) -> Iterator[str]:
    """`tokenbooth sim` serving both upstream models, on a free port; its URL."""
    port = free_port()
    with log.open("wb") as out:
        proc = spawn([sys.executable, "-m", "authz.cli", "sim", "--listen",
                      f"127.0.0.1:{port}", "--model", "tiny-llama", "--model", "tiny-llama-2",
                      *extra], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{url}/health"), "sim", alive=[proc])
        yield url
    finally:
        stop([proc])


def model(upstream: str, backends: list[dict[str, Any]]) -> dict[str, Any]:
    return {"upstream_model": upstream, "backends": backends, "max_tokens": 64}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Path]]:
    root = tmp_path_factory.mktemp("gw-backend-keys")
    key_file = root / "vllm.key"
    key_file.write_text(BACKEND_KEY + "\n")  # as `echo` writes it
    key_file.chmod(0o600)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_VAR, BACKEND_KEY)  # Envoy, a child, reads it
        mp.delenv(UNSET_VAR, raising=False)
        with sim_process(root / "sim.log", "--api-key", BACKEND_KEY) as url:
            models = {
                "demo": model("tiny-llama", [{"url": url, "api_key_env": KEY_VAR}]),
                "other": model("tiny-llama-2", [{"url": url, "api_key_file": str(key_file)}]),
                "unkeyed": model("tiny-llama", [{"url": url}]),
                "broken": model("tiny-llama", [{"url": url, "api_key_env": UNSET_VAR}]),
            }
            gw_root = root / "gw"
            gw_root.mkdir()
            with run_gateway(gw_root, upstream=url, models=models) as gw:
                yield gw, root


def test_the_simulator_refuses_requests_without_the_key(keyed: tuple[Gateway, Path]) -> None:
    gw, _ = keyed
    req = urllib.request.Request(f"{gw.sim_url}/v1/models")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert (e.value.code, json.loads(e.value.read())) == (401, {"error": "Unauthorized"})


@pytest.mark.parametrize("alias", ["demo", "other"])
def test_envoy_sends_the_backend_key(keyed: tuple[Gateway, Path], alias: str) -> None:
    """From the environment (`demo`) and from a file (`other`, trailing newline and
    all): chat and a stream work, and the backend saw its key, never the client's."""
    gw, _ = keyed
    gw.clear_upstream()
    client = gw.client()
    raw = client.chat.completions.with_raw_response.create(
        model=alias, messages=MESSAGES, max_tokens=3)
    assert raw.parse().choices[0].message.content
    chunks = list(client.chat.completions.create(model=alias, messages=MESSAGES, max_tokens=3,
                                                 stream=True))
    assert chunks
    sent = [r for r in gw.upstream_requests() if r["path"] == "/v1/chat/completions"]
    assert len(sent) == 2
    for r in sent:
        assert r["headers"]["authorization"] == f"Bearer {BACKEND_KEY}"
        assert SECRET not in json.dumps(r)
    [rec] = records_for(gw, raw.headers["x-request-id"])
    assert (rec["status"], rec["completion_tokens"]) == (200, 3)


def test_without_a_key_the_backend_refuses_and_the_client_sees_why(
        keyed: tuple[Gateway, Path]) -> None:
    """The backend's 401 is kept, OpenAI-shaped, with its message, said to be the
    gateway's credential, not the client's key."""
    gw, _ = keyed
    with pytest.raises(openai.AuthenticationError) as e:
        gw.client().chat.completions.create(model="unkeyed", messages=MESSAGES, max_tokens=3)
    assert e.value.status_code == 401
    assert isinstance(e.value.body, dict)
    assert e.value.body["message"].startswith(
        "The backend refused the gateway's credentials (HTTP 401: Unauthorized); your API "
        "key was accepted")


def test_a_key_envoy_cannot_load_is_a_503_not_worth_retrying(
        keyed: tuple[Gateway, Path]) -> None:
    gw, _ = keyed
    with pytest.raises(openai.InternalServerError) as e:
        gw.client().chat.completions.create(model="broken", messages=MESSAGES, max_tokens=3)
    assert e.value.status_code == 503
    assert isinstance(e.value.body, dict) and e.value.body["code"] == "service_unavailable"
    assert e.value.response.headers["x-should-retry"] == "false"


def test_the_key_is_written_nowhere(keyed: tuple[Gateway, Path]) -> None:
    """Every file of the run but the user's key file (config, Envoy's bootstrap, logs of
    Envoy, the services and the backend, records, state), the metrics, and Envoy's
    config dump (what it received over ADS)."""
    gw, root = keyed
    gw.client().chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2)
    assert (gw.data_dir / USAGE_FILE).read_text()
    admin = load_config(gw.config_path).envoy.admin_listen
    places: dict[str, str] = {}
    for url in (f"{gw.side_url}/metrics", f"http://{admin}/config_dump?include_eds"):
        with urllib.request.urlopen(url, timeout=5) as r:
            places[url] = r.read().decode()
    assert "dynamic_active_secrets" in places[f"http://{admin}/config_dump?include_eds"]
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path != root / "vllm.key":
                places[str(path)] = path.read_text(errors="replace")
    assert len(places) > 5
    for where, text in places.items():
        assert BACKEND_KEY not in text, f"the backend key leaked into {where}"


def test_a_key_envoy_cannot_load_keeps_no_other_model_from_a_reload(tmp_path: Path) -> None:
    """A reload adds two keyed models, one whose key file is missing: Envoy rejects that
    secret alone (each secret travels in an xDS response of its own), and the other model
    serves at once. A model added by a later reload serves too."""
    key_file = tmp_path / "vllm.key"
    key_file.write_text(BACKEND_KEY + "\n")
    with sim_process(tmp_path / "sim.log", "--api-key", BACKEND_KEY) as url:
        gw_root = tmp_path / "gw"
        gw_root.mkdir()
        models = {"demo": model("tiny-llama", [{"url": url, "api_key_file": str(key_file)}])}
        with run_gateway(gw_root, upstream=url, models=models) as gw:
            client = gw.client().with_options(max_retries=0)

            def serves(alias: str) -> bool:
                try:
                    client.chat.completions.create(model=alias, messages=MESSAGES,
                                                   max_tokens=2)
                except openai.APIStatusError:
                    return False
                return True

            assert serves("demo")
            for n, added in enumerate([("fresh", "missing"), ("later",)]):
                data = yaml.safe_load(gw.config_path.read_text())
                for alias in added:
                    source = tmp_path / ("nowhere.key" if alias == "missing" else f"{alias}.key")
                    if alias != "missing":
                        source.write_text(BACKEND_KEY)
                    data["models"][alias] = model("tiny-llama-2",
                                                  [{"url": url, "api_key_file": str(source)}])
                gw.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
                wait_until(lambda a=added[0]: serves(a), f"reload {n}: {added[0]} served",
                           timeout=15)
            with pytest.raises(openai.InternalServerError) as e:
                client.chat.completions.create(model="missing", messages=MESSAGES, max_tokens=2)
            assert e.value.status_code == 503
            assert serves("demo")
