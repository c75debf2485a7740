"""The edge's sharded Pub/Sub feed on a Redis Cluster: :class:`api.feed.Feed`'s interface, one
connection per primary.

A chat's notification channel lives in its chat's hash slot (``sb:chat:{id}:notify``), and the
worker announces appends with SPUBLISH, which reaches only the subscribers on that slot's shard,
not every node as PUBLISH does. So each channel is SSUBSCRIBEd on its slot's primary, one slot per
command (two slots in one command are CROSSSLOT); a handful of sockets, however many channels.

The slot map is read (CLUSTER SLOTS) from any node that answers, and read again whenever it may
have changed:

- a node answers an SSUBSCRIBE with MOVED (the map here was stale): the channels of that slot go
  where the map now says;
- a node unsubscribes a channel unasked (``sunsubscribe``): its slot moved away, by resharding or
  a failover;
- a node's connection drops: the node may be dead, and its replica promoted in a few seconds;
  the map is read again, with backoff, until the channel's owner takes the connection.

Every subscription confirmed, at first or again anywhere, is reported through ``on_gap`` as
:class:`Feed` does: messages may have been missed before it, and readers re-read the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Final

import hiredis
from redis.asyncio import RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from streambridge.api.feed import SUBSCRIBE_BATCH, Feed

log = logging.getLogger("streambridge.edge")

Address = tuple[str, int]

#: the slot map is read at most this often, however many redirects come in
MAP_READS_APART: Final = 0.05


def slot_of(channel: str) -> int:
    return key_slot(channel.encode())


class ShardedFeed:
    """``on_message(channel, data)`` for each message; ``on_gap(channel)`` when a subscription is
    confirmed, at first or after any re-subscribe. ``redis`` (a cluster client, best made with
    :func:`shared.redis.connect_streams`) gives the seed nodes and the connections' settings."""

    def __init__(
        self, redis: RedisCluster, on_message: Callable[[bytes, bytes], None], on_gap: Callable[[bytes], None]
    ) -> None:
        self._settings = dict(redis.connection_kwargs)
        if issubclass(self._settings.get("connection_class", object), SSLConnection):
            raise NotImplementedError("the sharded feed speaks plain TCP only: a cluster over TLS is not supported yet")
        self._seeds: list[Address] = [(n.host, int(n.port)) for n in redis.nodes_manager.startup_nodes.values()]
        self.on_message, self.on_gap = on_message, on_gap
        self.channels: set[str] = set()
        self._owners: Sequence[Address | None] = [None] * REDIS_CLUSTER_HASH_SLOTS  # each slot's primary
        self._nodes: dict[Address, _Shard] = {}  # one for each primary
        self._where: dict[str, _Shard] = {}  # each channel's node, subscribed there or about to be
        self._unrouted: set[str] = set()  # channels waiting for the map to say where they go
        self._wakeup = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Reads the map and connects to every primary; raises if the cluster cannot be reached now."""
        await self._settle()
        self._keeper = asyncio.get_running_loop().create_task(self._keep(), name="edge-shards-keeper")

    def subscribe(self, channel: str) -> None:
        """Subscribes now, or once its slot's primary is known and connected."""
        self.channels.add(channel)
        address = self._owners[slot_of(channel)]
        node = self._nodes.get(address) if address is not None else None
        if node is None:
            self._unrouted.add(channel)
            self._wakeup.set()
            return
        self._where[channel] = node
        node.subscribe(channel)

    def unsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)
        self._unrouted.discard(channel)
        node = self._where.pop(channel, None)
        if node is not None:
            node.unsubscribe(channel)

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        for node in self._nodes.values():
            await node.close()
        self._nodes.clear()

    def connected(self) -> bool:
        """Every channel has its node, and every primary's connection is up."""
        return not self._unrouted and bool(self._nodes) and all(n.connected() for n in self._nodes.values())

    # What the nodes report.

    def moved(self, node: _Shard, channels: list[str]) -> None:
        """``channels`` are not ``node``'s any more: they go where the map, read again, says."""
        for channel in channels:
            node.channels.discard(channel)
            if self._where.get(channel) is node:
                del self._where[channel]
            if channel in self.channels:
                self._unrouted.add(channel)
        self._wakeup.set()

    def lost(self, node: _Shard) -> None:
        self._wakeup.set()

    # Keeping every channel on its slot's owner.

    async def _keep(self) -> None:
        delay = 0.05
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self._settle()
                delay = 0.05
                await asyncio.sleep(MAP_READS_APART)
            except Exception as exc:  # a node dead until its replica is promoted, or the map unreadable
                log.warning("edge hub: the Redis Cluster is changing (%s); trying again in %.2f s", exc, delay)
                self._wakeup.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)  # a replica is promoted within seconds: be there soon after

    async def _settle(self) -> None:
        """Reads the map, moves each channel to its slot's primary, connects every primary."""
        self._owners = owners = await self._read_map()
        primaries = set(owners)
        for address in primaries - self._nodes.keys():
            self._nodes[address] = _Shard(self, address, self._settings)
        for channel in list(self.channels):
            node = self._nodes[owners[slot_of(channel)]]
            was = self._where.get(channel)
            if was is not node:
                if was is not None:
                    was.unsubscribe(channel)
                self._where[channel] = node
                node.subscribe(channel)
            self._unrouted.discard(channel)
        for address in self._nodes.keys() - primaries:  # a primary no more: its channels moved above
            await self._nodes.pop(address).close()
        opening = [n.open() for n in self._nodes.values() if not n.connected()]
        failed = [r for r in await asyncio.gather(*opening, return_exceptions=True) if isinstance(r, BaseException)]
        if failed:
            raise failed[0]

    async def _read_map(self) -> list[Address]:
        """Each slot's primary, as the first node to answer says: the primaries known, then the seeds."""
        error: Exception = RedisConnectionError("no node to ask")
        for address in dict.fromkeys([*(a for a, n in self._nodes.items() if n.connected()), *self._seeds]):
            try:
                reply = await _ask(address, self._settings, b"CLUSTER", b"SLOTS")
            except (OSError, TimeoutError, RedisConnectionError, ResponseError) as exc:
                error = exc
                continue
            owners: list[Address | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
            for start, end, primary, *_ in reply:  # type: ignore[attr-defined]
                host = primary[0].decode() if primary[0] not in (b"", b"?") else address[0]
                owners[start : end + 1] = [(host, int(primary[1]))] * (end + 1 - start)
            served = [owner for owner in owners if owner is not None]
            if len(served) != REDIS_CLUSTER_HASH_SLOTS:
                raise ResponseError(f"{address[0]}:{address[1]} says some slots have no primary")
            return served
        raise error


class _Shard(Feed):
    """The connection to one primary: :class:`Feed`'s protocol, speaking sharded Pub/Sub, and
    made again by :class:`ShardedFeed` (the node may be gone for good) rather than by itself."""

    SUBSCRIBE = b"SSUBSCRIBE"
    UNSUBSCRIBE = b"SUNSUBSCRIBE"
    MESSAGE = b"smessage"
    SUBSCRIBED = b"ssubscribe"
    UNSUBSCRIBED = b"sunsubscribe"

    def __init__(self, owner: ShardedFeed, address: Address, settings: dict[str, Any]) -> None:
        self._setup({**settings, "host": address[0], "port": address[1]}, owner.on_message, owner.on_gap)
        self.address, self._owner = address, owner
        self._leaving: Counter[str] = Counter()  # SUNSUBSCRIBEs sent, their confirmations not yet back

    async def open(self) -> None:
        await self._open()
        if self._watching is None:
            self._watching = asyncio.get_running_loop().create_task(self._watch(), name="edge-shard-watch")

    def unsubscribe(self, channel: str) -> None:
        if self.connected():
            self._leaving[channel] += 1
        super().unsubscribe(channel)

    def _subscribe_all(self) -> None:
        """One SSUBSCRIBE per slot: a command's channels must share a slot."""
        by_slot: defaultdict[int, list[str]] = defaultdict(list)
        for channel in self.channels:
            by_slot[slot_of(channel)].append(channel)
        for channels in by_slot.values():
            for n in range(0, len(channels), SUBSCRIBE_BATCH):
                self._send(self.SUBSCRIBE, *channels[n : n + SUBSCRIBE_BATCH])

    def _unsubscribed(self, channel: bytes) -> None:
        name = channel.decode()
        if self._leaving[name] > 0:
            self._leaving[name] -= 1
            if not self._leaving[name]:
                del self._leaving[name]
        elif name in self.channels:  # unasked: the slot has moved away
            log.info("edge hub: %s:%d gave up %r; its slot moved", *self.address, name)
            self._owner.moved(self, [name])

    def _refused(self, error: hiredis.ReplyError) -> None:
        words = str(error).split()
        if len(words) != 3 or words[0] != "MOVED":
            super()._refused(error)
            return
        slot = int(words[1])
        log.info("edge hub: slot %d is on %s, not %s:%d", slot, words[2], *self.address)
        for name in [c for c in self._leaving if slot_of(c) == slot]:
            del self._leaving[name]  # its SUNSUBSCRIBE was MOVED too: no confirmation comes
        channels = [c for c in self.channels if slot_of(c) == slot]
        self._owner.moved(self, channels)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._leaving.clear()
        if not self._closed:
            log.warning("edge hub lost the Redis Cluster node %s:%d (%s)", *self.address, exc or "closed by it")
            self._owner.lost(self)


async def _ask(address: Address, settings: dict[str, Any], *command: bytes) -> object:
    """One command's reply on a connection of its own, logged in as ``settings`` say."""
    commands: list[tuple[bytes | str, ...]] = []
    if settings.get("password") is not None:
        user = settings.get("username")
        commands.append((b"AUTH", *([user] if user else []), settings["password"]))
    commands.append(command)
    parser, replies = hiredis.Reader(), list[object]()
    async with asyncio.timeout(settings.get("socket_connect_timeout") or 10):
        reader, writer = await asyncio.open_connection(*address)
        try:
            writer.write(b"".join(hiredis.pack_command(c) for c in commands))  # type: ignore[arg-type]
            while len(replies) < len(commands):
                data = await reader.read(65536)
                if not data:
                    raise RedisConnectionError(f"{address[0]}:{address[1]} closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    replies.append(reply)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            raise ResponseError(str(reply))
    return replies[-1]
