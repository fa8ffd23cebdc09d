"""Fixtures shared by every tier: the hermetic gRPC harness and a private redis-server."""

from tests.grpc_harness import own_redis, running, two_limit_stores
from tests.postgres_harness import pg_db, postgres  # noqa: F401 (fixtures)

__all__ = ["own_redis", "running", "two_limit_stores"]
