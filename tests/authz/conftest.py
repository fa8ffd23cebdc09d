"""Hermetic tier: the real grpc.aio server on a free port, driven with real Envoy protobuf."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from authz.overrides import Overrides
from authz.server import Services
from authz.snapshot import Runtime
from tests.helpers import write_policy


@dataclass
class Running:
    services: Services
    channel: grpc.aio.Channel
    config_path: Path
    data_dir: Path


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    path = write_policy(
        tmp_path, "http://127.0.0.1:8000",
        services={"grpc_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0"},
    )
    services = Services(Runtime.from_file(path, Overrides()), grace_s=1.0)
    await services.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{services.grpc_port}")
    try:
        yield Running(services, channel, path, tmp_path / "data")
    finally:
        await channel.close()
        await services.stop()
