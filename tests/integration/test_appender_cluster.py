"""The worker's appends on a real 6-node Redis Cluster: one plain pipeline per primary, a primary's
death felt by its own chats alone, and durable calls on the replica before they are answered."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from streambridge.shared.machine import define
from streambridge.shared.redis import StreamsCluster, connect_streams
from streambridge.workers.appender import WAIT_MS, Appender, Waiting
from tests.cluster import Node, RedisCluster

# A batch fenced by its sequence number, as APPEND is: a re-sent one is skipped (0), a new one logged (1).
LOG = define(
    "TEST_LOG",
    """
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) <= last then return 0 end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[1], ARGV[1])
return 1
""",
)


class Counting(Appender):
    """Counts the pipelines sent, each as (node, command, calls)."""

    def __init__(self, redis: StreamsCluster, **kwargs: Any) -> None:
        super().__init__(redis, **kwargs)
        self.pipelines: list[tuple[str, str, int]] = []

    async def _pipeline(self, redis: Any, batch: list[Waiting], *, command: str = "EVALSHA", node: str = "") -> Any:
        self.pipelines.append((node, command, len(batch)))
        return await super()._pipeline(redis, batch, command=command, node=node)


def log_keys(prefix: str, chat: str) -> list[str]:
    return [f"{prefix}:{{{chat}}}:log", f"{prefix}:{{{chat}}}:seq"]


def chats_on_primaries(cluster: RedisCluster, prefix: str) -> dict[str, Node]:
    """A chat id for each primary, with the primary its keys live on."""
    chats: dict[str, Node] = {}
    for n in range(1000):
        owner = cluster.owner_of(log_keys(prefix, f"c{n}")[0])
        if owner not in chats.values():
            chats[f"c{n}"] = owner
        if len(chats) == 3:
            return chats
    raise AssertionError("no chat ids spread over the 3 primaries")


@pytest.fixture
def prefix() -> str:
    return f"sb-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def client(redis_cluster: RedisCluster) -> AsyncIterator[StreamsCluster]:
    streams = connect_streams(redis_cluster.url, max_connections=4)
    assert isinstance(streams, StreamsCluster)
    yield streams
    await streams.aclose()


async def test_calls_for_chats_on_every_primary_share_one_round_trip_per_node(
    redis_cluster: RedisCluster, client: StreamsCluster, prefix: str
) -> None:
    chats = chats_on_primaries(redis_cluster, prefix)
    for node in chats.values():
        node.client.script_load(LOG.lua)
    appender = Counting(client)
    try:
        for round_trip in (1, 2):  # the first before the slot map is read, the second after
            calls = [appender.call(LOG, log_keys(prefix, chat), [str(round_trip)]) for chat in chats for _ in range(10)]
            assert await asyncio.gather(*calls) == [1, 0, 0, 0, 0, 0, 0, 0, 0, 0] * 3
            assert sorted(appender.pipelines) == sorted((n.address, "EVALSHA", 10) for n in chats.values())
            appender.pipelines.clear()
    finally:
        await appender.close()


def appender_connections(node: Node) -> set[int]:
    """The ids of ``node``'s clients but the test's own and its replica's link."""
    own = node.client.client_id()
    return {int(c["id"]) for c in node.client.client_list() if c["id"] != str(own) and "S" not in c["flags"]}


async def test_a_primary_killed_mid_append_stalls_its_own_chats_alone_and_loses_no_batch(
    fresh_redis_cluster: RedisCluster, prefix: str
) -> None:
    cluster = fresh_redis_cluster
    chats = chats_on_primaries(cluster, prefix)
    doomed_chat, doomed = next(iter(chats.items()))
    healthy = [node for node in chats.values() if node is not doomed]
    replica = cluster.replica_of(doomed)
    streams = connect_streams(cluster.url, max_connections=4)
    assert isinstance(streams, StreamsCluster)
    appender = Counting(streams, retry_for=15)
    sent = dict.fromkeys(chats, 0)
    stop = asyncio.Event()

    async def stream(chat: str) -> None:  # a chat's sink: one batch in flight, the next after its answer
        while not stop.is_set():
            seq = sent[chat] + 1
            # durable: a batch answered is on the replica, so the failover cannot lose it
            assert await appender.call(LOG, log_keys(prefix, chat), [str(seq)], durable=chat == doomed_chat) == 1
            sent[chat] = seq
            await asyncio.sleep(0.005)

    streaming = [asyncio.create_task(stream(chat)) for chat in chats]
    try:
        while min(sent.values()) < 5:
            await asyncio.sleep(0.01)
        before = {node.port: appender_connections(node) for node in healthy}
        assert all(before.values())
        assert replica.client.script_exists(LOG.sha) == [False], "scripts don't replicate"
        cluster.kill(doomed)
        killed_at, at_kill = time.monotonic(), dict(sent)
        promoted = await asyncio.to_thread(cluster.wait_failover, doomed)
        failover_took = time.monotonic() - killed_at
        during = {chat: sent[chat] - at_kill[chat] for chat in chats}
        resumed_at = sent[doomed_chat]
        while sent[doomed_chat] < resumed_at + 3:  # the dead node's chat goes on, on the promoted replica
            assert all(not task.done() for task in streaming), [t.exception() for t in streaming if t.done()]
            await asyncio.sleep(0.01)
        after = {node.port: appender_connections(node) for node in healthy}
        stop.set()
        await asyncio.gather(*streaming)
    finally:
        stop.set()
        for task in streaming:
            task.cancel()
        await appender.close()
        await streams.aclose()
    print(f"failover {failover_took:.2f} s; batches meanwhile per chat {during}")
    assert promoted is replica
    for node in healthy:  # their chats went on meanwhile, over the very same connections
        chat = next(c for c, n in chats.items() if n is node)
        assert during[chat] >= 20, during
        assert before[node.port] <= after[node.port], "a healthy node's connection was dropped"
    for chat, node in chats.items():
        owner = promoted if node is doomed else node
        logged = [int(seq) for seq in owner.client.lrange(log_keys(prefix, chat)[0], 0, -1)]
        assert logged == list(range(1, sent[chat] + 1)), f"{chat}: every batch exactly once"
    assert (promoted.address, "EVAL", 1) in appender.pipelines, "NOSCRIPT on the promoted replica"
    assert promoted.client.script_exists(LOG.sha) == [True]


async def test_a_durable_call_is_answered_once_the_replica_has_it(
    fresh_redis_cluster: RedisCluster, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = fresh_redis_cluster
    chat, primary = next(iter(chats_on_primaries(cluster, prefix).items()))
    replica = cluster.replica_of(primary)
    streams = connect_streams(cluster.url, max_connections=4)
    assert isinstance(streams, StreamsCluster)
    appender = Appender(streams, retry_for=5)
    keys = log_keys(prefix, chat)
    try:
        assert await appender.call(LOG, keys, ["1"], durable=True) == 1
        # a replica that does not answer: the write waits for it, WAIT gives up, the answer comes anyway
        os.kill(replica.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with caplog.at_level(logging.WARNING, "streambridge.appender"):
                assert await appender.call(LOG, keys, ["2"], durable=True) == 1
                assert await appender.call(LOG, keys, ["3"], durable=True) == 1
            waited = time.monotonic() - started
            assert waited >= 2 * WAIT_MS / 1000 * 0.9
            assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1, "logged once"
            assert "no replica" in caplog.records[0].message
            # a replica back in time: the answer waits for it
            answer = asyncio.ensure_future(appender.call(LOG, keys, ["4"], durable=True))
            await asyncio.sleep(0.2)
            assert not answer.done(), "answered before the replica had it"
        finally:
            os.kill(replica.process.pid, signal.SIGCONT)
        assert await answer == 1
        cluster.kill(primary)  # at once: nothing more is replicated from here
    finally:
        await appender.close()
        await streams.aclose()
    promoted = await asyncio.to_thread(cluster.wait_failover, primary)
    assert promoted is replica
    assert replica.client.lrange(keys[0], 0, -1) == [b"1", b"2", b"3", b"4"]
