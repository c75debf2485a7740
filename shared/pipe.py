"""One Redis connection for the hot path: calls pipelined, replies parsed in the connection's callback.

redis-py's asyncio pipeline cost a worker ~110 µs of CPU per round trip of three appends (a pool
checkout, a ``Pipeline`` object, an ``asyncio.timeout`` around the write and another around each
reply's read, its reader layers), against ~17 µs here (docs/benchmarks.md): with a token arriving
alone, that round trip was most of what a token cost a worker beyond reading it. Here the commands
are packed by hiredis and written at once, and the replies are parsed as they arrive, in the
protocol's own callback, which answers each batch's future when its last reply is in.

Batches may overlap: replies come back in the order the commands went. A batch not answered
within its ``timeout`` drops the connection (its replies would be out of step), failing every batch
in flight with ``TimeoutError``; one timer does for all of them, moved lazily, not one per call.
A dropped connection fails the batches in flight with ``ConnectionError``; the next call connects
again. Retrying is the caller's (``workers.appender`` sends a round trip again: its calls are
fenced and numbered, safe to run twice).

The connection is made as a redis-py client's pool says (host or Unix socket, TLS, user and
password, database, client name, TCP keepalive): :func:`pipe_for` gives one for a client whose
connections are real sockets, None for anything else (fakeredis), which keeps redis-py's path.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import socket
from collections import deque
from collections.abc import Sequence
from typing import Any, Final

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterParser
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError, TimeoutError

#: a command: its name and arguments, as hiredis packs them
Command = Sequence[str | bytes | int | float]


class _Batch:
    __slots__ = ("answer", "due", "left", "replies")

    def __init__(self, answer: asyncio.Future[list[Any]], count: int, due: float) -> None:
        self.answer, self.left, self.due = answer, count, due
        self.replies: list[Any] = []


class _Wire(asyncio.Protocol):
    """One connection and the batches it owes replies to: a new one for each reconnect, so that a
    dropped connection's late ``connection_lost`` touches nothing of the next one's."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader()
        self._batches: deque[_Batch] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0

    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, commands: Sequence[Command], deadline: float) -> asyncio.Future[list[Any]]:
        # packed first: a command that cannot be packed must not leave a batch that takes others' replies
        packed = b"".join([hiredis.pack_command(tuple(c)) for c in commands])  # type: ignore[arg-type]
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("the connection to Redis closed")
        batch = _Batch(asyncio.get_running_loop().create_future(), len(commands), deadline)
        self._batches.append(batch)
        self.transport.write(packed)
        if self._timer is None or batch.due < self._timer_due:
            self._arm(batch.due)
        return batch.answer

    def drop(self, error: Exception) -> None:
        """Closes the connection; whoever waits for a reply hears ``error``."""
        transport, self.transport = self.transport, None
        self._fail(error)  # before connection_lost's own error, which comes later: the callers hear why
        if transport is not None:
            transport.abort()

    # The protocol: called by the event loop.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream's: uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        batches = self._batches
        while (reply := self._reader.gets()) is not False:
            if not batches:  # nothing asked for it: the connection is out of step
                self.drop(ConnectionError("Redis sent a reply nobody asked for"))
                return
            batch = batches[0]
            if isinstance(reply, hiredis.ReplyError):
                reply = ClusterParser.parse_error(str(reply))
            batch.replies.append(reply)
            batch.left -= 1
            if batch.left <= 0:
                batches.popleft()
                if not batch.answer.done():
                    batch.answer.set_result(batch.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(ConnectionError(f"Redis closed the connection ({exc or 'closed by the server'})"))

    # Inside.

    def _fail(self, error: Exception) -> None:
        batches, self._batches = self._batches, deque()
        for batch in batches:
            if not batch.answer.done():
                batch.answer.set_exception(error)
                batch.answer.exception()  # retrieved: a caller that left (shielded, then cancelled) hears nothing
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        self._timer = asyncio.get_running_loop().call_at(due, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if not self._batches:
            return
        due = min(batch.due for batch in self._batches)
        if due <= asyncio.get_running_loop().time():
            self.drop(TimeoutError("Redis did not answer in time"))
        else:  # the batch it was set for was answered: the earliest still waiting
            self._arm(due)


class Pipe:
    """Calls on one connection, made when first needed and again after it dropped."""

    def __init__(self, settings: dict[str, Any], tls: Any = None) -> None:
        self._settings = settings
        self._tls = tls  # an ssl.SSLContext, or None
        #: how long one attempt may wait for its replies (the client's ``socket_timeout``), if bounded
        self.timeout: float | None = settings.get("socket_timeout")
        self._wire: _Wire | None = None
        self._connecting: asyncio.Future[_Wire] | None = None
        self._closed = False

    async def execute(self, commands: Sequence[Command], *, deadline: float) -> list[Any]:
        """Each command's reply, in order; an error reply as redis-py's exception for it, returned,
        not raised (``NoScriptError``, ``MovedError``, ``ResponseError`` ...). Raises
        ``ConnectionError`` when the connection cannot be made or drops, ``TimeoutError`` when
        the replies are not all in by ``deadline`` (the loop's time)."""
        if not commands:
            return []
        wire = self._wire
        if wire is None or not wire.usable():
            wire = await self._connect(deadline)
        if asyncio.get_running_loop().time() >= deadline:  # sent now, it would only drop the connection
            raise TimeoutError("Redis did not answer in time")
        # shielded: a caller cancelled meanwhile leaves its batch in place; its replies still come, in turn
        return await asyncio.shield(wire.send(commands, deadline))

    def ready(self) -> _Wire | None:
        """The connection, if it is open: a caller may then ``send`` on it from a plain callback."""
        wire = self._wire
        return wire if wire is not None and wire.usable() and not self._closed else None

    async def close(self) -> None:
        self._closed = True  # a connection being made is dropped as it completes (``_open``)
        if self._wire is not None:
            self._wire.drop(ConnectionError("the connection was closed"))

    async def _connect(self, deadline: float) -> _Wire:
        """One connection for every caller waiting for it, each waiting until its own deadline."""
        if self._closed:
            raise ConnectionError("the connection was closed")
        if self._connecting is None:
            self._connecting = connecting = asyncio.ensure_future(self._open())
            connecting.add_done_callback(self._connected)
        try:
            async with asyncio.timeout_at(deadline):
                wire = await asyncio.shield(self._connecting)
        except builtins.TimeoutError:
            raise TimeoutError("connecting to Redis took too long") from None
        if not wire.usable():  # lost between its handshake and this caller's turn
            raise ConnectionError("the connection to Redis closed")
        return wire

    def _connected(self, connecting: asyncio.Future[_Wire]) -> None:
        if self._connecting is connecting:
            self._connecting = None
        if not connecting.cancelled():
            connecting.exception()  # retrieved: its waiters may all have given up

    async def _open(self) -> _Wire:
        s, loop = self._settings, asyncio.get_running_loop()
        wire = _Wire()
        try:
            async with asyncio.timeout(s.get("socket_connect_timeout") or 10):
                if "path" in s:
                    await loop.create_unix_connection(lambda: wire, s["path"])
                else:
                    host, tls = s.get("host", "localhost"), self._tls
                    await loop.create_connection(
                        lambda: wire, host, s.get("port", 6379), ssl=tls, server_hostname=host if tls else None
                    )
                    assert wire.transport is not None
                    keep_alive(wire.transport.get_extra_info("socket"), s)
                await self._handshake(wire, s)
        except builtins.TimeoutError as exc:
            wire.drop(ConnectionError("connecting timed out"))
            raise TimeoutError("connecting to Redis timed out") from exc
        except OSError as exc:
            raise ConnectionError(f"cannot connect to Redis: {exc}") from exc
        except BaseException:
            wire.drop(ConnectionError("the connection's handshake failed"))
            raise
        if self._closed:
            wire.drop(ConnectionError("the connection was closed"))
            raise ConnectionError("the connection was closed")
        self._wire = wire
        return wire

    async def _handshake(self, wire: _Wire, s: dict[str, Any]) -> None:
        commands: list[Command] = []
        if s.get("password") is not None:
            commands.append(["AUTH", *([s["username"]] if s.get("username") else []), s["password"]])
        if s.get("db"):
            commands.append(["SELECT", str(s["db"])])
        if s.get("client_name"):
            commands.append(["CLIENT", "SETNAME", s["client_name"]])
        if commands:
            deadline = asyncio.get_running_loop().time() + (s.get("socket_connect_timeout") or 10)
            for reply in await wire.send(commands, deadline):
                if isinstance(reply, Exception):  # a wrong password is a ConnectionError, not a ResponseError
                    raise reply


#: the connection classes whose settings a Pipe knows how to follow: real sockets
_SOCKETS: Final = (Connection, UnixDomainSocketConnection)


def pipe_for(client: Any) -> Pipe | None:
    """A Pipe made as ``client``'s connections are, or None when they are not plain sockets of
    redis-py's (fakeredis's), whose caller keeps redis-py's own path."""
    if not isinstance(client, Redis):
        return None
    pool = client.connection_pool
    cls = pool.connection_class
    if not issubclass(cls, _SOCKETS) or not cls.__module__.startswith(("redis.", "streambridge.")):
        return None
    tls = None
    if issubclass(cls, SSLConnection):
        tls = pool.make_connection().ssl_context.get()  # type: ignore[no-untyped-call]
    return Pipe(dict(pool.connection_kwargs), tls)


def keep_alive(sock: socket.socket | None, settings: dict[str, Any]) -> None:
    """TCP keepalive as the client's settings ask: a peer gone without a word is noticed."""
    if sock is None or not settings.get("socket_keepalive"):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (settings.get("socket_keepalive_options") or {}).items():
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
