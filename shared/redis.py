"""The one place Redis connections are made."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import contextvars
import math
import socket
from collections.abc import AsyncIterator
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode, ClusterParser, ClusterPipeline
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.connection import HiredisRespSerializer
from redis.crc import key_slot
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    ClusterError,
    ConnectionError,
    ResponseError,
    SlotNotCoveredError,
    TimeoutError,
)

from streambridge.shared.settings import CLUSTER_SCHEME, parse_cluster_url

R = TypeVar("R", bound=Redis)

# A peer gone without a word (host down, network cut) is noticed in 10 + 3 × 5 s.
KEEPALIVE: Final = {
    getattr(socket, name): value
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)
}


class _Connection:
    """What streambridge's connections change in redis-py's: two things."""

    _packer: Final = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        """Commands packed by hiredis, in C, as redis-py's synchronous client already does: its
        asyncio connections pack in Python, 15 µs for one append's EVALSHA against 4 µs."""
        return self._packer.pack(*args)  # type: ignore[no-any-return]

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        """redis-py's, with its ``asyncio.wait_for`` around the write replaced by ``asyncio.timeout``.
        On Python 3.11 a ``wait_for`` whose write finishes as the task is cancelled drops the
        cancellation, and the task runs on: a worker whose stop waited forever on its reaper
        (tests/integration/test_redis_connections.py)."""
        conn: Any = self
        if not conn.is_connected:
            await conn.connect()
        elif check_health:
            await conn.check_health()
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        try:
            async with asyncio.timeout(conn.socket_timeout):
                conn._writer.writelines(command)
                await conn._writer.drain()
        except builtins.TimeoutError:
            await conn.disconnect(nowait=True)
            raise TimeoutError("Timeout writing to socket") from None
        except OSError as e:
            await conn.disconnect(nowait=True)
            raise ConnectionError(f"Error while writing to socket: {e}") from e
        except BaseException:
            # a write cut off halfway leaves the protocol out of step: the socket is done for
            await conn.disconnect(nowait=True)
            raise


class _TCP(_Connection, Connection):
    pass


class _TLS(_Connection, SSLConnection):
    pass


class _Unix(_Connection, UnixDomainSocketConnection):
    pass


def _connection_class(url: str) -> type[AbstractConnection]:
    return {"rediss": _TLS, "unix": _Unix}.get(urlsplit(url).scheme, _TCP)


def connect(
    url: str,
    *,
    max_connections: int,
    client_class: type[R] = Redis,  # type: ignore[assignment]
    **changes: Any,
) -> R:
    """A client on a bounded pool: however many requests wait, at most ``max_connections`` sockets.

    Every process's commands go through one of these (the API's, the edge's, the worker's): a
    dropped connection is retried with backoff before the error reaches the caller (every
    streambridge script is safe to run twice), a frozen Redis times out, and an idle socket is
    kept alive, so a peer that vanished is noticed. ``changes``: other pool settings than these.
    """
    settings: dict[str, Any] = {
        "connection_class": _connection_class(url),
        "max_connections": max_connections,
        "timeout": 10,
        "socket_connect_timeout": 2,
        # a frozen Redis must turn into a 503 in seconds, not a request that hangs
        "socket_timeout": 5,
        "health_check_interval": 30,
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        "retry_on_error": [ConnectionError, TimeoutError],
        **_keepalive(url),
    }
    pool = BlockingConnectionPool.from_url(url, **(settings | changes))
    return client_class(connection_pool=pool)


def _keepalive(url: str) -> dict[str, Any]:
    if urlsplit(url).scheme == "unix":
        return {}
    return {"socket_keepalive": True, "socket_keepalive_options": KEEPALIVE}


def connect_feed(url: str) -> Redis:
    """A client for one long-lived Pub/Sub connection that waits for messages without a timeout.

    A read timeout costs an ``asyncio`` timer per message (most of redis-py's 18 µs per message,
    docs/benchmarks.md), and a quiet feed is no fault. A peer that vanished is found by TCP
    keepalive instead.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        connection_class=_connection_class(url),
        max_connections=1,
        timeout=10,
        socket_connect_timeout=2,
        socket_timeout=None,
        **_keepalive(url),
    )
    return Redis(connection_pool=pool)


def one_connection_like(client: Redis) -> Redis:
    """A client of one connection of its own, set up as ``client``'s pool's are: for checks
    (``/readyz``, a scrape's queue depths) that must not wait behind a busy pool's commands, so
    that a process under load is not reported unready for it."""
    pool = client.connection_pool
    single = BlockingConnectionPool(
        connection_class=pool.connection_class, max_connections=1, timeout=1, **pool.connection_kwargs
    )
    return Redis(connection_pool=single)


def is_cluster_url(url: str | None) -> bool:
    return url is not None and urlsplit(url).scheme == CLUSTER_SCHEME


#: a failover (~4 s: the node timeout, then the replica's election) or a moved slot, ridden out by
#: retrying a command this many times, ``FAILOVER_BACKOFF`` apart, before its error reaches the caller
FAILOVER_RETRIES: Final = 12
FAILOVER_BACKOFF: Final = ExponentialBackoff(cap=1.0, base=0.05)
#: errors that mean "the cluster is changing": re-read the slot map and try again. A wrong password
#: is a ConnectionError too, and no retry mends it.
_CLUSTER_CHANGING: Final = (ConnectionError, TimeoutError, ClusterError, SlotNotCoveredError)
_FINAL: Final = (AuthenticationError, AuthorizationError)


#: the StreamsCluster whose turn this task holds, if any (set in the task's own context only)
_HOLDS_TURN: Final[contextvars.ContextVar[StreamsCluster | None]] = contextvars.ContextVar("_HOLDS_TURN", default=None)


class StreamsCluster(RedisCluster):
    """redis-py's asyncio cluster client, with two changes.

    Its own retries give up within a second of a primary's death: a command to a dead node
    retries the connection 3 times, then the slot map is read again (and still names the dead
    node until its replica is promoted). Here a command is tried again, with backoff, for
    ~8 s: MOVED, ASK and TRYAGAIN are followed by redis-py itself, inside one try.

    redis-py's nodes refuse a command at once (``MaxConnectionsError``) when their connections
    are all busy; here commands and pipelines wait their turn instead, at most ``max_connections``
    at a time (a pipeline takes at most one connection per node).
    Every streambridge script is safe to run twice, so a command sent again after its reply was
    lost is no harm.
    """

    def __init__(self, *args: Any, max_connections: int, **kwargs: Any) -> None:
        super().__init__(*args, max_connections=max_connections, **kwargs)
        self._turns = asyncio.Semaphore(max_connections)
        self._max_connections = max_connections
        self._nodes: ClusterNodes | None = None

    @property
    def nodes(self) -> ClusterNodes:
        """A plain client of each node, and the slot map (:class:`ClusterNodes`): made on first use,
        shared by whoever uses this client, closed with it; at most ``max_connections`` sockets a node."""
        if self._nodes is None:
            self._nodes = ClusterNodes(self, max_connections=self._max_connections)
        return self._nodes

    async def aclose(self) -> None:
        await super().aclose()
        if self._nodes is not None:
            await self._nodes.aclose()

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """One of the ``max_connections`` turns, or none if this task holds one already: redis-py
        sends a pipeline's MOVED commands again through ``execute_command``, after the pipeline's
        connections are back, and waiting there for a second turn could wait forever."""
        if _HOLDS_TURN.get() is self:
            yield
            return
        async with self._turns:
            held = _HOLDS_TURN.set(self)
            try:
                yield
            finally:
                _HOLDS_TURN.reset(held)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.turn():
            for failures in range(FAILOVER_RETRIES + 1):
                try:
                    return await super().execute_command(*args, **kwargs)
                except _FINAL:
                    raise
                except _CLUSTER_CHANGING:
                    if failures == FAILOVER_RETRIES:
                        raise
                await asyncio.sleep(FAILOVER_BACKOFF.compute(failures))
        raise AssertionError("unreachable")  # pragma: no cover

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if transaction or shard_hint:  # refused as redis-py refuses them
            return super().pipeline(transaction, shard_hint)
        return _TurnPipeline(self)  # type: ignore[abstract]  # redis-py types ClusterPipeline as abstract


class _TurnPipeline(ClusterPipeline):
    """redis-py's cluster pipeline, sent when a turn of its client's is free (see StreamsCluster)."""

    _client: StreamsCluster

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        async with self._client.turn():
            return await super().execute(raise_on_error, allow_redirections)


#: a slot map is read again at most this often (s), however many callers find it stale
MAP_REFRESH_EVERY: Final = 0.05


class ClusterNodes:
    """A cluster's slot map, and a plain client of each node it names: for a caller that sends each
    primary a pipeline of its own (``workers.appender``) instead of redis-py's cluster pipeline,
    which, when one node's connection drops, closes every node's connections.

    The clients are :func:`connect`'s (bounded, hiredis-packed), one per node address, kept for
    good; they answer MOVED, ASK, CLUSTERDOWN and TRYAGAIN as redis-py's cluster errors, and never
    retry by themselves: their caller reads the map again (:meth:`refresh`) and sends again. The map
    is read with CLUSTER SLOTS through these clients, not the cluster client's ``NodesManager``,
    whose ``initialize()`` replaces every node of the cluster client, closing its connections under
    whatever commands are in flight.
    """

    def __init__(self, cluster: RedisCluster, *, max_connections: int) -> None:
        self._max_connections = max_connections
        self._clients: dict[str, Redis] = {}
        #: where to ask for the map: the seed nodes, then every node the last map named
        self._known = [node.name for node in cluster.nodes_manager.startup_nodes.values()]
        self._owners: list[str] = []  # slot → its primary's address ("": none serves it)
        self._lock = asyncio.Lock()
        self._read_at = -math.inf

    def owner_known(self, key: str) -> str:
        """The address of the primary of ``key``'s slot as the map last read says, or "" (no map yet)."""
        return self._owners[key_slot(key.encode())] if self._owners else ""

    async def owner(self, key: str) -> str:
        """The address (``host:port``) of the primary of ``key``'s slot; the map is read first if it never
        was, or named no primary for it (``ClusterDownError`` if it still names none)."""
        slot = key_slot(key.encode())
        if not self._owners or not self._owners[slot]:  # never read, or the slot unserved when last read
            await self.refresh()
        address = self._owners[slot] if self._owners else ""  # no map yet: read within the last 50 ms, and failed
        if not address:
            raise ClusterDownError(f"no node serves {key!r}'s slot")  # type: ignore[no-untyped-call]
        return address

    def client(self, address: str) -> Redis:
        client = self._clients.get(address)
        if client is None:
            host, _, port = address.rpartition(":")
            url = f"redis://[{host}]:{port}/0" if ":" in host else f"redis://{host}:{port}/0"
            client = self._clients[address] = connect(
                url,
                max_connections=self._max_connections,
                parser_class=ClusterParser,
                retry=Retry(NoBackoff(), retries=0),
            )
        return client

    async def refresh(self, *, avoid: str = "") -> None:
        """Reads the slot map again (unless it was read within ``MAP_REFRESH_EVERY`` s), from the
        first node that answers, ``avoid`` (the node that just failed) last. A map already in hand
        is kept when none answers; with none in hand, the last node's error is raised."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            if loop.time() - self._read_at < MAP_REFRESH_EVERY:
                return
            self._read_at = loop.time()
            failure: Exception | None = None
            for address in sorted(self._known, key=lambda a: a == avoid):
                try:
                    slots = await self.client(address).execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
                except (ConnectionError, TimeoutError, ResponseError) as exc:
                    failure = exc
                    continue
                self._read(slots, address)
                return
            if not self._owners and failure is not None:
                raise failure

    def _read(self, slots: list[Any], asked: str) -> None:
        owners = [""] * 16384
        known = dict.fromkeys(self._known)
        for start, end, *nodes in slots:
            addresses = [_address(node, asked) for node in nodes]
            owners[int(start) : int(end) + 1] = [addresses[0]] * (int(end) - int(start) + 1)
            known.update(dict.fromkeys(addresses))
        self._owners, self._known = owners, list(known)

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.aclose(close_connection_pool=True) for c in clients), return_exceptions=True)


def _address(node: list[Any], asked: str) -> str:
    """``host:port`` of a CLUSTER SLOTS node entry (an empty host is the node asked's)."""
    host = node[0].decode() if isinstance(node[0], bytes) else str(node[0])
    return f"{host or asked.rpartition(':')[0]}:{int(node[1])}"


def connect_streams(url: str, *, max_connections: int) -> Redis | StreamsCluster:
    """The client of the per-chat keys: :func:`connect`'s for a plain URL, and for
    ``redis-cluster://host:port[,host:port…]`` a cluster client set up as :func:`connect`'s is
    (timeouts, keepalive, hiredis packing), with at most ``max_connections`` sockets per node."""
    if not is_cluster_url(url):
        return connect(url, max_connections=max_connections)
    cluster = StreamsCluster(  # type: ignore[abstract]  # redis-py types RedisCluster as abstract
        startup_nodes=[ClusterNode(host, port) for host, port in parse_cluster_url(url)],
        max_connections=max_connections,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=30,
        socket_keepalive=True,
        socket_keepalive_options=KEEPALIVE,
        # a connection refused is retried on the node a few times; the rest is StreamsCluster's
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[ConnectionError, TimeoutError],
        cluster_error_retry_attempts=1,
    )
    # RedisCluster takes no connection class; its nodes are made from these settings, from the
    # first slot map on (the seeds only ask for that map).
    cluster.connection_kwargs["connection_class"] = _TCP
    return cluster


async def close_client(client: Redis | RedisCluster) -> None:
    """Closes :func:`connect_streams`'s client with its sockets (a plain client's pool was handed to
    it: closing the client alone leaves the pool's sockets open)."""
    if isinstance(client, Redis):
        await client.aclose(close_connection_pool=True)
    else:
        await client.aclose()
