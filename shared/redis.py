"""The one place Redis connections are made."""

from __future__ import annotations

import socket
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError, TimeoutError

R = TypeVar("R", bound=Redis)

# A peer gone without a word (host down, network cut) is noticed in 10 + 3 × 5 s.
KEEPALIVE: Final = {
    getattr(socket, name): value
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)
}


class _HiredisPacking:
    """Commands packed by hiredis, in C, as redis-py's synchronous client already does: its
    asyncio connections pack in Python, 15 µs for one append's EVALSHA against 4 µs."""

    _packer: Final = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        return self._packer.pack(*args)  # type: ignore[no-any-return]


class _TCP(_HiredisPacking, Connection):
    pass


class _TLS(_HiredisPacking, SSLConnection):
    pass


class _Unix(_HiredisPacking, UnixDomainSocketConnection):
    pass


def _connection_class(url: str) -> type[AbstractConnection]:
    return {"rediss": _TLS, "unix": _Unix}.get(urlsplit(url).scheme, _TCP)


async def pack_with_hiredis(client: Redis) -> None:
    """Gives a client made elsewhere (arq's) the packing of the clients made here. The pool's
    connections so far, made before this, are closed and forgotten; new ones replace them."""
    pool = client.connection_pool
    made = pool.connection_class
    for plain, packing in ((SSLConnection, _TLS), (UnixDomainSocketConnection, _Unix), (Connection, _TCP)):
        if made is plain:
            pool.connection_class = packing
            await pool.disconnect()
            pool.reset()  # type: ignore[no-untyped-call]
            return


def connect(url: str, *, max_connections: int, client_class: type[R] = Redis) -> R:  # type: ignore[assignment]
    """A client on a bounded pool: however many requests wait, at most ``max_connections`` sockets.

    A dropped connection is retried with backoff before the error reaches the caller.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        connection_class=_connection_class(url),
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


def connect_feed(url: str) -> Redis:
    """A client for one long-lived Pub/Sub connection that waits for messages without a timeout.

    A read timeout costs an ``asyncio`` timer per message (most of redis-py's 18 µs per message,
    docs/benchmarks.md), and a quiet feed is no fault. A peer that vanished is found by TCP
    keepalive instead.
    """
    tcp: dict[str, Any] = {}
    if urlsplit(url).scheme != "unix":
        tcp = {"socket_keepalive": True, "socket_keepalive_options": KEEPALIVE}
    pool = BlockingConnectionPool.from_url(
        url,
        connection_class=_connection_class(url),
        max_connections=1,
        timeout=10,
        socket_connect_timeout=2,
        socket_timeout=None,
        **tcp,
    )
    return Redis(connection_pool=pool)
