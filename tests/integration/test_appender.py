"""A worker's appends go out together: one pipeline per round trip, each answer to its caller."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from streambridge.shared.machine import define
from streambridge.workers.appender import Appender

INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


pytestmark = pytest.mark.usefixtures("closing_appenders")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


class CountingAppender(Appender):
    def __init__(self, redis: Redis) -> None:
        super().__init__(redis)
        self.round_trips: list[int] = []

    async def _execute(self, batch: list[Any]) -> list[Any]:
        self.round_trips.append(len(batch))
        return await super()._execute(batch)


async def test_calls_made_together_share_one_round_trip(redis: Redis) -> None:
    appender, script = CountingAppender(redis), define("INCR", INCR)
    await redis.script_load(script.lua)  # or the first round trip is followed by one that loads it
    answers = await asyncio.gather(*(appender.call(script, [f"k{n}"], [str(n)]) for n in range(10)))
    assert answers == list(range(10))
    assert appender.round_trips == [10]


async def test_calls_made_while_one_is_in_flight_go_together_in_the_next(redis: Redis) -> None:
    appender, script = CountingAppender(redis), define("INCR", INCR)
    await redis.script_load(script.lua)
    first = asyncio.ensure_future(appender.call(script, ["k"], ["1"]))
    await asyncio.sleep(0)  # the first round trip is under way
    rest = await asyncio.gather(*(appender.call(script, ["k"], ["1"]) for _ in range(5)))
    assert await first == 1
    assert rest == [2, 3, 4, 5, 6]  # in the order they were made
    assert appender.round_trips == [1, 5]


async def test_a_script_redis_has_forgotten_is_loaded_and_sent_again(redis: Redis) -> None:
    appender, script = Appender(redis), define("INCR", INCR)
    assert await appender.call(script, ["k"], ["1"]) == 1
    await redis.script_flush()  # as after a Redis restart
    assert await asyncio.gather(appender.call(script, ["k"], ["1"]), appender.call(script, ["j"], ["5"])) == [2, 5]


async def test_an_error_reaches_only_the_call_that_made_it(redis: Redis) -> None:
    appender, script = Appender(redis), define("INCR", INCR)
    await redis.set("text", "not a number")
    good, bad = await asyncio.gather(
        appender.call(script, ["k"], ["1"]), appender.call(script, ["text"], ["1"]), return_exceptions=True
    )
    assert good == 1
    assert isinstance(bad, ResponseError)


async def test_redis_unreachable_reaches_every_caller_and_the_next_call_tries_again(redis_url: str) -> None:
    gone = Redis(port=1, socket_connect_timeout=0.5)
    # a window the refused connections fit in on a loaded host: past it, the caller hears a timeout instead
    appender, script = Appender(gone, retry_for=0.5), define("INCR", INCR)
    answers = await asyncio.gather(*(appender.call(script, ["k"], ["1"]) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(a, RedisConnectionError) for a in answers), answers
    with pytest.raises(RedisConnectionError):
        await appender.call(script, ["k"], ["1"])
    await gone.aclose()


async def test_a_cancelled_caller_leaves_the_others_their_answers(redis: Redis) -> None:
    appender, script = Appender(redis), define("INCR", INCR)
    cancelled = asyncio.ensure_future(appender.call(script, ["a"], ["1"]))
    kept = asyncio.ensure_future(appender.call(script, ["b"], ["1"]))
    await asyncio.sleep(0)
    cancelled.cancel()
    assert await kept == 1
    with pytest.raises(asyncio.CancelledError):
        await cancelled


async def test_closing_it_cancels_whoever_still_waits_for_an_answer(redis: Redis) -> None:
    appender, script = Appender(redis), define("INCR", INCR)
    calls = [asyncio.ensure_future(appender.call(script, ["k"], ["1"])) for _ in range(3)]
    await asyncio.sleep(0)  # the round trip is under way
    await appender.close()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results), results


async def test_a_round_trip_whose_connection_dropped_is_sent_again_within_its_window(redis: Redis) -> None:
    # A failover or a proxy's reset breaks the socket mid-round-trip: the same calls go again (the
    # sink's sequence numbers make one Redis already applied harmless), while the leases still hold.
    drops = 2

    class Dropping(CountingAppender):
        async def _execute(self, batch: list[Any]) -> list[Any]:
            nonlocal drops
            if drops:
                drops -= 1
                self.round_trips.append(len(batch))
                raise RedisConnectionError("Connection closed by server.")
            return await super()._execute(batch)

    appender, script = Dropping(redis), define("INCR", INCR)
    await redis.script_load(script.lua)
    assert await asyncio.gather(appender.call(script, ["k"], ["1"]), appender.call(script, ["j"], ["2"])) == [1, 2]
    assert appender.round_trips == [2, 2, 2]


async def test_a_connection_that_stays_down_past_the_window_reaches_the_callers(redis: Redis) -> None:
    class Down(Appender):
        async def _execute(self, batch: list[Any]) -> list[Any]:
            raise RedisConnectionError("Connection refused.")

    appender, script = Down(redis, retry_for=0.2), define("INCR", INCR)
    started = asyncio.get_running_loop().time()
    with pytest.raises(RedisConnectionError):
        await appender.call(script, ["k"], ["1"])
    assert 0.1 <= asyncio.get_running_loop().time() - started < 1.0
