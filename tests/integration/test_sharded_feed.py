"""The edge's sharded Pub/Sub feed on a real 6-node Redis Cluster: one connection per primary;
a slot that moves, a primary killed, a stale slot map each end with the channel subscribed at its
new owner and a gap reported, so its readers re-read the stream and miss nothing."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from redis.crc import key_slot

from streambridge.api.shards import ShardedFeed
from streambridge.shared.redis import StreamsCluster, connect_streams
from tests.cluster import Node, RedisCluster


class Heard:
    """What a feed reports: its messages, and the channels whose subscription it confirmed."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self.gaps: list[bytes] = []

    def on_message(self, channel: bytes, data: bytes) -> None:
        self.messages.append((channel, data))

    def heard(self, channel: str) -> list[bytes]:
        return [data for c, data in self.messages if c == channel.encode()]

    def gaps_of(self, channel: str) -> int:
        return self.gaps.count(channel.encode())

    async def until(self, check: Callable[[], bool], timeout: float = 15) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.01)


@pytest.fixture
def heard() -> Heard:
    return Heard()


async def running_feed(cluster: RedisCluster, heard: Heard) -> AsyncIterator[ShardedFeed]:
    client = connect_streams(cluster.url, max_connections=1)
    assert isinstance(client, StreamsCluster)
    feed = ShardedFeed(client, heard.on_message, heard.gaps.append)
    await feed.start()
    yield feed
    await feed.close()
    await client.aclose()


@pytest.fixture
async def feed(redis_cluster: RedisCluster, heard: Heard) -> AsyncIterator[ShardedFeed]:
    async for feed in running_feed(redis_cluster, heard):
        yield feed


@pytest.fixture
async def fresh_feed(fresh_redis_cluster: RedisCluster, heard: Heard) -> AsyncIterator[ShardedFeed]:
    async for feed in running_feed(fresh_redis_cluster, heard):
        yield feed


def notify(chat: str) -> str:
    return f"sb-test-{uuid.uuid4().hex[:6]}:chat:{{{chat}}}:notify"


def spread(cluster: RedisCluster) -> list[str]:
    """A notification channel on each primary."""
    channels: dict[int, str] = {}
    for n in range(1000):
        channel = notify(f"c{n}")
        channels.setdefault(cluster.owner_of(channel).port, channel)
        if len(channels) == 3:
            return list(channels.values())
    raise AssertionError("no channels spread over the 3 primaries")


def spublish(node: Node, channel: str, data: bytes) -> int:
    """As the worker's APPEND script does: to the channel's shard, from its primary."""
    return int(node.client.execute_command("SPUBLISH", channel, data))


def shard_subscribers(node: Node) -> list[dict[str, str]]:
    return [c for c in node.client.client_list() if int(c.get("ssub", 0)) > 0]


async def test_messages_on_every_primary_reach_the_feed_over_one_connection_each(
    redis_cluster: RedisCluster, feed: ShardedFeed, heard: Heard
) -> None:
    channels = spread(redis_cluster)
    same_slot = channels[0].replace(":notify", ":other")  # another channel of the first one's slot
    for channel in [*channels, same_slot]:
        feed.subscribe(channel)
    await heard.until(lambda: sorted(heard.gaps) == sorted(c.encode() for c in [*channels, same_slot]))
    assert feed.connected()
    for n, channel in enumerate(channels):
        assert spublish(redis_cluster.owner_of(channel), channel, b"%d" % n) == 1
    await heard.until(lambda: all(heard.heard(c) == [b"%d" % n] for n, c in enumerate(channels)))
    for primary in redis_cluster.primaries():
        (subscriber,) = shard_subscribers(primary)  # one connection per primary, however many channels
        assert int(subscriber["ssub"]) == (2 if primary is redis_cluster.owner_of(channels[0]) else 1)


async def test_a_dropped_connection_subscribes_again_by_slot_and_reports_a_gap(
    redis_cluster: RedisCluster, feed: ShardedFeed, heard: Heard
) -> None:
    channel = spread(redis_cluster)[0]
    same_slot = channel.replace(":notify", ":other")
    feed.subscribe(channel)
    feed.subscribe(same_slot)
    await heard.until(lambda: heard.gaps_of(channel) == heard.gaps_of(same_slot) == 1)
    owner = redis_cluster.owner_of(channel)
    (subscriber,) = shard_subscribers(owner)
    owner.client.client_kill_filter(_id=subscriber["id"])
    await heard.until(lambda: heard.gaps_of(channel) == heard.gaps_of(same_slot) == 2 and feed.connected())
    spublish(owner, channel, b"after")
    await heard.until(lambda: heard.heard(channel) == [b"after"])


async def test_an_unsubscribed_channel_hears_nothing_more(
    redis_cluster: RedisCluster, feed: ShardedFeed, heard: Heard
) -> None:
    channel, other = spread(redis_cluster)[:2]
    feed.subscribe(channel)
    feed.subscribe(other)
    await heard.until(lambda: heard.gaps_of(channel) == heard.gaps_of(other) == 1)
    feed.unsubscribe(channel)
    owner = redis_cluster.owner_of(channel)
    await heard.until(lambda: spublish(owner, channel, b"nobody") == 0)
    spublish(redis_cluster.owner_of(other), other, b"marker")  # heard after anything sent before it
    await heard.until(lambda: heard.heard(other) == [b"marker"])
    await asyncio.sleep(0.2)
    assert heard.heard(channel) == []
    assert heard.gaps_of(channel) == 1, "its own unsubscribe's confirmation is not taken for a moved slot"
    assert feed.connected()


async def test_a_channel_unsubscribed_and_subscribed_again_at_once_is_not_taken_for_a_moved_slot(
    redis_cluster: RedisCluster, feed: ShardedFeed, heard: Heard, caplog: pytest.LogCaptureFixture
) -> None:
    channel = spread(redis_cluster)[0]
    feed.subscribe(channel)
    await heard.until(lambda: heard.gaps_of(channel) == 1)
    with caplog.at_level(logging.INFO, "streambridge.edge"):
        feed.unsubscribe(channel)  # the last reader leaves, and a new one comes before Redis confirms
        feed.subscribe(channel)
        await heard.until(lambda: heard.gaps_of(channel) == 2)
        spublish(redis_cluster.owner_of(channel), channel, b"still here")
        await heard.until(lambda: heard.heard(channel) == [b"still here"])
    assert "slot moved" not in caplog.text
    assert heard.gaps_of(channel) == 2


async def test_close_releases_every_connection(redis_cluster: RedisCluster, heard: Heard) -> None:
    channels = spread(redis_cluster)
    ports = set()
    async for feed in running_feed(redis_cluster, heard):
        for channel in channels:
            feed.subscribe(channel)
        await heard.until(lambda: len(heard.gaps) == 3)
        ports = {t.get_extra_info("sockname")[1] for t in (n._transport for n in feed._nodes.values()) if t}
        assert len(ports) == 3

    def released() -> bool:
        clients = [c for p in redis_cluster.primaries() for c in p.client.client_list()]
        return not {int(c["addr"].rsplit(":", 1)[1]) for c in clients} & ports

    await heard.until(released, timeout=2)


async def test_a_migrated_slot_is_subscribed_at_its_new_owner_and_reported_as_a_gap(
    fresh_redis_cluster: RedisCluster, fresh_feed: ShardedFeed, heard: Heard, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = fresh_redis_cluster
    channel, other = spread(cluster)[:2]
    feed = fresh_feed
    feed.subscribe(channel)
    feed.subscribe(other)
    await heard.until(lambda: heard.gaps_of(channel) == heard.gaps_of(other) == 1)
    src = cluster.owner_of(channel)
    dst = next(p for p in cluster.primaries() if p is not src)
    with caplog.at_level(logging.INFO, "streambridge.edge"):
        await asyncio.to_thread(cluster.migrate_slot, key_slot(channel.encode()), dst)
        await heard.until(lambda: heard.gaps_of(channel) == 2 and feed.connected())
    assert "its slot moved" in caplog.text, "the source's unasked sunsubscribe was followed"
    assert shard_subscribers(src) == [], "nothing left subscribed at the old owner"
    assert spublish(dst, channel, b"moved") == 1
    await heard.until(lambda: heard.heard(channel) == [b"moved"])
    assert heard.gaps_of(other) == 1, "channels of other slots are left alone"


async def test_a_stale_slot_map_is_corrected_by_moved(
    fresh_redis_cluster: RedisCluster, fresh_feed: ShardedFeed, heard: Heard, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = fresh_redis_cluster
    channel = spread(cluster)[0]
    src = cluster.owner_of(channel)
    dst = next(p for p in cluster.primaries() if p is not src)
    # moved while the feed has nothing on it: nobody tells the feed, its map is stale
    await asyncio.to_thread(cluster.migrate_slot, key_slot(channel.encode()), dst)
    with caplog.at_level(logging.INFO, "streambridge.edge"):
        fresh_feed.subscribe(channel)
        await heard.until(lambda: heard.gaps_of(channel) == 1 and fresh_feed.connected())
    assert f"is on 127.0.0.1:{dst.port}" in caplog.text, "the SSUBSCRIBE went to the old owner, and was MOVED"
    assert spublish(dst, channel, b"found") == 1
    await heard.until(lambda: heard.heard(channel) == [b"found"])


async def test_a_killed_primarys_channels_come_back_on_its_promoted_replica(
    fresh_redis_cluster: RedisCluster, fresh_feed: ShardedFeed, heard: Heard
) -> None:
    cluster = fresh_redis_cluster
    channel, other = spread(cluster)[:2]
    feed = fresh_feed
    feed.subscribe(channel)
    feed.subscribe(other)
    await heard.until(lambda: heard.gaps_of(channel) == heard.gaps_of(other) == 1)
    victim = cluster.owner_of(channel)
    late = next(c for c in (notify(f"late{n}") for n in range(1000)) if cluster.owner_of(c) is victim)
    cluster.kill(victim)
    killed = time.monotonic()
    await heard.until(lambda: not feed.connected(), timeout=2)
    feed.subscribe(late)  # a reader comes while its slot's primary is dead
    await heard.until(lambda: heard.gaps_of(channel) == 2 and heard.gaps_of(late) == 1, timeout=20)
    await heard.until(feed.connected)
    took = time.monotonic() - killed
    promoted = await asyncio.to_thread(cluster.wait_failover, victim)
    assert spublish(promoted, channel, b"after failover") == 1
    assert spublish(promoted, late, b"late") == 1
    await heard.until(lambda: heard.heard(channel) == [b"after failover"] and heard.heard(late) == [b"late"])
    assert spublish(cluster.owner_of(other), other, b"still") == 1
    await heard.until(lambda: heard.heard(other) == [b"still"])
    assert heard.gaps_of(other) == 1, "the other primaries' channels were not disturbed"
    print(f"subscribed again on the promoted replica {took:.2f} s after the kill")
