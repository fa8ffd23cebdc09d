"""Streams handed over to Envoy's meter (envoy.stream_metering: envoy), over real gRPC
sockets: the response headers' answer hands the stream over, and the access-log report
Envoy sends at its end (here sent as Envoy would) writes the record and settles it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from authz.envoy_config.names import EXT_PROC
from authz.envoy_config.stream_meter import METER_KEY, METER_NS
from authz.services import lifecycle
from policy.stream_pace import ABORT_STEPS
from tests.grpc_harness import Running, serve_policy
from tests.services.test_ext_proc import (
    CHAT,
    HOST_METADATA,
    STREAM,
    Stream,
    admit,
    proc_metadata,
    records,
    resp_body,
)

USAGE_EVENT = STREAM.split(b"\n\n")[3] + b"\n\n"  # prompt 7, completion 2


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    async with serve_policy(tmp_path, envoy={"stream_metering": "envoy",
                                             "max_stream_duration_s": 1}) as r:
        yield r


def resp_headers(status: int = 200) -> Any:
    msg = ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=":status", raw_value=str(status).encode())])))
    msg.attributes[EXT_PROC].update({"response.code": status,
                                     "xds.upstream_host_metadata": HOST_METADATA})
    return msg


async def report(running: Running, rid: str, flags: dict[str, bool] | None = None,
                 client_status: int = 0, **meter: Any) -> None:
    """One access-log entry, as Envoy's gRPC access logger sends it (`client_status`: the
    status Envoy sent the client, when set)."""
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.request.request_id = rid
    if client_status:
        entry.response.response_code.value = client_status
    entry.common_properties.metadata.filter_metadata[METER_NS].update(meter)
    for name, on in (flags or {}).items():
        setattr(entry.common_properties.response_flags, name, on)
    msg = als_pb2.StreamAccessLogsMessage(
        http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=[entry]))

    async def one() -> AsyncIterator[Any]:
        yield msg

    await als_pb2_grpc.AccessLogServiceStub(running.channel).StreamAccessLogs(one())


async def hand_over(running: Running, rid: str, body: dict[str, Any]) -> None:
    s = Stream(running)
    r = await admit(s, {**CHAT, "stream": True, "max_tokens": 50, **body}, rid=rid)
    assert proc_metadata(r)[METER_KEY] == ("keep" if "stream_options" in body else "strip")
    h = await s.send(resp_headers())
    assert h.mode_override.response_body_mode == h.mode_override.NONE
    assert list(h.response_headers.response.header_mutation.remove_headers) == [
        "content-length"]


async def test_the_report_gives_the_exact_usage(running: Running) -> None:
    await hand_over(running, "r-1", {})
    await asyncio.sleep(0.1)
    assert await records(running, 0) == []  # the record waits for the report
    await report(running, "r-1", events=2, usage=USAGE_EVENT.decode(), done=1, ended=1)
    [rec] = await records(running, 1)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"],
            rec["status"]) == (7, 2, False, 200)


@pytest.mark.parametrize(("flags", "status"), [({}, 499),
                                               ({"stream_idle_timeout": True}, 504)])
async def test_a_cut_stream_is_estimated_from_the_meters_counts(
        running: Running, flags: dict[str, bool], status: int) -> None:
    await hand_over(running, "r-2", {"stream_options": {"include_usage": True}})
    await report(running, "r-2", flags, events=3)
    [rec] = await records(running, 1)
    # The events counted, and the steps vLLM takes before its abort lands.
    assert (rec["completion_tokens"], rec["estimated"], rec["status"]) == (
        3 + ABORT_STEPS, True, status)


@pytest.mark.parametrize(("client_status", "flags", "status"), [
    (502, {"upstream_protocol_error": True}, 502), (200, {}, 499),
    (504, {"upstream_request_timeout": True}, 504)])
async def test_a_cut_stream_envoy_answered_itself_records_what_the_client_got(
        running: Running, client_status: int, flags: dict[str, bool], status: int) -> None:
    """Client-libraries tester: a backend that reset its stream before Envoy had passed
    its 200 on left the client a 502 of Envoy's own, and the record said 499 (the
    client went away). The record says the status the client got."""
    rid = f"r-own-{client_status}"
    await hand_over(running, rid, {})
    await report(running, rid, flags, client_status=client_status, events=4)
    [rec] = await records(running, 1)
    assert (rec["completion_tokens"], rec["estimated"], rec["status"]) == (
        4 + ABORT_STEPS, True, status)


async def cut_early(running: Running, rid: str) -> None:
    """A metered stream admitted, its ext_proc stream then reset by Envoy before the
    response headers came to the services."""
    s = Stream(running)
    await admit(s, {**CHAT, "stream": True, "max_tokens": 50}, rid=rid)
    s.call.cancel()


@pytest.mark.parametrize(("client_status", "meter", "want"), [
    (502, {"events": 3}, (502, 3 + ABORT_STEPS, True)),
    (0, {"events": 2}, (499, 2 + ABORT_STEPS, True)),
    (200, {"events": 2, "usage": USAGE_EVENT.decode(), "done": 1, "ended": 1},
     (200, 2, False)),
])
async def test_a_stream_cut_before_its_headers_came_here_takes_envoys_report(
        running: Running, client_status: int, meter: dict[str, Any],
        want: tuple[int, int, bool]) -> None:
    """Final retest: several metered streams cut at once as Envoy passed the backend's
    200 on, before ext_proc had the response headers: the ext_proc stream ended first,
    the record said 499 (the client left), and Envoy's report (its 502 to the client,
    the events that passed) found nobody waiting. The services now wait briefly for it:
    the record says what the client got, and charges what passed and the abort's steps;
    a stream Envoy served whole out of the services' sight is exact."""
    rid = f"r-early-{client_status}"
    await cut_early(running, rid)
    await asyncio.sleep(0.2)
    assert await records(running, 0) == []  # waiting for Envoy's report
    await report(running, rid, client_status=client_status, **meter)
    [rec] = await records(running, 1)
    assert (rec["status"], rec["completion_tokens"], rec["estimated"]) == want
    if meter.get("ended"):  # served on to its end: it lasted past ext_proc's (review)
        assert rec["duration_ms"] >= 150, rec


async def test_a_stream_cut_before_its_headers_with_no_report_ends_as_before(
        running: Running) -> None:
    """No report comes (the client left before the backend answered: Envoy's meter
    never began): after the short wait, recorded as a stream that began no answer."""
    await cut_early(running, "r-early-none")
    [rec] = await records(running, 1)
    assert (rec["status"], rec["completion_tokens"], rec["estimated"]) == (
        499, ABORT_STEPS, True)
    await report(running, "r-early-none", client_status=502, events=3)  # too late
    await asyncio.sleep(0.1)
    assert len(await records(running, 1)) == 1


@pytest.mark.parametrize(("body", "events", "lag"), [
    ({"n": 3}, 15, 3 * ABORT_STEPS),
    ({"n": 3}, 0, 3 * ABORT_STEPS),  # no event counted: role chunks are not, so each
    ({"n": 1}, 10, ABORT_STEPS),
])
async def test_a_cut_stream_of_several_choices_owes_each_its_abort_steps(
        running: Running, body: dict[str, Any], events: int, lag: int) -> None:
    """Clients tester: Envoy's meter counts events, not the choices they open, and a cut
    `n: 3` stream was charged 3 abort steps in all where ext_proc's meter charges 3 for
    each choice running. Each may be: each is charged."""
    rid = f"r-n-{body['n']}-{events}"
    await hand_over(running, rid, body)
    await report(running, rid, events=events)
    [rec] = await records(running, 1)
    assert (rec["completion_tokens"], rec["estimated"]) == (events + lag, True)


ERROR_EVENT = (b'data: {"error": {"message": "Internal server error", "type": '
               b'"InternalServerError", "param": null, "code": 503}}\n\n')


@pytest.mark.parametrize("ended", [1, 0])
async def test_a_reported_error_event_gives_the_records_status(
        running: Running, ended: int) -> None:
    """The meter's `error` key (the stream's first error event, raw): the record says its
    status, also when the stream was then cut (the client left), estimated."""
    rid = f"r-err-{ended}"
    await hand_over(running, rid, {})
    await report(running, rid, events=3, error=ERROR_EVENT.decode(), done=ended,
                 ended=ended)
    [rec] = await records(running, 1)
    assert (rec["completion_tokens"], rec["estimated"], rec["status"]) == (3, True, 503)


async def test_no_report_charges_the_hold_whole(running: Running,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """No report before the hold's lease would end (Envoy lost it): the record charges
    what the backend could have generated, never the nothing a lost report leaves."""
    lease = 1 + 30.0  # max_stream_duration_s + the lease's slack
    monkeypatch.setattr(lifecycle, "REPORT_MARGIN_S", lease - 0.3)
    await hand_over(running, "r-3", {})
    [rec] = await records(running, 1)
    assert (rec["completion_tokens"], rec["estimated"]) == (50, True)
    await report(running, "r-3", events=1)  # too late: nobody waits, nothing changes
    await asyncio.sleep(0.1)
    assert len(await records(running, 1)) == 1


async def test_an_error_answer_is_not_handed_over(running: Running) -> None:
    s = Stream(running)
    await admit(s, {**CHAT, "stream": True}, rid="r-4")
    h = await s.send(resp_headers(400))
    assert not h.HasField("mode_override")
    await s.send(resp_body(json.dumps({"message": "bad", "object": "error"}).encode(),
                           status=None))
    [rec] = await records(running, 1)
    assert rec["status"] == 400 and rec["completion_tokens"] == 0


async def test_a_hurried_stop_records_a_handed_over_stream_no_store_holds(
        tmp_path: Path, own_redis: Any) -> None:
    """A stream handed over to Envoy's meter while Redis was away (its key has no limits:
    admitted unheld, nothing in Redis): a hurried stop cancels the wait for its report,
    and no sweep will ever record it, so the stopping process does, its whole hold."""
    from authz.state.usage.records import USAGE_STREAM
    from authz.state.usage.redis_sink import read_stream

    async with serve_policy(tmp_path, state=own_redis.url,
                            envoy={"stream_metering": "envoy"}) as running:
        own_redis.stop()
        await hand_over(running, "away-r", {})
        running.services.hurry()
        await running.services.stop()
        assert running.services._ext_proc is not None
        assert running.services._ext_proc.left_to_sweep == 0
    own_redis.start()
    async with serve_policy(tmp_path, state=own_redis.url):  # delivers the spooled records
        deadline = asyncio.get_running_loop().time() + 10
        while not (recs := await read_stream(own_redis.url, USAGE_STREAM)):
            assert asyncio.get_running_loop().time() < deadline, "no record delivered"
            await asyncio.sleep(0.1)
    assert [(r["request_id"], r["completion_tokens"], r["estimated"]) for r in recs] == [
        ("away-r", 50, True)]


async def test_a_stop_records_the_streams_whose_report_did_not_come(tmp_path: Path) -> None:
    """`up` stops Envoy first, and Envoy drops the reports of the streams it cuts: the
    services waited for them, exited with no record, and the next start charged each its
    whole hold as `lost`. Now the stop records them (their completion bound, the prompt
    as the backend counts it, else its bound) and settles them: the next start finds
    nothing left."""
    async with serve_policy(tmp_path, envoy={"stream_metering": "envoy"}) as running:
        await hand_over(running, "r-stop", {})
        await running.services.stop()
        [rec] = await records(running, 1)
        assert (rec["request_id"], rec["status"], rec["completion_tokens"],
                rec["estimated"]) == ("r-stop", 200, 50, True)
    async with serve_policy(tmp_path, envoy={"stream_metering": "envoy"}) as running:
        await asyncio.sleep(0.3)
        assert [r["request_id"] for r in await records(running, 2)] == ["r-stop"]


async def test_envoys_meter_is_told_each_chunks_steps_and_an_echo(running: Running) -> None:
    """The Lua meter counts a chunk's merged steps past what one chunk of its
    stream_interval holds, and reads a first chunk unless it echoes the prompt."""
    from authz.envoy_config.stream_meter import METER_ECHO_KEY, METER_STEPS_KEY

    for rid, body, echo in (
            ("e-1", {}, False),
            ("e-2", {"messages": [{"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "Once"}],
                     "echo": True}, True)):
        s = Stream(running)
        r = await admit(s, {**CHAT, "stream": True, "max_tokens": 50, **body}, rid=rid)
        md = r.dynamic_metadata.fields[EXT_PROC].struct_value.fields
        assert md[METER_STEPS_KEY].number_value == 1
        assert (METER_ECHO_KEY in md) is echo
