"""The edge hub's Pub/Sub feed on a real Redis: it waits without a timeout, and when its
connection drops it comes back by itself, its readers missing nothing."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable

import hiredis
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streambridge.api import feed as feed_module
from streambridge.api.feed import Feed
from streambridge.api.hub import StreamHub
from streambridge.shared import keys
from streambridge.shared.events import Complete, Content, decode_event
from streambridge.shared.redis import connect, connect_feed
from streambridge.shared.streams import Entry
from streambridge.workers.sink import StreamSink
from tests.conftest import OwnRedis

CHAT = "feed-chat"
TOKEN = "lease-token"


@pytest.fixture
async def hub(real_redis: Redis, redis_url: str) -> AsyncIterator[StreamHub]:
    feed = connect_feed(redis_url)
    hub = StreamHub(real_redis, feed)
    await hub.start()
    yield hub
    await hub.stop()
    await feed.aclose()


async def feed_connections(redis: Redis) -> list[int]:
    """Ids of this database's subscribed connections: the hub's feed."""
    db = redis.connection_pool.connection_kwargs["db"]
    return [int(c["id"]) for c in await redis.client_list() if int(c["db"]) == db and "P" in c["flags"]]


async def test_a_dropped_feed_connection_comes_back_and_its_reader_misses_nothing(
    real_redis: Redis, hub: StreamHub, caplog: pytest.LogCaptureFixture
) -> None:
    await real_redis.hset(keys.lease(CHAT), mapping={"token": TOKEN, "seq": 0})
    sink = StreamSink(real_redis, CHAT, TOKEN, maxlen=10_000)
    received: list[Entry] = []

    async def read() -> None:
        async for batch in hub.tail(CHAT, None, idle=5):
            received.extend(batch)

    reader = asyncio.create_task(read())
    async with asyncio.timeout(10):
        for n in range(3):
            await sink.append(Content(content=f"{n} ", index=n, attempt=1))
        await sink.drain()
        while len(received) < 3:
            await asyncio.sleep(0.01)
        (feed,) = await feed_connections(real_redis)
        with caplog.at_level(logging.WARNING, "streambridge.edge"):
            await real_redis.client_kill_filter(_id=str(feed))
            # Appended while the feed is down or not yet subscribed again: only the re-read finds these.
            for n in range(3, 6):
                await sink.append(Content(content=f"{n} ", index=n, attempt=1))
            await sink.append(Complete(attempt=1, total_chunks=6, content_length=12, elapsed_ms=1))
            await sink.drain()
            await reader
        (again,) = await feed_connections(real_redis)
    await sink.close()

    assert again != feed, "the hub opened a new feed connection"
    assert "edge hub lost Redis" in caplog.text
    events = [decode_event(e.data) for e in received]
    assert [e.content for e in events if isinstance(e, Content)] == [f"{n} " for n in range(6)]
    assert isinstance(events[-1], Complete)
    assert len({e.id for e in received}) == len(received) == 7


async def test_a_quiet_feed_is_not_a_fault_and_a_vanished_peer_is_found_by_keepalive(hub: StreamHub) -> None:
    feed = hub._feed.connection_pool.connection_kwargs
    assert feed["socket_timeout"] is None, "no read timeout: a quiet feed waits, and no timer per message"
    assert feed["socket_keepalive"] is True
    assert feed["socket_keepalive_options"], "the kernel notices a peer gone without a word"
    assert hub._feed.connection_pool.max_connections == 1


async def test_the_feeds_socket_is_kept_alive(hub: StreamHub) -> None:
    transport = hub._channels._transport
    assert transport is not None
    assert transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)


class Heard:
    """What a feed reports: its messages, and the channels whose subscription it confirmed."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self.gaps: list[bytes] = []

    def feed(self, url: str) -> Feed:
        return Feed(connect_feed(url), lambda c, d: self.messages.append((c, d)), self.gaps.append)

    async def until(self, check: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not check():
                await asyncio.sleep(0.01)


@pytest.mark.parametrize("credentials", [":s3cret", "default:s3cret"])
async def test_a_feed_logs_in_as_its_url_says(credentials: str) -> None:
    server = OwnRedis("--requirepass", "s3cret")
    heard = Heard()
    try:
        feed = heard.feed(f"redis://{credentials}@127.0.0.1:{server.port}/5")
        await feed.start()
        feed.subscribe("sb:test:feed")
        await heard.until(lambda: heard.gaps == [b"sb:test:feed"])
        publisher = Redis.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/0")
        await publisher.publish("sb:test:feed", b"hello")
        await heard.until(lambda: heard.messages == [(b"sb:test:feed", b"hello")])
        await publisher.aclose()
        await feed.close()
        with pytest.raises(ResponseError):
            await heard.feed(f"redis://:wrong@127.0.0.1:{server.port}/5").start()
    finally:
        server.stop()


async def test_a_feed_comes_back_after_redis_restarts_and_subscribes_again(caplog: pytest.LogCaptureFixture) -> None:
    server = OwnRedis()
    heard = Heard()
    feed = heard.feed(server.url())
    try:
        await feed.start()
        feed.subscribe("sb:test:a")
        await heard.until(lambda: heard.gaps == [b"sb:test:a"])
        server.kill()
        await heard.until(lambda: not feed.connected())
        feed.subscribe("sb:test:b")  # asked for while Redis is down
        await asyncio.sleep(0.3)  # a few failed attempts
        server.start()
        await heard.until(lambda: sorted(heard.gaps) == [b"sb:test:a", b"sb:test:a", b"sb:test:b"])
        publisher = Redis.from_url(server.url())
        await publisher.publish("sb:test:b", b"after")
        await heard.until(lambda: heard.messages == [(b"sb:test:b", b"after")])
        await publisher.aclose()
    finally:
        await feed.close()
        server.stop()
    assert "edge hub lost Redis" in caplog.text
    assert "edge hub cannot reach Redis" in caplog.text


async def test_a_feed_speaks_tls_when_its_url_says_rediss(tls_redis: int) -> None:
    url = f"rediss://127.0.0.1:{tls_redis}/0?ssl_cert_reqs=none"
    publisher = Redis.from_url(url)
    heard = Heard()
    feed = heard.feed(url)
    try:
        await feed.start()
        feed.subscribe("sb:test:tls")
        await heard.until(lambda: heard.gaps == [b"sb:test:tls"])
        await publisher.publish("sb:test:tls", b"sealed")
        await heard.until(lambda: heard.messages == [(b"sb:test:tls", b"sealed")])
    finally:
        await feed.close()
        await publisher.aclose()


class FlakyRedis:
    """A stand-in Redis that records each connection's commands, and drops the connections it
    is told to at AUTH, as a proxy whose Redis is gone does."""

    def __init__(self, drop_at_auth: set[int]) -> None:
        self.commands: list[list[bytes]] = []
        self.drop_at_auth = drop_at_auth
        self.first_login = asyncio.Event()
        self.ended = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n, parser = len(self.commands), hiredis.Reader()
        self.commands.append([])
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    name = command[0].upper()
                    self.commands[n].append(name)
                    if n == 0 and name == b"AUTH":
                        await self.first_login.wait()  # the feed waits on its first AUTH meanwhile
                    if not self.answer(n, name, command[1:], writer):
                        return
        finally:
            writer.close()
            self.ended += 1

    def answer(self, n: int, name: bytes, args: list[bytes], writer: asyncio.StreamWriter) -> bool:
        if name == b"AUTH" and n in self.drop_at_auth:
            writer.transport.abort()
            return False
        if name in (b"AUTH", b"SELECT"):
            writer.write(b"+OK\r\n")
        elif name == b"SUBSCRIBE":
            for count, channel in enumerate(args, 1):
                writer.write(b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%b\r\n:%d\r\n" % (len(channel), channel, count))
        return True


async def test_a_feed_dropped_during_its_login_comes_back_and_subscribes_only_once_logged_in() -> None:
    redis = FlakyRedis(drop_at_auth={1})  # the first reconnect is dropped at AUTH
    server = await asyncio.start_server(redis.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    heard = Heard()
    feed = heard.feed(f"redis://:pw@127.0.0.1:{port}/3")
    try:
        starting = asyncio.create_task(feed.start())
        await heard.until(lambda: redis.commands == [[b"AUTH"]])
        feed.subscribe("sb:test:early")  # a reader joins while the feed logs in
        redis.first_login.set()
        await starting
        await heard.until(lambda: heard.gaps == [b"sb:test:early"])
        assert redis.commands[0] == [b"AUTH", b"SELECT", b"SUBSCRIBE"], "nothing before the login is done"
        feed._transport.abort()  # type: ignore[union-attr]  # the connection drops
        await heard.until(lambda: heard.gaps == [b"sb:test:early"] * 2)
        assert feed.connected()
        assert redis.commands[1] == [b"AUTH"]  # dropped there, and tried again
        assert redis.commands[2] == [b"AUTH", b"SELECT", b"SUBSCRIBE"]
    finally:
        await feed.close()
        server.close()
        await heard.until(lambda: redis.ended == len(redis.commands))


async def test_a_redis_that_stops_answering_is_found_by_ping_and_the_feed_comes_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(feed_module, "PING_INTERVAL", 0.1)
    monkeypatch.setattr(feed_module, "SILENCE", 0.5)
    server = OwnRedis()
    heard = Heard()
    feed = heard.feed(server.url())
    try:
        await feed.start()
        feed.subscribe("sb:test:a")
        await heard.until(lambda: heard.gaps == [b"sb:test:a"])
        await asyncio.sleep(0.5)
        assert "silent" not in caplog.text, "a quiet feed that answers its PINGs is alive"
        server.process.send_signal(signal.SIGSTOP)  # its socket stays open, and nothing answers: half-open
        started = time.monotonic()
        await heard.until(lambda: "Redis silent" in caplog.text)
        assert time.monotonic() - started < 2
        server.process.send_signal(signal.SIGCONT)
        await heard.until(lambda: len(heard.gaps) >= 2 and feed.connected())  # subscribed again
        publisher = Redis.from_url(server.url())
        await publisher.publish("sb:test:a", b"after")
        await heard.until(lambda: heard.messages == [(b"sb:test:a", b"after")])
        await publisher.aclose()
    finally:
        server.process.send_signal(signal.SIGCONT)
        await feed.close()
        server.stop()


async def xranges(redis: Redis) -> int:
    return int((await redis.info("commandstats")).get("cmdstat_xrange", {}).get("calls", 0))


async def test_a_feed_reconnect_costs_one_read_per_chat_not_one_per_reader() -> None:
    server = OwnRedis()  # its own: INFO commandstats counts every XRANGE, and nothing else sends one
    url = server.url()
    redis, feed = connect(url, max_connections=4), connect_feed(url)  # the edge's pool, scaled down
    hub = StreamHub(redis, feed)
    chats = [f"storm-{n}" for n in range(10)]
    sinks = {chat: StreamSink(redis, chat, TOKEN, maxlen=10_000) for chat in chats}
    received: dict[int, list[Entry]] = {n: [] for n in range(1000)}

    async def read(n: int) -> None:
        async for batch in hub.tail(chats[n % 10], None, idle=30):
            received[n].extend(batch)

    async def settled() -> None:  # every reader caught up and waiting, no read left to send
        await asyncio.sleep(0.2)
        async with asyncio.timeout(10):
            while any(
                t.reading or any(s.waiter is None or s.items for s in t.subscribers) for t in hub.topics.values()
            ):
                await asyncio.sleep(0.01)

    readers: list[asyncio.Task[None]] = []
    try:
        await hub.start()
        for chat in chats:
            await redis.hset(keys.lease(chat), mapping={"token": TOKEN, "seq": 0})
            await sinks[chat].append(CONTENT_A)
            await sinks[chat].drain()
        await redis.config_resetstat()
        readers = [asyncio.create_task(read(n)) for n in range(1000)]
        await settled()
        assert await xranges(redis) <= 10, "a new chat's readers read its history once, together"

        await redis.config_resetstat()
        (connection,) = await feed_connections(redis)
        await redis.client_kill_filter(_id=str(connection))
        async with asyncio.timeout(10):
            while await xranges(redis) < 10:  # every chat's readers re-read once the feed is back
                await asyncio.sleep(0.01)
        await settled()
        assert await xranges(redis) <= 10, "readers of a chat share its re-read"

        for chat in chats:
            await sinks[chat].append(DONE)
            await sinks[chat].drain()
        async with asyncio.timeout(10):
            await asyncio.gather(*readers)
        assert all([decode_event(e.data) for e in got] == [CONTENT_A, DONE] for got in received.values())
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for sink in sinks.values():
            await sink.close()
        await hub.stop()
        await redis.aclose(close_connection_pool=True)
        await feed.aclose(close_connection_pool=True)
        server.stop()


CONTENT_A = Content(content="a", index=1, attempt=1)
DONE = Complete(attempt=1, total_chunks=1, content_length=1, elapsed_ms=1)
