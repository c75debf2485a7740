"""The one place Redis connections are made."""

from __future__ import annotations

from typing import TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

R = TypeVar("R", bound=Redis)


def connect(url: str, *, max_connections: int, client_class: type[R] = Redis) -> R:  # type: ignore[assignment]
    """A client on a bounded pool: however many requests wait, at most ``max_connections`` sockets.

    A dropped connection is retried with backoff before the error reaches the caller.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=10,
        socket_connect_timeout=2,
        # a frozen Redis must turn into a 503 in seconds, not a request that hangs
        socket_timeout=5,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        retry_on_error=[ConnectionError, TimeoutError],
    )
    return client_class(connection_pool=pool)
