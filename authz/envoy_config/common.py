"""Small builders shared by the bootstrap modules (typed envoy_data_plane messages)."""

from __future__ import annotations

import ipaddress
from datetime import timedelta

from betterproto2 import Message
from envoy_data_plane.envoy.config.core.v3 import Address, SocketAddress
from envoy_data_plane.google.protobuf import Any as AnyProto

from policy.config import ConfigError, parse_hostport

# The cluster that reaches tokenbooth's own gRPC services (ext_authz + ext_proc).
SERVICES_CLUSTER = "tokenbooth_services"
# Circuit-breaker ceiling: Envoy's defaults (1024) would cap concurrency, since each
# in-flight request holds one ext_proc stream and one upstream request.
CIRCUIT_BREAKER_MAX = 100_000
# How long a client may take to send its request's headers, then its whole request (the
# HCM's timeouts; past them, a 408).
REQUEST_HEADERS_TIMEOUT_S = 10
REQUEST_TIMEOUT_S = 300


def pack(message: Message) -> AnyProto:
    """`google.protobuf.Any` around a typed message (rendered with its "@type")."""
    return AnyProto.pack(message)


def ms(value: float) -> timedelta:
    return timedelta(milliseconds=value)


def seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def address(host: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=host, port_value=port))


def listen_address(hostport: str, what: str) -> Address:
    """An address Envoy binds: it must be an IP literal."""
    host, port = parse_hostport(hostport)
    if host == "localhost":
        host = "127.0.0.1"
    if not is_ip(host):
        raise ConfigError(f"{what}: Envoy listens on an IP address, got {hostport!r}")
    return address(host, port)


def connect_host(host: str) -> str:
    """A wildcard listen address is reached through loopback."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host
