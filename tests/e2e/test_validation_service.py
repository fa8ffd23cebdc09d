"""Keys checked by an external validation service (the seeds' user-org-service protocol),
through the real Envoy: valid, restricted, revoked at the service, and the service down."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any

import openai
import pytest

from tests.e2e.conftest import Gateway, run_gateway
from tests.state.validation_server import ValidationServer

pytestmark = pytest.mark.e2e
MESSAGES = [{"role": "user", "content": "hi"}]
KEY = "sk-tb-from-the-org-service-0123456789abcdefghij"
RESTRICTED = "sk-tb-restricted-org-service-0123456789abcdefg"


class Background:
    """An event loop in a thread, for the async test server next to sync SDK calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[ValidationServer, Background]]:
    bg = Background()
    server = ValidationServer()
    bg.run(server.start())
    try:
        yield server, bg
    finally:
        bg.run(server.stop())
        bg.close()


@pytest.fixture(scope="module")
def gw(service: tuple[ValidationServer, Background],
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    server, _ = service
    with run_gateway(tmp_path_factory.mktemp("gw-validation"),
                     key_store={"validation_url": server.base_url, "grace_s": 30}) as gateway:
        yield gateway


def chat(gw: Gateway, key: str, model: str = "demo") -> Any:
    return gw.client(key).chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)


def test_valid_restricted_and_revoked_keys(
    service: tuple[ValidationServer, Background], gw: Gateway
) -> None:
    server, _ = service
    server.valid(KEY, apiKeyId="svc-key-1", organizationId="org-42")
    server.valid(RESTRICTED, apiKeyId="svc-key-2", organizationId="org-42",
                 modelAccessMode="restricted", grantedModels=["other"])
    chat(gw, KEY)
    up = gw.upstream_requests()[-1]["headers"]
    assert (up["x-tokenbooth-org"], up["x-tokenbooth-key-id"]) == ("org-42", "svc-key-1")
    with pytest.raises(openai.PermissionDeniedError):
        chat(gw, RESTRICTED, "demo")
    chat(gw, RESTRICTED, "other")
    # Cached: more checks make no more calls to the service.
    calls = server.calls[KEY]
    for _ in range(5):
        chat(gw, KEY)
    assert server.calls[KEY] <= calls + 1
    # Revoked at the service: refused within 2 s.
    server.revoked(KEY)
    t0 = time.monotonic()
    while True:
        try:
            chat(gw, KEY)
        except openai.AuthenticationError as e:
            assert "revoked" in str(e)
            break
        assert time.monotonic() - t0 < 2.0, "revocation at the service not seen in 2 s"
        time.sleep(0.05)


def test_service_down_fails_closed_for_unknown_keys(
    service: tuple[ValidationServer, Background], gw: Gateway
) -> None:
    server, bg = service
    known = "sk-tb-known-before-outage-0123456789abcdefghij"
    server.valid(known, apiKeyId="svc-key-3", organizationId="org-42")
    chat(gw, known)
    bg.run(server.stop())
    try:
        chat(gw, known)  # within the grace period
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError) as e:
            chat(gw, "sk-tb-unknown-during-outage-0123456789abcdef")
        assert e.value.status_code == 503 and e.value.code == "service_unavailable"
        assert time.monotonic() - t0 < 2.0
    finally:
        bg.run(server.start())
