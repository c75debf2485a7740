"""The per-chat keys' client on a real 6-node Redis Cluster: scripts run on it, and a command
rides out a primary's failover (a NOSCRIPT on the promoted replica included) and a moved slot."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from streambridge.shared import machine
from streambridge.shared import redis as sb_redis
from streambridge.shared.redis import StreamsCluster, connect_streams, is_cluster_url, parse_cluster_url
from tests.cluster import RedisCluster

# One key per script call, as every per-chat script: it counts its calls, and says where it ran.
COUNT = machine.define("TEST_COUNT", "return {redis.call('INCR', KEYS[1]), ARGV[1]}")


def counter(prefix: str, chat: str) -> machine.Call:
    return machine.Call(COUNT, [f"{prefix}:chat:{{{chat}}}:n"], ["ran"])


@pytest.fixture
def prefix() -> str:
    return f"sb-test-{uuid.uuid4().hex[:8]}"


def test_a_cluster_url_names_its_seed_nodes() -> None:
    assert parse_cluster_url("redis-cluster://10.0.0.1:7000,redis-b:7001") == [("10.0.0.1", 7000), ("redis-b", 7001)]
    assert parse_cluster_url("redis-cluster://[::1]:7000") == [("::1", 7000)]
    assert is_cluster_url("redis-cluster://h:1")
    assert not is_cluster_url("redis://h:1/0")
    assert not is_cluster_url("rediss://h:1")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis://h:7000", "not a Redis Cluster URL"),
        ("redis-cluster://h", "must be host:port"),
        ("redis-cluster://h:7000,", "must be host:port"),
        ("redis-cluster://h:port", "must be host:port"),
        ("redis-cluster://h:70000", "must be host:port"),
        ("redis-cluster://h:7000/0", "no path, query or credentials"),
        ("redis-cluster://:pw@h:7000", "no path, query or credentials"),
    ],
)
def test_a_malformed_cluster_url_is_refused_with_its_reason(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_cluster_url(url)


async def test_a_plain_url_gets_the_one_redis_client(redis_url: str) -> None:
    client = connect_streams(redis_url, max_connections=3)
    assert type(client) is Redis
    try:
        assert client.connection_pool.max_connections == 3
        assert await machine.call(client, counter("plain", "a")) == [1, b"ran"]
    finally:
        await client.aclose(close_connection_pool=True)


@pytest.fixture
async def cluster_client(redis_cluster: RedisCluster) -> AsyncIterator[StreamsCluster]:
    client = connect_streams(redis_cluster.url, max_connections=2)
    assert isinstance(client, StreamsCluster)
    yield client
    await client.aclose()


async def test_scripts_run_on_every_primary_with_the_connections_set_up_as_one_redis(
    redis_cluster: RedisCluster, cluster_client: StreamsCluster, prefix: str
) -> None:
    chats = spread_over_primaries(redis_cluster, prefix)
    for chat in chats:
        assert await machine.call(cluster_client, counter(prefix, chat)) == [1, b"ran"]
        assert await machine.call(cluster_client, counter(prefix, chat)) == [2, b"ran"]
    nodes = cluster_client.get_primaries()
    assert {n.port for n in nodes} == {n.port for n in redis_cluster.primaries()}
    for node in nodes:
        assert node.connection_class is sb_redis._TCP, "commands packed by hiredis, written as connect()'s are"
        assert node.connection_kwargs["socket_keepalive_options"] == sb_redis.KEEPALIVE
        assert node.connection_kwargs["socket_timeout"] == 5


async def test_many_commands_at_once_wait_for_a_connection_instead_of_failing(
    redis_cluster: RedisCluster, cluster_client: StreamsCluster, prefix: str
) -> None:
    chats = spread_over_primaries(redis_cluster, prefix)
    await asyncio.gather(*(machine.call(cluster_client, counter(prefix, chats[n % 3])) for n in range(300)))
    assert sorted([int(await cluster_client.get(counter(prefix, chat).keys[0])) for chat in chats]) == [100] * 3
    assert all(len(node._connections) <= 2 for node in cluster_client.get_primaries())


async def test_many_pipelines_at_once_wait_for_a_connection_instead_of_failing(
    redis_cluster: RedisCluster, cluster_client: StreamsCluster, prefix: str
) -> None:
    """As an edge does when a hundred clients open their streams at once (api/edge.py's chat_state):
    redis-py's pipeline takes a node's connection without waiting, and raised MaxConnectionsError."""
    chats = spread_over_primaries(redis_cluster, prefix)

    async def read(chat: str) -> list[object]:
        async with cluster_client.pipeline(transaction=False) as pipe:
            pipe.incr(counter(prefix, chat).keys[0])
            pipe.get(counter(prefix, chat).keys[0])
            return await pipe.execute()

    await asyncio.gather(*(read(chats[n % 3]) for n in range(300)))
    assert sorted([int(await cluster_client.get(counter(prefix, chat).keys[0])) for chat in chats]) == [100] * 3
    assert all(len(node._connections) <= 2 for node in cluster_client.get_primaries())


async def test_a_command_follows_a_slot_that_moved(fresh_redis_cluster: RedisCluster, prefix: str) -> None:
    cluster = fresh_redis_cluster
    client = connect_streams(cluster.url, max_connections=2)
    try:
        call = counter(prefix, "moving")
        assert await machine.call(client, call) == [1, b"ran"]
        slot = key_slot(call.keys[0].encode())
        dst = next(n for n in cluster.primaries() if n is not cluster.owner_of(slot))
        await asyncio.to_thread(cluster.migrate_slot, slot, dst)
        assert await machine.call(client, call) == [2, b"ran"], "MOVED followed; the script loaded on the new owner"
    finally:
        await client.aclose()


async def test_a_pipeline_follows_a_slot_that_moved_within_its_own_turn(
    fresh_redis_cluster: RedisCluster, prefix: str
) -> None:
    """redis-py sends a pipeline's MOVED commands again one by one, through the client: with the
    one turn held by the pipeline, waiting for another would wait forever."""
    cluster = fresh_redis_cluster
    client = connect_streams(cluster.url, max_connections=1)
    try:
        key = counter(prefix, "moving").keys[0]
        assert await client.incr(key) == 1
        slot = key_slot(key.encode())
        dst = next(n for n in cluster.primaries() if n is not cluster.owner_of(slot))
        await asyncio.to_thread(cluster.migrate_slot, slot, dst)
        async with client.pipeline(transaction=False) as pipe:
            pipe.incr(key)
            assert await asyncio.wait_for(pipe.execute(), 10) == [2]
    finally:
        await client.aclose()


async def test_a_script_rides_out_a_primary_killed_and_its_replica_promoted(
    fresh_redis_cluster: RedisCluster, prefix: str
) -> None:
    cluster = fresh_redis_cluster
    client = connect_streams(cluster.url, max_connections=4)
    try:
        call = counter(prefix, "failover")
        assert await machine.call(client, call) == [1, b"ran"]
        owner = cluster.owner_of(call.keys[0])
        replica = cluster.replica_of(owner)
        assert owner.client.execute_command("WAIT", 1, 2000) == 1  # the first INCR is on the replica too
        assert replica.client.execute_command("SCRIPT", "EXISTS", COUNT.sha) == [0], "scripts don't replicate"
        cluster.kill(owner)
        started = time.monotonic()
        # sent at once: the dead node refuses, the cluster is down for a moment, then the replica
        # takes over without the script
        assert await machine.call(client, call) == [2, b"ran"]
        took = time.monotonic() - started
        assert cluster.owner_of(call.keys[0]) is replica
        assert replica.client.execute_command("SCRIPT", "EXISTS", COUNT.sha) == [1]
        print(f"a command waited {took:.2f} s for the failover")
    finally:
        await client.aclose()


def spread_over_primaries(cluster: RedisCluster, prefix: str) -> list[str]:
    """Three chat ids whose keys live on the three primaries, one each."""
    chats: dict[int, str] = {}
    for n in range(1000):
        chat = f"c{n}"
        chats.setdefault(cluster.owner_of(counter(prefix, chat).keys[0]).port, chat)
        if len(chats) == 3:
            return list(chats.values())
    raise AssertionError("no chat ids spread over the 3 primaries")
