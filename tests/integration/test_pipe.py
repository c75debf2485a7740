"""The hot path's Redis connection: replies in order, to the batch that asked, whatever goes wrong."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import fakeredis
import hiredis
import pytest
import uvloop
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streambridge.shared.pipe import Pipe, pipe_for
from streambridge.shared.redis import connect
from tests.conftest import OwnRedis


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = connect(redis_url, max_connections=2)
    yield client
    await client.aclose(close_connection_pool=True)


@pytest.fixture
async def pipe(redis: Redis) -> AsyncIterator[Pipe]:
    made = pipe_for(redis)
    assert made is not None
    yield made
    await made.close()


def soon(seconds: float = 5.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_each_batch_gets_its_own_replies_in_order_however_many_overlap(pipe: Pipe) -> None:
    batches = [[["INCRBY", "sb:test:pipe", 1], ["GET", "sb:test:pipe"]] for _ in range(20)]
    answers = await asyncio.gather(*(pipe.execute(b, deadline=soon()) for b in batches))
    assert answers == [[n, str(n).encode()] for n in range(1, 21)]


async def test_an_error_reply_is_returned_as_redis_pys_exception_to_its_command_alone(pipe: Pipe, redis: Redis) -> None:
    await redis.set("sb:test:text", "not a number")
    good, unknown, wrong = await pipe.execute(
        [["PING"], ["EVALSHA", "0" * 40, 0], ["INCR", "sb:test:text"]], deadline=soon()
    )
    assert good == b"PONG"
    assert isinstance(unknown, NoScriptError)
    assert isinstance(wrong, ResponseError)
    assert "not an integer" in str(wrong)


async def test_it_connects_as_the_clients_url_says() -> None:
    server = OwnRedis("--requirepass", "s3cret")
    try:
        client = connect(f"redis://default:s3cret@127.0.0.1:{server.port}/7?client_name=sb-pipe", max_connections=1)
        pipe = pipe_for(client)
        assert pipe is not None
        await pipe.execute([["SET", "sb:test:where", "here"]], deadline=soon())
        assert await client.get("sb:test:where") == b"here"  # database 7, as the client's
        assert b"name=sb-pipe" in (await pipe.execute([["CLIENT", "INFO"]], deadline=soon()))[0]
        await pipe.close()
        wrong = pipe_for(connect(f"redis://:wrong@127.0.0.1:{server.port}/0", max_connections=1))
        assert wrong is not None
        with pytest.raises(RedisConnectionError):  # redis-py's AuthenticationError is one
            await wrong.execute([["PING"]], deadline=soon())
        await client.aclose(close_connection_pool=True)
    finally:
        server.stop()


async def test_it_speaks_tls_when_the_url_says_rediss(tls_redis: int) -> None:
    client = connect(f"rediss://127.0.0.1:{tls_redis}/0?ssl_cert_reqs=none", max_connections=1)
    pipe = pipe_for(client)
    assert pipe is not None
    assert await pipe.execute([["PING"]], deadline=soon()) == [b"PONG"]
    await pipe.close()
    await client.aclose(close_connection_pool=True)


async def test_a_silent_redis_times_out_every_batch_in_flight_and_the_next_call_reconnects() -> None:
    heard: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.append(await reader.read(1000))  # and never a word back
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pipe = pipe_for(connect(f"redis://127.0.0.1:{port}/0", max_connections=1))
    assert pipe is not None
    loop = asyncio.get_running_loop()
    started = loop.time()
    late = asyncio.gather(
        pipe.execute([["PING"]], deadline=loop.time() + 0.2),
        pipe.execute([["PING"]], deadline=loop.time() + 5),
        return_exceptions=True,
    )
    assert all(isinstance(a, RedisTimeoutError) for a in await late)  # the first's deadline drops both
    assert loop.time() - started < 2
    with pytest.raises(RedisTimeoutError):
        await pipe.execute([["PING"]], deadline=loop.time() + 0.1)
    assert len(heard) == 2  # a new connection for the next call
    await pipe.close()
    server.close()
    await server.wait_closed()


async def test_a_connection_redis_drops_fails_its_batches_and_the_next_call_reconnects(
    pipe: Pipe, redis: Redis
) -> None:
    await pipe.execute([["CLIENT", "SETNAME", "sb-pipe-dropped"]], deadline=soon())
    blocked = asyncio.ensure_future(pipe.execute([["BLPOP", "sb:test:never", 10]], deadline=soon(20)))
    await asyncio.sleep(0.1)
    assert await redis.client_kill_filter(_type="normal", skipme=True) >= 1
    with pytest.raises(RedisConnectionError):
        await blocked
    assert await pipe.execute([["PING"]], deadline=soon()) == [b"PONG"]


async def test_a_caller_cancelled_mid_round_trip_leaves_the_connection_in_step(pipe: Pipe, redis: Redis) -> None:
    slow = asyncio.ensure_future(pipe.execute([["BLPOP", "sb:test:list", 2]], deadline=soon()))
    await asyncio.sleep(0.05)
    slow.cancel()
    await redis.rpush("sb:test:list", "x")
    assert await pipe.execute([["ECHO", "mine"]], deadline=soon()) == [b"mine"]  # not the BLPOP's reply


async def test_a_caller_gone_when_its_connection_closes_leaves_no_unretrieved_error(pipe: Pipe) -> None:
    # a worker stopping: its appends' sender is cancelled mid-round trip, then the Pipe closed
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        slow = asyncio.ensure_future(pipe.execute([["BLPOP", "sb:test:never", 2]], deadline=soon()))
        await asyncio.sleep(0.05)
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
        await pipe.close()
        await asyncio.sleep(0)
        gc.collect()  # an unretrieved error is reported when its future is collected
        assert not reported, reported
    finally:
        loop.set_exception_handler(None)


async def test_a_closed_pipe_refuses_calls(pipe: Pipe) -> None:
    await pipe.close()
    with pytest.raises(RedisConnectionError):
        await pipe.execute([["PING"]], deadline=soon())


async def test_a_command_that_cannot_be_packed_leaves_the_next_batches_their_own_replies(pipe: Pipe) -> None:
    with pytest.raises(TypeError):
        await pipe.execute([["SET", "sb:test:bad", None]], deadline=soon())  # type: ignore[list-item]
    assert await pipe.execute([["ECHO", "a"], ["ECHO", "b"]], deadline=soon()) == [b"a", b"b"]
    assert await pipe.execute([], deadline=soon()) == []


async def test_a_batch_past_its_deadline_is_not_sent_and_the_connection_stays(pipe: Pipe, redis: Redis) -> None:
    await pipe.execute([["CLIENT", "SETNAME", "sb-pipe-stays"]], deadline=soon())
    with pytest.raises(RedisTimeoutError):
        await pipe.execute([["INCR", "sb:test:late"]], deadline=asyncio.get_running_loop().time() - 1)
    assert await redis.get("sb:test:late") is None
    assert (await pipe.execute([["CLIENT", "GETNAME"]], deadline=soon())) == [b"sb-pipe-stays"]


class SlowHandshake:
    """A RESP server that answers +OK to every command, the first connection's first only after a while."""

    def __init__(self, delay: float) -> None:
        self.delay, self.connections = delay, 0
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first, parser = self.connections == 1, hiredis.Reader()
        self.writers.append(writer)
        try:
            while data := await reader.read(1000):
                parser.feed(data)
                while parser.gets() is not False:
                    if first:
                        await asyncio.sleep(self.delay)
                        first = False
                    writer.write(b"+OK\r\n")
        except ConnectionResetError:
            pass  # the client aborted its connection
        finally:
            writer.close()


async def test_a_connect_every_caller_gave_up_on_leaves_the_next_call_a_fresh_connection() -> None:
    fake = SlowHandshake(delay=0.3)
    server = await asyncio.start_server(fake.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = connect(f"redis://:pw@127.0.0.1:{port}/0", max_connections=1)
    pipe = pipe_for(client)
    assert pipe is not None
    try:
        with pytest.raises(TimeoutError):  # its AUTH is answered late; the caller is cancelled before
            async with asyncio.timeout(0.05):  # (an outer timeout, as on a cluster)
                await pipe.execute([["PING"]], deadline=soon())
        await asyncio.sleep(0.4)  # the connection completes with nobody waiting for it
        assert await pipe.execute([["PING"]], deadline=soon()) == [b"OK"]
        fake.writers[0].close()  # then drops
        await asyncio.sleep(0.1)
        assert await pipe.execute([["PING"]], deadline=soon()) == [b"OK"]  # a fresh connection, no stale one
        assert fake.connections == 2
    finally:
        await pipe.close()
        await client.aclose(close_connection_pool=True)
        server.close()
        await server.wait_closed()


def test_clients_without_sockets_keep_redis_pys_path() -> None:
    assert pipe_for(fakeredis.FakeAsyncRedis()) is None


def test_it_works_on_uvloop_as_the_processes_run_it(redis_url: str) -> None:
    """uvloop's transports are not asyncio's classes: the same calls, a drop and a reconnect, there."""

    async def calls() -> None:
        client = connect(redis_url, max_connections=1)
        pipe = pipe_for(client)
        assert pipe is not None
        batches = [[["INCRBY", "sb:test:uv", 1]] for _ in range(5)]
        assert await asyncio.gather(*(pipe.execute(b, deadline=soon()) for b in batches)) == [[n] for n in range(1, 6)]
        blocked = asyncio.ensure_future(pipe.execute([["BLPOP", "sb:test:never", 10]], deadline=soon(20)))
        await asyncio.sleep(0.1)
        await client.client_kill_filter(_type="normal", skipme=True)
        with pytest.raises(RedisConnectionError):
            await blocked
        assert await pipe.execute([["GET", "sb:test:uv"]], deadline=soon()) == [b"5"]
        await pipe.close()
        await client.aclose(close_connection_pool=True)

    uvloop.run(calls())
