"""The Envoy protobuf the servicers speak (xds-protos, upb), and small builders.

Imports live here so the rest of authz/ names messages, not module paths.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from policy.errors import ApiError

# The generated modules carry no type information: messages are typed as `Msg`.
Msg: TypeAlias = Any

HeaderValue = base_pb2.HeaderValue
Struct = struct_pb2.Struct
HeaderValueOption = base_pb2.HeaderValueOption
CheckRequest = external_auth_pb2.CheckRequest
CheckResponse = external_auth_pb2.CheckResponse
ProcessingRequest = ep.ProcessingRequest
ProcessingResponse = ep.ProcessingResponse
ProcessingMode = processing_mode_pb2.ProcessingMode
AuthorizationServicer = external_auth_pb2_grpc.AuthorizationServicer
ExternalProcessorServicer = external_processor_pb2_grpc.ExternalProcessorServicer
add_AuthorizationServicer_to_server = external_auth_pb2_grpc.add_AuthorizationServicer_to_server
add_ExternalProcessorServicer_to_server = (
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server
)
OK_STATUS = status_pb2.Status(code=code_pb2.OK)
JSON_CT = "application/json"


def authz_denial(err: ApiError) -> Msg:
    """ext_authz: refuse with an OpenAI-shaped body (ext_authz headers use `value`)."""
    headers = [HeaderValueOption(header=HeaderValue(key="content-type", value=JSON_CT))]
    headers += [HeaderValueOption(header=HeaderValue(key=k, value=v)) for k, v in err.headers]
    code = code_pb2.UNAUTHENTICATED if err.status == 401 else code_pb2.PERMISSION_DENIED
    return CheckResponse(
        status=status_pb2.Status(code=code),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=err.status),
            headers=headers,
            body=err.body().decode(),
        ),
    )


def immediate(status: int, body: bytes, extra: tuple[tuple[str, str], ...] = ()) -> Msg:
    """ext_proc: answer the client directly (ext_proc headers use `raw_value`)."""
    headers = [set_header("content-type", JSON_CT)]
    headers += [set_header(k, v) for k, v in extra]
    return ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=ep.HeaderMutation(set_headers=headers),
            body=body,
        )
    )


def immediate_error(err: ApiError) -> Msg:
    return immediate(err.status, err.body(), err.headers)


def set_header(key: str, value: str) -> Msg:
    return HeaderValueOption(
        header=HeaderValue(key=key, raw_value=value.encode()),
        append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def header_map(headers: Msg) -> dict[str, str]:
    """Envoy sends header values in `raw_value`; fall back to `value`."""
    out: dict[str, str] = {}
    for h in headers.headers.headers:
        out[h.key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


__all__ = [
    "JSON_CT", "OK_STATUS", "AuthorizationServicer", "CheckRequest", "CheckResponse",
    "ExternalProcessorServicer", "HeaderValue", "HeaderValueOption", "Msg", "ProcessingMode",
    "ProcessingRequest", "ProcessingResponse", "Struct", "add_AuthorizationServicer_to_server",
    "add_ExternalProcessorServicer_to_server", "authz_denial", "ep", "external_auth_pb2",
    "header_map", "immediate", "immediate_error", "set_header",
]
