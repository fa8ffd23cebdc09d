"""A request whose stream Envoy gave up on while `serve` stood still (its message timeout),
driven through the real servicer: what the one record says depends on when the gap was.

Overload tester: JSON requests forwarded before a 5 s freeze, their answers served whole
by Envoy meanwhile (on_metering_loss: serve), were recorded as 499s with no backend, and
`audit --vllm` counted them as drift. (One alone reads its answer on waking, exact: under
load the stream is found cancelled first, as here.)
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from authz.services.ext_proc import ExternalProcessorService
from authz.state.usage.records import USAGE_FILE, read_records
from tests.grpc_harness import serve_policy
from tests.services.test_ext_proc import BACKEND, CHAT, req_body


class CancelledAfter:
    """grpc.aio's context as the servicer uses it: the messages, then the RPC cancelled
    (Envoy reset the stream while the process stood still)."""

    def __init__(self, *msgs: Any) -> None:
        self._msgs = list(msgs)
        self.answers: list[Any] = []

    async def read(self) -> Any:
        if self._msgs:
            return self._msgs.pop(0)
        raise asyncio.CancelledError

    async def write(self, msg: Any) -> None:
        self.answers.append(msg)


@pytest.mark.parametrize("gap", ["after_forwarding", "before_forwarding", "none"])
async def test_a_request_forwarded_before_a_freeze_was_served_out_of_sight(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gap: str) -> None:
    async with serve_policy(tmp_path) as running:
        proc = running.services._ext_proc  # the running servicer
        assert isinstance(proc, ExternalProcessorService)
        def just_woke(t0: float, min_s: float, within_s: float = 1.0) -> bool:
            # A gap of min_s or more that began after t0: only "after_forwarding" has one
            # after the request went on (before: Envoy gave up on the request itself).
            return {"after_forwarding": True, "before_forwarding": False, "none": False}[gap]

        monkeypatch.setattr(proc.stalls, "just_woke", just_woke)
        ctx = CancelledAfter(req_body(json.dumps({**CHAT, "max_tokens": 30}).encode()))
        with pytest.raises(asyncio.CancelledError):
            await proc.Process(None, ctx)  # type: ignore[arg-type]
        assert len(ctx.answers) == 1  # the request body's answer went out
        await asyncio.sleep(0.2)  # its record (a recount may ask the backend first)
        for _ in range(100):
            recs = list(read_records(running.data_dir / USAGE_FILE))
            if recs:
                break
            await asyncio.sleep(0.05)
        [rec] = recs
        if gap == "after_forwarding":  # served whole by Envoy: the bound, status unknown
            assert (rec["status"], rec["completion_tokens"], rec["estimated"],
                    rec["backend"]) == ("lost", 30, True, BACKEND)
        else:  # the client (or Envoy's 503) went away: a 499 of its estimate
            assert rec["status"] == 499 and rec["backend"] == ""
