"""A sink with ``coalesce`` sends tokens that arrive alone together, at a tick every sink shares."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from streambridge.shared import keys, machine
from streambridge.shared.events import Content, encode_event
from streambridge.workers.appender import Appender
from streambridge.workers.sink import StreamSink
from tests.integration.test_appender import CountingAppender

pytestmark = pytest.mark.usefixtures("closing_appenders")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def sink_for(redis: Redis, chat_id: str, appender: Appender, coalesce: float) -> StreamSink:
    await redis.hset(keys.lease(chat_id), mapping={"token": "t", "seq": 0})
    return StreamSink(redis, chat_id, "t", maxlen=1000, appender=appender, coalesce=coalesce)


def word(n: int) -> Content:
    return Content(content=f"w{n} ", index=n, attempt=1)


async def texts(redis: Redis, chat_id: str) -> list[bytes]:
    return [fields[b"data"] for _, fields in await redis.xrange(keys.events(chat_id))]


async def test_tokens_of_many_chats_arriving_apart_go_out_in_one_round_trip(redis: Redis) -> None:
    appender = CountingAppender(redis)
    await redis.script_load(machine.APPEND.lua)  # or the first round trip is followed by one that loads it
    sinks = [await sink_for(redis, f"coalesce-{n}", appender, coalesce=0.2) for n in range(5)]
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0.2 - loop.time() % 0.2 + 0.01)  # just past a tick: the appends below fall before the next
    for n, sink in enumerate(sinks):
        await sink.append(word(1))
        await asyncio.sleep(0.001 if n < 4 else 0)  # apart, as tokens of independent chats arrive
    await asyncio.sleep(0.25)  # past the tick
    assert appender.round_trips == [5]
    for n, sink in enumerate(sinks):
        await sink.append(word(2))
        await sink.drain()
        assert await texts(redis, f"coalesce-{n}") == [encode_event(word(1)), encode_event(word(2))]
        await sink.close()


async def test_drain_sends_at_once_without_waiting_for_the_tick(redis: Redis) -> None:
    sink = await sink_for(redis, "coalesce-drain", Appender(redis), coalesce=30.0)
    for n in range(1, 4):
        await sink.append(word(n))
    async with asyncio.timeout(5):
        await sink.drain()
    assert await redis.xlen(keys.events("coalesce-drain")) == 3
    await sink.close()


async def test_a_sink_closed_before_its_tick_sends_nothing(redis: Redis) -> None:
    appender = CountingAppender(redis)
    sink = await sink_for(redis, "coalesce-closed", appender, coalesce=0.02)
    await sink.append(word(1))
    await sink.close()
    await asyncio.sleep(0.06)
    assert appender.round_trips == []
    assert await redis.xlen(keys.events("coalesce-closed")) == 0
