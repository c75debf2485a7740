"""Connections made by ``shared.redis`` pack commands with hiredis, byte for byte as redis-py's
own packer does, and talk to a real Redis as before."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from streambridge.shared.redis import connect, pack_with_hiredis

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


async def test_a_client_made_elsewhere_packs_with_hiredis_and_still_works(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    await client.set("before", "1")  # a connection made before the switch is dropped by it
    await pack_with_hiredis(client)
    packing = client.connection_pool.connection_class
    assert packing is not Connection
    assert issubclass(packing, Connection)
    async with client.pipeline(transaction=False) as pipe:
        pipe.set("after", "2").get("before").get("after")
        assert await pipe.execute() == [True, b"1", b"2"]
    await client.aclose()
