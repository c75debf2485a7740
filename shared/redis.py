"""The one place Redis connections are made."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError


def connect(url: str, *, max_connections: int | None = None) -> Redis:
    """A pooled client that retries a dropped connection with backoff before giving up."""
    client: Redis = Redis.from_url(
        url,
        max_connections=max_connections,
        socket_connect_timeout=2,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        retry_on_error=[ConnectionError, TimeoutError],
    )
    return client
