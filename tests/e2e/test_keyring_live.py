"""The keyring (`state: memory`) is read off the services' event loop, through the real
Envoy: while a read of `keys.json` blocks (a stalled mount; here a named pipe the test
holds) a keyring key is still answered, an unknown key is refused by the services (a
503 they answer, not Envoy's decision timeout), and the keys read once the pipe is
written are in force."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
import yaml

from authz.runtime.procs import wait_until
from policy.keyrecord import KeyRecord
from policy.keys import fingerprint, new_secret
from tests.e2e.conftest import Gateway, run_gateway
from tests.e2e.test_keys import tb, works

pytestmark = pytest.mark.e2e
BODY = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # A miss waits for the keyring at most key_store.timeout_s, within Envoy's decision
    # timeout (2 s), so the 503 seen is the services' own. Past 250 ms too: Envoy once
    # gave each try of a Check only its retry back-off's longest interval.
    with run_gateway(tmp_path_factory.mktemp("gw-keyring"),
                     key_store={"timeout_s": 0.6}) as gw:
        yield gw


def post(gw: Gateway, key: str) -> httpx.Response:
    return httpx.post(f"{gw.base_url}/v1/chat/completions", json=BODY,
                      headers={"authorization": f"Bearer {key}"}, timeout=30)


def test_requests_are_answered_while_a_keyring_read_blocks(gw: Gateway) -> None:
    created = json.loads(tb(gw, "keys", "create", "--org", "kr", "--json"))
    wait_until(lambda: works(gw, created["key"]), "the created key usable")
    path = gw.data_dir / "keys.json"
    keys: list[Any] = json.loads(path.read_text())["keys"]
    secret = new_secret()
    keys.append(KeyRecord(id="k-piped", org="kr", sha256=fingerprint(secret),
                          created_at=datetime.now(UTC)).model_dump(mode="json"))
    fifo = path.with_name("keys.fifo")
    os.mkfifo(fifo)
    fifo.rename(path)  # the services' next look opens it and waits for a writer

    opened = threading.Event()
    pipe: list[Any] = []

    def writer() -> None:  # opening the write end waits for the services' read
        pipe.append(open(path, "wb"))  # noqa: SIM115 - closed below
        opened.set()

    threading.Thread(target=writer, daemon=True).start()
    try:
        assert opened.wait(30), "the services never read the pipe"
        # The services now wait in the read until the pipe is written and closed.
        r = post(gw, created["key"])
        assert r.status_code == 200, r.text
        # An unknown key cannot be settled until the read ends: the services refuse it
        # (fail closed, retryable) rather than leave Envoy's decision hanging.
        r = post(gw, "sk-tb-" + "x" * 43)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["message"] == \
            "The API key store is unavailable; retry shortly.", r.text
        assert post(gw, created["key"]).status_code == 200
    finally:
        pipe[0].write(orjson.dumps({"keys": keys}))
        pipe[0].close()
    wait_until(lambda: works(gw, secret), "the key read from the pipe")
    assert works(gw, created["key"])
    assert post(gw, "sk-tb-" + "y" * 43).status_code == 401


def test_a_stored_key_whose_id_a_config_key_takes_is_refused(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A config key added with a stored key's id shared its ledger (the stored key's
    spend showed as the config key's) and left the stored key unrevocable by that id
    (the CLI and admin API leave config keys to the file). The stored key is refused,
    saying why, until one is renamed; the config key works. (A gateway of its own: the
    test above leaves keys.json a pipe.)"""
    with run_gateway(tmp_path_factory.mktemp("gw-key-ids")) as gw:
        _config_key_takes_a_stored_id(gw)


def _config_key_takes_a_stored_id(gw: Gateway) -> None:
    created = json.loads(tb(gw, "keys", "create", "--org", "kr", "--json"))
    wait_until(lambda: works(gw, created["key"]), "the created key usable")
    original = gw.config_path.read_text()
    data = yaml.safe_load(original)
    secret = new_secret()
    data["keys"].append({"id": created["id"], "org": "other", "sha256": fingerprint(secret)})
    gw.config_path.write_text(yaml.safe_dump(data))
    try:
        wait_until(lambda: works(gw, secret), "the config key in force")
        r = post(gw, created["key"])
        assert r.status_code == 401, r.text
        assert "config file" in r.json()["error"]["message"]
    finally:
        gw.config_path.write_text(original)
    wait_until(lambda: works(gw, created["key"]), "the stored key usable again")
