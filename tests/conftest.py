"""Fixtures shared by every tier: the hermetic gRPC harness and a private redis-server."""

from tests.grpc_harness import own_redis, running

__all__ = ["own_redis", "running"]
