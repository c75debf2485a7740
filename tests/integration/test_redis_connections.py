"""Connections made by ``shared.redis`` pack commands with hiredis, byte for byte as redis-py's
own packer does, and talk to a real Redis as before."""

from __future__ import annotations

import asyncio
import random

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from streambridge.shared.redis import connect

COMMANDS = [
    ("EVALSHA", "a" * 40, 2, "k:1", "k:2", "tok", "12", "", b"content", b'{"text":"h\xc3\xa9 \\u2028"}'),
    ("XADD", "stream", "MAXLEN", "~", 10_000, "*", "type", "content", "data", "caf\u00e9 \U0001f600"),
    ("ZADD", "z", 1732500000.125, "member", -3, "other"),
    ("CLIENT LIST",),
    ("SET", b"key", memoryview(b"value")),
]


@pytest.mark.parametrize("command", COMMANDS, ids=[str(c[0]) for c in COMMANDS])
def test_hiredis_packing_sends_the_bytes_redis_py_would(redis_url: str, command: tuple[object, ...]) -> None:
    client = connect(redis_url, max_connections=1)
    ours = client.connection_pool.make_connection()
    theirs = Connection()
    assert type(ours).pack_command is not Connection.pack_command
    assert b"".join(ours.pack_command(*command)) == b"".join(theirs.pack_command(*command))


def test_a_value_redis_cannot_take_is_refused_as_before(redis_url: str) -> None:
    ours = connect(redis_url, max_connections=1).connection_pool.make_connection()
    with pytest.raises(DataError):
        ours.pack_command("SET", "key", None)


async def test_a_cancelled_command_is_cancelled_however_its_timing_falls(redis_url: str) -> None:
    """redis-py's write under ``asyncio.wait_for`` dropped a cancellation that landed as the write
    finished (Python 3.11): the task ran on, and a worker's stop waited for it forever."""
    client = connect(redis_url, max_connections=4)
    lost = asyncio.Event()  # ends a task that ran on, so a failure fails instead of hanging

    async def poll() -> None:
        while not lost.is_set():
            await client.zrange("running", 0, 10)

    try:
        for attempt in range(300):
            task = asyncio.create_task(poll())
            await asyncio.sleep(random.random() * 0.002)
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=1)
            assert done, f"cancellation {attempt} was lost: the task ran on"
    finally:
        lost.set()
        await client.aclose(close_connection_pool=True)  # the pool, with the connections cancelled mid-command
