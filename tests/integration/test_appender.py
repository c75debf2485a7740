"""A worker's appends go out together: one pipeline per round trip, each answer to its caller."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streambridge.shared.machine import define
from streambridge.shared.pipe import _Wire
from streambridge.shared.redis import connect
from streambridge.workers.appender import Appender

INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


pytestmark = pytest.mark.usefixtures("closing_appenders")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


class CountingAppender(Appender):
    """Counts its round trips (the calls in each), whether written from a caller's turn or by its task."""

    def __init__(self, redis: Redis, *, retry_for: float = 0.75) -> None:
        super().__init__(redis, retry_for=retry_for)
        self.round_trips: list[int] = []

    def _commands(self, batch: list[Any], command: str) -> list[list[Any]]:
        self.round_trips.append(len(batch))
        return super()._commands(batch, command)


async def connected(appender: Appender, redis: Redis) -> None:
    """One call answered (its script loaded through ``redis``, a client of the same server): the
    appender's connection is open, so its next round trips are written from the caller's turn."""
    warm = define("WARM", "return 1")
    await redis.script_load(warm.lua)
    assert await appender.call(warm, ["warm"], []) == 1


async def test_calls_made_together_share_one_round_trip(redis: Redis) -> None:
    appender, script = CountingAppender(redis), define("INCR", INCR)
    await redis.script_load(script.lua)  # or the first round trip is followed by one that loads it
    answers = await asyncio.gather(*(appender.call(script, [f"k{n}"], [str(n)]) for n in range(10)))
    assert answers == list(range(10))
    assert appender.round_trips == [10]


async def test_calls_made_while_one_is_in_flight_go_together_in_the_next(redis: Redis) -> None:
    appender, script = CountingAppender(redis), define("INCR", INCR)
    await redis.script_load(script.lua)
    await connected(appender, redis)
    first = asyncio.ensure_future(appender.call(script, ["k"], ["1"]))
    await asyncio.sleep(0)  # the first round trip is under way
    rest = await asyncio.gather(*(appender.call(script, ["k"], ["1"]) for _ in range(5)))
    assert await first == 1
    assert rest == [2, 3, 4, 5, 6]  # in the order they were made
    assert appender.round_trips == [1, 1, 5]


async def test_on_an_open_connection_a_round_trip_costs_no_task(redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    # a token that arrives alone is written and answered by callbacks: a task per round trip was a
    # third of what a lone token cost a worker (docs/benchmarks.md)
    appender, script = CountingAppender(redis), define("INCR", INCR)
    await redis.script_load(script.lua)
    await connected(appender, redis)

    tasks = tasks_made(monkeypatch)
    for n in range(1, 4):
        assert await appender.call(script, ["k"], ["1"]) == n
    assert appender.round_trips == [1, 1, 1, 1]
    assert tasks == []


def tasks_made(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The coroutines made into tasks from here on (they still run)."""
    made: list[str] = []
    create_task = asyncio.create_task

    def recording(coro: Any, **kwargs: Any) -> Any:
        made.append(getattr(coro, "__qualname__", repr(coro)))
        return create_task(coro, **kwargs)

    monkeypatch.setattr(asyncio, "create_task", recording)
    return made


async def test_a_call_made_while_a_round_trip_timed_out_gets_a_window_of_its_own(redis: Redis) -> None:
    # Redis stalls past the window of the round trip on the wire: its callers hear a timeout, but a
    # call another chat made meanwhile goes next, in a window that opens when it is sent
    appender, script = Appender(redis, retry_for=0.3), define("INCR", INCR)
    await redis.script_load(script.lua)
    await connected(appender, redis)
    await redis.execute_command("CLIENT", "PAUSE", "450", "WRITE")
    stalled = asyncio.ensure_future(appender.call(script, ["k"], ["1"]))
    await asyncio.sleep(0.2)
    meanwhile = asyncio.ensure_future(appender.call(script, ["j"], ["1"]))
    with pytest.raises(RedisTimeoutError):
        await stalled
    assert await meanwhile == 1


async def test_closing_it_with_a_round_trip_on_the_wire_cancels_its_callers(redis: Redis) -> None:
    appender, script = Appender(redis), define("INCR", INCR)
    await redis.script_load(script.lua)
    await connected(appender, redis)
    calls = [asyncio.ensure_future(appender.call(script, ["k"], ["1"])) for _ in range(3)]
    while appender._lanes[""].flight is None:  # written, not yet answered
        await asyncio.sleep(0)
    await appender.close()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results), results


async def test_a_script_forgotten_is_sent_again_alone_and_the_others_run_once(redis: Redis) -> None:
    appender, known, forgotten = CountingAppender(redis), define("INCR", INCR), define("INCR2", INCR + " ")
    await connected(appender, redis)
    await redis.script_flush()  # as after a Redis restart
    await redis.script_load(known.lua)
    answers = await asyncio.gather(appender.call(known, ["k"], ["1"]), appender.call(forgotten, ["j"], ["5"]))
    assert answers == [1, 5]
    assert await redis.get("k") == b"1"  # not run twice: only the NOSCRIPT call went again
    assert appender.round_trips == [1, 2, 1]  # the warm-up's; both; the forgotten one as EVAL


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


async def test_a_round_trip_whose_connection_dropped_is_sent_again_within_its_window(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failover or a proxy's reset breaks the socket mid-round-trip: the same calls go again (the
    # sink's sequence numbers make one Redis already applied harmless), while the leases still hold.
    appender, script = CountingAppender(redis), define("INCR", INCR)
    await redis.script_load(script.lua)
    await connected(appender, redis)
    drops, send = 2, _Wire.send

    def dropping(wire: _Wire, commands: Any, deadline: float) -> Any:
        nonlocal drops
        if drops and commands[0][0] == "EVALSHA":  # (not a new connection's handshake)
            drops -= 1
            wire.drop(RedisConnectionError("Connection closed by server."))
        return send(wire, commands, deadline)

    monkeypatch.setattr(_Wire, "send", dropping)
    assert await asyncio.gather(appender.call(script, ["k"], ["1"]), appender.call(script, ["j"], ["2"])) == [1, 2]
    assert appender.round_trips == [1, 2, 2, 2]  # written from the callers' turn, then twice by the task


async def test_a_connection_that_stays_down_past_the_window_reaches_the_callers(redis: Redis) -> None:
    class Down(Appender):
        async def _execute(self, batch: list[Any], command: str = "EVALSHA") -> list[Any]:
            raise RedisConnectionError("Connection refused.")

    appender, script = Down(redis, retry_for=0.2), define("INCR", INCR)
    started = asyncio.get_running_loop().time()
    with pytest.raises(RedisConnectionError):
        await appender.call(script, ["k"], ["1"])
    assert 0.1 <= asyncio.get_running_loop().time() - started < 1.0


@pytest.mark.parametrize("answered", [0, 1], ids=["a-new-connection", "an-open-connection"])
async def test_a_connection_gone_silent_costs_one_attempt_and_the_next_goes_on_a_new_one(
    redis_url: str, answered: int
) -> None:
    # a host gone without a word, or a NAT that dropped the mapping: no reset ever comes. The round
    # trip is given up after the client's socket timeout, in time for another attempt on a new
    # connection, not held until the whole window has passed. On an open connection the first
    # attempt is written from the caller's turn; the retry is the task's, within the same window.
    real = urlsplit(redis_url)
    connections = 0

    async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, reads: float = math.inf) -> None:
        """Passes ``reads`` reads on, then swallows the rest (a peer gone silent)."""
        try:
            while data := await source.read(65536):
                if reads > 0:
                    sink.write(data)
                reads -= 1
        except ConnectionError:
            pass
        finally:
            sink.close()

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        upstream_reader, upstream_writer = await asyncio.open_connection(real.hostname, real.port)
        # the first connection: its handshake (SELECT) and ``answered`` round trips go through, then nothing does
        reads = 1 + answered if connections == 1 else math.inf
        await asyncio.gather(pump(reader, upstream_writer, reads), pump(upstream_reader, writer))

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = connect(f"redis://127.0.0.1:{port}{real.path}", max_connections=2, socket_timeout=0.3)
    try:
        appender, script = CountingAppender(client, retry_for=3), define("INCR", INCR)
        if answered:
            direct = Redis.from_url(redis_url)
            await connected(appender, direct)
            await direct.aclose()
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await appender.call(script, ["k"], ["1"]) == 1
        assert 0.3 <= loop.time() - started < 2
        assert connections == 2
        await appender.close()
    finally:
        await client.aclose(close_connection_pool=True)
        server.close()
        await server.wait_closed()
