"""The edge's one Pub/Sub connection, its messages parsed in the connection's own callback.

redis-py hands each reply to a task waiting on the socket: every message that arrives alone (a
chat's token, when each client watches its own chat) wakes that task and walks redis-py's
reader layers, 42 µs a message against 16 µs here (docs/benchmarks.md). Here the connection is a
plain asyncio protocol: hiredis parses what arrives, and each message reaches the hub before
the callback returns.

The connection is made as the client's URL says (host or Unix socket, TLS, user and password,
database, TCP keepalive) and remade with backoff whenever it drops, every channel subscribed
again. Each channel's subscription confirmation is reported through ``on_gap``: the feed may have
missed that channel's messages before it, and its readers must re-read the stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar, Final

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from streambridge.shared.pipe import keep_alive

log = logging.getLogger("streambridge.edge")

#: channels per SUBSCRIBE when a reconnect subscribes them all again
SUBSCRIBE_BATCH: Final = 1000
#: seconds between PINGs, and of silence after which the connection is taken for dead: a Redis
#: gone without a word (a half-open connection) is otherwise found by TCP keepalive, after ~25 s
PING_INTERVAL = 2.0
SILENCE = 5.0


class Feed(asyncio.Protocol):
    """``on_message(channel, data)`` for each message; ``on_gap(channel)`` when a subscription is
    confirmed, at first or after a reconnect. ``redis``'s pool gives the connection's settings."""

    #: the Pub/Sub spoken: classic here; sharded (``SSUBSCRIBE``, ``smessage``) by api/shards.py's
    SUBSCRIBE: ClassVar[bytes] = b"SUBSCRIBE"
    UNSUBSCRIBE: ClassVar[bytes] = b"UNSUBSCRIBE"
    MESSAGE: ClassVar[bytes] = b"message"
    SUBSCRIBED: ClassVar[bytes] = b"subscribe"
    UNSUBSCRIBED: ClassVar[bytes] = b"unsubscribe"

    def __init__(
        self, redis: Redis, on_message: Callable[[bytes, bytes], None], on_gap: Callable[[bytes], None]
    ) -> None:
        self._setup(dict(redis.connection_pool.connection_kwargs), on_message, on_gap)
        self._tls = issubclass(redis.connection_pool.connection_class, SSLConnection)
        self._make_connection = redis.connection_pool.make_connection  # only for its TLS context

    def _setup(
        self, settings: dict[str, Any], on_message: Callable[[bytes, bytes], None], on_gap: Callable[[bytes], None]
    ) -> None:
        """What a connection keeps: apart from ``__init__`` for feeds made without a redis-py pool
        (api/shards.py's, one per cluster node)."""
        self._settings = settings
        self._tls = False
        self._on_message, self._on_gap = on_message, on_gap
        self._kinds = (self.MESSAGE, self.SUBSCRIBED)
        self.channels: set[str] = set()
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader()
        self._answers: deque[asyncio.Future[object]] = deque()  # replies to the handshake's commands
        self._reconnecting: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None
        self._heard = 0.0  # the loop's time when the connection last said anything
        self._ready = False  # the connection's handshake is done: (un)subscribe may be written
        self._up = False  # started: from then on a lost connection is made again
        self._closed = False

    async def start(self) -> None:
        """Connects; raises if Redis cannot be reached now (the edge does not start without it)."""
        await self._open()
        self._up = True
        self._watching = asyncio.get_running_loop().create_task(self._watch(), name="edge-feed-watch")

    def subscribe(self, channel: str) -> None:
        """Subscribes now, or with every other channel when the connection is back."""
        self.channels.add(channel)
        self._send(self.SUBSCRIBE, channel)

    def unsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)
        self._send(self.UNSUBSCRIBE, channel)

    async def close(self) -> None:
        self._closed = True
        for task in (self._reconnecting, self._watching):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._transport is not None:
            self._transport.close()

    def connected(self) -> bool:
        return self._ready and self._transport is not None and not self._transport.is_closing()

    # The protocol: called by the event loop.

    def data_received(self, data: bytes) -> None:
        self._heard = asyncio.get_running_loop().time()
        self._reader.feed(data)
        message = self.MESSAGE
        while (reply := self._reader.gets()) is not False:
            if isinstance(reply, list) and reply and reply[0] in self._kinds:
                try:
                    if reply[0] == message:
                        self._on_message(reply[1], reply[2])
                    else:
                        self._on_gap(reply[1])
                except Exception:  # one bad message must not stop the feed: its readers re-read instead
                    log.exception("edge hub: handling a message on %r failed; its readers re-read the stream", reply[1])
                    self._on_gap(reply[1])
            elif self._answers:  # a reply to AUTH, SELECT
                answer = self._answers.popleft()
                if not answer.done():
                    answer.set_result(reply)
            elif isinstance(reply, hiredis.ReplyError):  # a refused (un)subscribe: the connection is fine
                self._refused(reply)
            elif isinstance(reply, list) and reply and reply[0] == self.UNSUBSCRIBED:
                self._unsubscribed(reply[1])
            # else: a pong: nothing to do

    def _refused(self, error: hiredis.ReplyError) -> None:
        log.warning("edge hub: Redis refused a Pub/Sub command: %s", error)

    def _unsubscribed(self, channel: bytes) -> None:
        """An unsubscribe's confirmation: nothing to do here (a sharded feed may be told unasked)."""

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport, self._ready = None, False
        for answer in self._answers:
            if not answer.done():
                answer.set_exception(RedisConnectionError("connection lost"))
        self._answers.clear()
        if self._up and not self._closed and (self._reconnecting is None or self._reconnecting.done()):
            log.warning("edge hub lost Redis (%s); reconnecting", exc or "closed by the server")
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect(), name="edge-feed-reconnect")

    async def _watch(self) -> None:
        """PINGs the connection, and drops it when it stays silent: its reconnect finds out."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(PING_INTERVAL)
            if not self.connected():
                continue  # reconnecting: its own timeouts and backoff apply
            if loop.time() - self._heard >= SILENCE:
                log.warning("edge hub: Redis silent for %.1f s; reconnecting", loop.time() - self._heard)
                assert self._transport is not None
                self._transport.abort()  # connection_lost() reconnects
            else:
                self._send(b"PING")

    # Connecting.

    async def _reconnect(self) -> None:
        delay = 0.05
        while not self._closed:
            try:
                await self._open()
                log.warning("edge hub: Redis is back; subscribed to %d channels again", len(self.channels))
                return
            except Exception as exc:  # whatever it was, the feed must come back: try again
                log.warning("edge hub cannot reach Redis (%s); trying again in %.2f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _open(self) -> None:
        s, loop = self._settings, asyncio.get_running_loop()
        self._reader = hiredis.Reader()
        async with asyncio.timeout(s.get("socket_connect_timeout") or 10):
            if "path" in s:
                transport, _ = await loop.create_unix_connection(lambda: self, s["path"])
            else:
                tls = self._make_connection().ssl_context.get() if self._tls else None  # type: ignore[no-untyped-call]
                host = s.get("host", "localhost")
                transport, _ = await loop.create_connection(
                    lambda: self, host, s.get("port", 6379), ssl=tls, server_hostname=host if tls else None
                )
                keep_alive(transport.get_extra_info("socket"), s)
            self._transport = transport
            try:
                if s.get("password") is not None:
                    user = s.get("username")
                    await self._ask(transport, b"AUTH", *([user] if user else []), s["password"])
                if s.get("db"):
                    await self._ask(transport, b"SELECT", str(s["db"]))  # channels are global; CLIENT LIST shows it
            except BaseException:
                transport.abort()
                raise
        if self._transport is not transport or transport.is_closing():
            raise RedisConnectionError("the connection closed during its handshake")
        # Whatever was subscribed meanwhile is in ``channels``: nothing was written before this.
        self._ready, self._heard = True, loop.time()
        self._subscribe_all()

    def _subscribe_all(self) -> None:
        """Every channel, once the connection is (again) ready."""
        channels = sorted(self.channels)
        for n in range(0, len(channels), SUBSCRIBE_BATCH):
            self._send(self.SUBSCRIBE, *channels[n : n + SUBSCRIBE_BATCH])

    async def _ask(self, transport: asyncio.Transport, *command: bytes | str) -> object:
        """A handshake command's reply (nothing else is written on the connection before it)."""
        answer: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._answers.append(answer)
        transport.write(hiredis.pack_command(command))  # type: ignore[arg-type]  # its stub says 1-tuples
        reply = await answer
        if isinstance(reply, hiredis.ReplyError):
            raise ResponseError(str(reply))
        return reply

    def _send(self, *command: bytes | str) -> None:
        if self.connected():
            assert self._transport is not None
            self._transport.write(hiredis.pack_command(command))  # type: ignore[arg-type]  # its stub says 1-tuples
