"""The edge hub's Pub/Sub feed on a real Redis: it waits without a timeout, and when its
connection drops it comes back by itself, its readers missing nothing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from api.hub import StreamHub
from shared import keys
from shared.events import Complete, Content, decode_event
from shared.redis import connect_feed
from shared.streams import Entry
from workers.sink import StreamSink

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
