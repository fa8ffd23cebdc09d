"""Envoy's gRPC access log as the services' end-of-stream report for streams metered in
Envoy (`envoy.stream_metering: envoy`, see authz/envoy_config/stream_meter.py).

The bootstrap logs only metered streams, each once, when it ends (normally, cut by the
client, or by Envoy's timeouts). `MeterReports` hands each entry to the lifecycle that
waits for it, by request id, in this process: Envoy's one services endpoint is this
replica (policy/config.py refuses the mode with several)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from authz.envoy_config.stream_meter import METER_NS
from authz.state.repeats import REPEATS
from policy.meter_report import MeterReport

log = logging.getLogger("tokenbooth.meter")
_DONE = als_pb2.StreamAccessLogsResponse()


class MeterReports:
    """Lifecycles waiting for their stream's report, by request id."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[MeterReport | None]] = {}
        self.unclaimed = 0  # reports nobody waited for (a restart, a duplicated id)
        self.closed = False

    def expect(self, request_id: str) -> bool:
        """Wait for this request's report; False if one is already awaited for that id
        (a client reusing x-request-id): that request keeps the services' own meter."""
        if not request_id or request_id in self._waiting or self.closed:
            return False
        self._waiting[request_id] = asyncio.get_running_loop().create_future()
        return True

    async def wait(self, request_id: str, timeout_s: float) -> MeterReport | None:
        """The report, or None if none came in time (the hold is then charged whole)."""
        fut = self._waiting.get(request_id)
        if fut is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError:
            return None
        finally:
            self._waiting.pop(request_id, None)

    def close(self) -> None:
        """No report can come any more (the gRPC server stopped, and with it Envoy's
        access-log stream): every wait ends now with None, so each stream still waiting
        is recorded at once (charged what it could have generated), not left unrecorded
        for the next start to charge in full as `lost`."""
        self.closed = True
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_result(None)

    def forget(self, request_id: str) -> None:
        """No report will come (the response was not handed over)."""
        fut = self._waiting.pop(request_id, None)
        if fut is not None:
            fut.cancel()

    def deliver(self, request_id: str, report: MeterReport) -> None:
        fut = self._waiting.get(request_id)
        if fut is None or fut.done():
            self.unclaimed += 1
            log.warning("a stream report nobody waits for",
                        extra={"request_id": request_id, **REPEATS})
            return
        fut.set_result(report)


def report_from_entry(entry: Any) -> MeterReport | None:
    """The meter's report in one HTTP access-log entry (None: not a metered stream)."""
    md = entry.common_properties.metadata.filter_metadata.get(METER_NS)
    if md is None:
        return None
    f = md.fields

    def num(key: str) -> int:
        return int(f[key].number_value) if key in f else 0

    common = entry.common_properties
    flags = common.response_flags
    ttft = last = None
    if common.HasField("start_time"):
        start_us = common.start_time.seconds * 1_000_000 + common.start_time.nanos // 1000
        if "first_us" in f:
            ttft = max(0.0, (f["first_us"].number_value - start_us) / 1e6)
        if "last_us" in f:
            last = max(0.0, (f["last_us"].number_value - start_us) / 1e6)
    end = common.duration.ToTimedelta().total_seconds() if common.HasField("duration") \
        else None
    return MeterReport(
        events=num("events"),
        merged_tokens=num("merged"),
        oversize_events=num("oversize_events"),
        oversize_bytes=num("oversize_bytes"),
        usage_event=f["usage"].string_value.encode() if "usage" in f else b"",
        error_event=f["error"].string_value.encode() if "error" in f else b"",
        error_first=num("error_first") == 1,
        done=num("done") == 1,
        ended=num("ended") == 1,
        unreadable=num("unreadable") == 1,
        cut_by_gateway=bool(flags.stream_idle_timeout or flags.duration_timeout
                            or flags.upstream_request_timeout),
        client_status=(entry.response.response_code.value
                       if entry.HasField("response")
                       and entry.response.HasField("response_code") else 0),
        ttft_s=ttft,
        last_s=last,
        end_s=end,
    )


class AccessLogReceiver(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self, reports: MeterReports) -> None:
        self._reports = reports

    async def StreamAccessLogs(self, request_iterator: AsyncIterator[Any],
                               context: grpc.aio.ServicerContext) -> Any:
        async for msg in request_iterator:
            for entry in msg.http_logs.log_entry:
                report = report_from_entry(entry)
                if report is not None:
                    self._reports.deliver(entry.request.request_id, report)
        return _DONE


add_to_server = als_pb2_grpc.add_AccessLogServiceServicer_to_server
