"""Configuration F: ext_authz and ext_proc servicers that do no work.

The floor of Python gRPC plumbing with tokenbooth's message pattern: Envoy runs the exact
bootstrap `tokenbooth envoy render` produces, and these servicers answer every message at
once with the empty response of its kind. Only what keeps the message pattern identical to
tokenbooth's is set, as constant messages built once:

- Check → OK;
- request_headers → as is (tokenbooth's inference path sends none);
- request_body → name the backend cluster and clear the route cache, both ways tokenbooth
  has done it: in the cluster header, and in ext_proc's dynamic metadata (from which the
  bootstrap may copy it into that header); without it Envoy has nowhere to send the request.
  With `--envoy-meters` (the rendered bootstrap meters streams in Envoy, tokenbooth's
  default with one replica), a stream's answer also asks Envoy's Lua meter to read it,
  keeping or stripping the usage chunk as the client asked;
- response_headers → for such a stream, hand it over to the meter (no response body comes
  here, as tokenbooth does); otherwise as is;
- response_body and trailers → empty;
- Envoy's gRPC access log (the meter's one report per stream) → counted, nothing else.

The servicers answer whatever Envoy sends, so when tokenbooth's bootstrap asks for other
phases (or none), F follows. A `mode_override` is ignored by an Envoy whose bootstrap does
not allow it. The same grpc.aio server options and uvloop as `authz/runtime/server.py`, the
official xds-protos stubs. It counts messages by kind and serves the counts as JSON on a
side port (`/counts`).

Run: `python -m bench.noop --grpc 127.0.0.1:P --side 127.0.0.1:Q --cluster NAME`.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from authz.envoy_config.stream_meter import METER_KEY
from policy import routing

EXT_PROC = "envoy.filters.http.ext_proc"  # the filter's name: its metadata namespace
# The metadata key tokenbooth names the cluster under, where it routes that way.
CLUSTER_KEY: str = getattr(routing, "CLUSTER_KEY", "cluster")

_MODE = processing_mode_pb2.ProcessingMode
_SSE_TYPE = b"text/event-stream"
_STREAM = re.compile(rb'"stream"\s*:\s*true')
_INCLUDE_USAGE = re.compile(rb'"include_usage"\s*:\s*true')


def replies(cluster: str) -> dict[str, Any]:
    """The constant answer to each kind of ProcessingRequest."""
    route = ep.CommonResponse(
        header_mutation=ep.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=routing.CLUSTER_HEADER, raw_value=cluster.encode()),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)]),
        clear_route_cache=True,
    )

    def routed(**meter: str) -> Any:
        metadata = struct_pb2.Struct()
        metadata.update({EXT_PROC: {CLUSTER_KEY: cluster, **meter}})
        return ep.ProcessingResponse(request_body=ep.BodyResponse(response=route),
                                     dynamic_metadata=metadata)

    return {
        "request_headers": ep.ProcessingResponse(request_headers=ep.HeadersResponse()),
        "request_body": routed(),
        # A stream Envoy's meter reads, keeping or stripping the usage chunk.
        "request_body:keep": routed(**{METER_KEY: "keep"}),
        "request_body:strip": routed(**{METER_KEY: "strip"}),
        "response_headers": ep.ProcessingResponse(response_headers=ep.HeadersResponse()),
        # tokenbooth's hand-over (authz/services/exchange.py): no response body comes here.
        "response_headers:hand_over": ep.ProcessingResponse(
            response_headers=ep.HeadersResponse(response=ep.CommonResponse(
                header_mutation=ep.HeaderMutation(remove_headers=["content-length"]))),
            mode_override=_MODE(request_header_mode=_MODE.SKIP,
                                response_header_mode=_MODE.SKIP,
                                response_body_mode=_MODE.NONE,
                                response_trailer_mode=_MODE.SKIP)),
        "response_body": ep.ProcessingResponse(response_body=ep.BodyResponse()),
        "request_trailers": ep.ProcessingResponse(request_trailers=ep.TrailersResponse()),
        "response_trailers": ep.ProcessingResponse(response_trailers=ep.TrailersResponse()),
    }


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, counts: Counter[str]) -> None:
        self._counts = counts
        self._ok = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._counts["check"] += 1
        return self._ok


class NoopProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Answers each message at once. Two variants for the levers the paced bench measures
    (see bench/levers.py): a stream that opens with a response body is an observability-mode
    filter's (Envoy ignores answers: none is sent); with `duplex`, response bodies come
    FULL_DUPLEX_STREAMED and go back as streamed_response, the chunks read while the last
    answer was being written coalesced into one."""

    def __init__(self, counts: Counter[str], cluster: str, duplex: bool = False,
                 envoy_meters: bool = False) -> None:
        self._counts = counts
        self._replies = replies(cluster)
        self._duplex = duplex
        self._envoy_meters = envoy_meters

    async def Process(self, request_iterator: AsyncIterator[Any],
                      context: grpc.aio.ServicerContext) -> None:
        counts, answers = self._counts, self._replies
        counts["streams"] += 1
        read, write, eof = context.read, context.write, grpc.aio.EOF
        first, metered = True, False
        while (msg := await read()) is not eof:
            kind = msg.WhichOneof("request")
            counts[kind] += 1
            if kind == "response_body" and first:
                counts["observed_streams"] += 1
                while (msg := await read()) is not eof:
                    counts["response_body"] += 1
                return
            first = False
            if kind == "response_body" and self._duplex:
                await _duplex(msg.response_body, read, write, counts)
                return
            if kind == "request_body" and self._envoy_meters and _STREAM.search(
                    body := msg.request_body.body):
                metered = True
                await write(answers["request_body:keep" if _INCLUDE_USAGE.search(body)
                                    else "request_body:strip"])
            elif kind == "response_headers":
                sse = metered and any(
                    h.key == "content-type" and h.raw_value.startswith(_SSE_TYPE)
                    for h in msg.response_headers.headers.headers)
                if sse:  # handed over: nothing more comes, the stream ends, as tokenbooth's
                    await write(answers["response_headers:hand_over"])
                    return
                await write(answers["response_headers"])
            else:
                await write(answers[kind])


async def _duplex(first: Any, read: Any, write: Any, counts: Counter[str]) -> None:
    """FULL_DUPLEX_STREAMED: every byte goes back (Envoy forwards only what it is sent),
    chunks that queued up while an answer was being written go back as one."""
    pending = [first.body]
    ended = first.end_of_stream
    wake = asyncio.Event()
    wake.set()

    async def reader() -> None:
        nonlocal ended
        while not ended and (msg := await read()) is not grpc.aio.EOF:
            counts["response_body"] += 1
            pending.append(msg.response_body.body)
            ended = ended or msg.response_body.end_of_stream
            wake.set()
        wake.set()

    task = asyncio.ensure_future(reader())
    try:
        while True:
            await wake.wait()
            wake.clear()
            if not pending and task.done():
                break  # Envoy closed the stream without an end of stream
            done = ended
            body = b"".join(pending)
            pending.clear()
            counts["duplex_answers"] += 1
            await write(ep.ProcessingResponse(response_body=ep.BodyResponse(
                response=ep.CommonResponse(body_mutation=ep.BodyMutation(
                    streamed_response=ep.StreamedBodyResponse(body=body,
                                                              end_of_stream=done))))))
            if done:
                break
    finally:
        task.cancel()


class NoopAccessLog(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Envoy's meter reports (one access-log entry per metered stream): counted."""

    def __init__(self, counts: Counter[str]) -> None:
        self._counts = counts

    async def StreamAccessLogs(self, request_iterator: AsyncIterator[Any],
                               context: grpc.aio.ServicerContext) -> Any:
        async for msg in request_iterator:
            self._counts["access_log_msgs"] += 1
            self._counts["meter_reports"] += len(msg.http_logs.log_entry)
        return als_pb2.StreamAccessLogsResponse()


async def serve(grpc_listen: str, side_listen: str, cluster: str, duplex: bool = False,
                envoy_meters: bool = False) -> None:
    counts: Counter[str] = Counter()
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", (1 << 20) + (64 << 10)),
        ("grpc.max_send_message_length", (1 << 20) + (64 << 10)),
        ("grpc.http2.min_ping_interval_without_data_ms", 1000),
        ("grpc.http2.max_ping_strikes", 0),
    ])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthorization(counts), server)
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
        NoopProcessor(counts, cluster, duplex, envoy_meters), server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(NoopAccessLog(counts), server)
    if server.add_insecure_port(grpc_listen) == 0:
        raise OSError(f"cannot listen on {grpc_listen}")
    await server.start()

    async def get_counts(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(dict(counts)), content_type="application/json")

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/counts", get_counts)
    app.router.add_get("/readyz", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = side_listen.rpartition(":")
    await web.TCPSite(runner, host, int(port)).start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)
    await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grpc", required=True, help="HOST:PORT of the gRPC services")
    ap.add_argument("--side", required=True, help="HOST:PORT of /counts and /readyz")
    ap.add_argument("--cluster", required=True, help="the Envoy cluster of the backend")
    ap.add_argument("--duplex", action="store_true",
                    help="response bodies come FULL_DUPLEX_STREAMED: answer as streamed_response")
    ap.add_argument("--envoy-meters", action="store_true",
                    help="the bootstrap meters streams in Envoy: hand streams over to it")
    args = ap.parse_args()
    import uvloop

    uvloop.run(serve(args.grpc, args.side, args.cluster, args.duplex, args.envoy_meters))


if __name__ == "__main__":
    main()
