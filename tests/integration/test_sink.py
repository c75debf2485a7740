"""A chat's sink: its events go in order, a turn's events in one batch, with no task per batch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from streambridge.shared import keys, machine
from streambridge.shared.errors import StreambridgeError
from streambridge.shared.events import Content, encode_event
from streambridge.workers.sink import MAX_PENDING, LeaseLost, StreamSink
from tests.integration.test_appender import CountingAppender, connected, tasks_made
from tests.integration.test_sink_coalesce import sink_for, texts, word

pytestmark = pytest.mark.usefixtures("closing_appenders")


@pytest.fixture
def redis(real_redis: Redis) -> Redis:
    return real_redis


@pytest.fixture
async def appender(redis: Redis) -> AsyncIterator[CountingAppender]:
    appender = CountingAppender(redis)
    await redis.script_load(machine.APPEND.lua)  # or a first APPEND is followed by the round trip that loads it
    await connected(appender, redis)
    yield appender
    await appender.close()


async def test_events_handed_over_in_one_turn_go_in_one_batch(redis: Redis, appender: CountingAppender) -> None:
    # a read that held many chunks: their events are one APPEND, not one each
    sink = await sink_for(redis, "sink-turn", appender, coalesce=0)
    for n in range(3):
        await sink.append(word(n))
    await sink.drain()
    assert appender.round_trips == [1, 1]  # the warm-up's, then this batch's
    assert await texts(redis, "sink-turn") == [encode_event(word(n)) for n in range(3)]
    await sink.close()


async def test_a_token_that_arrives_alone_costs_no_task(
    redis: Redis, appender: CountingAppender, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = await sink_for(redis, "sink-alone", appender, coalesce=0)
    tasks = tasks_made(monkeypatch)
    for n in range(3):
        await sink.append(word(n))
        await asyncio.sleep(0.005)  # apart: each its own batch
    await sink.drain()
    assert tasks == []
    assert appender.round_trips == [1, 1, 1, 1]
    assert await texts(redis, "sink-alone") == [encode_event(word(n)) for n in range(3)]
    await sink.close()


async def test_events_handed_over_while_a_batch_is_in_flight_go_together_next(
    redis: Redis, appender: CountingAppender
) -> None:
    sink = await sink_for(redis, "sink-flight", appender, coalesce=0)
    await sink.append(word(0))
    await asyncio.sleep(0)  # the first batch is written
    for n in range(1, 4):
        await sink.append(word(n))
    await sink.drain()
    assert appender.round_trips == [1, 1, 1]
    assert await texts(redis, "sink-flight") == [encode_event(word(n)) for n in range(4)]
    await sink.close()


async def test_a_lost_lease_is_raised_by_drain_and_every_append_after(redis: Redis, appender: CountingAppender) -> None:
    sink = await sink_for(redis, "sink-lost", appender, coalesce=0)
    await redis.hset(keys.lease("sink-lost"), "token", "another attempt's")
    await sink.append(word(0))
    with pytest.raises(LeaseLost):
        await sink.drain()
    with pytest.raises(LeaseLost):
        await sink.append(word(1))
    assert await redis.xlen(keys.events("sink-lost")) == 0
    await sink.close()


async def test_a_sink_closed_with_a_batch_in_flight_sends_nothing_more(
    redis: Redis, appender: CountingAppender
) -> None:
    sink = await sink_for(redis, "sink-closed", appender, coalesce=0)
    await sink.append(word(0))
    while appender._lanes[""].flight is None:  # written, not yet answered
        await asyncio.sleep(0)
    await sink.append(word(1))  # waits for the batch in flight
    draining = asyncio.ensure_future(sink.drain())
    await sink.close()
    with pytest.raises(StreambridgeError):
        await draining  # told: what it waited for never went
    await asyncio.sleep(0.05)
    assert appender.round_trips == [1, 1]
    assert await texts(redis, "sink-closed") == [encode_event(word(0))]


async def test_an_event_that_cannot_be_encoded_is_raised_by_drain_not_lost(
    redis: Redis, appender: CountingAppender
) -> None:
    sink = await sink_for(redis, "sink-bad", appender, coalesce=0)
    await sink.append(Content(content="\ud83d", index=0, attempt=1))  # a lone surrogate: no UTF-8 for it
    with pytest.raises(UnicodeEncodeError):
        await sink.drain()
    with pytest.raises(UnicodeEncodeError):
        await sink.append(word(1))
    assert appender.round_trips == [1]
    await sink.close()


async def test_a_producer_that_never_yields_holds_no_more_than_a_batch(
    redis: Redis, appender: CountingAppender
) -> None:
    await redis.hset(keys.lease("sink-flood"), mapping={"token": "t", "seq": 0})
    sink = StreamSink(redis, "sink-flood", "t", maxlen=10 * MAX_PENDING, appender=appender)
    most = 0
    for n in range(3 * MAX_PENDING):
        await sink.append(word(n))
        most = max(most, len(sink._pending))
    await sink.drain()
    assert most <= MAX_PENDING
    assert await redis.xlen(keys.events("sink-flood")) == 3 * MAX_PENDING
    await sink.close()
