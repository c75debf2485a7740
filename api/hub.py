"""One edge process's window on the chats its clients watch.

A single Pub/Sub connection (``api/feed.py``) carries every appended entry (the worker
publishes each batch in the same Lua call as its XADDs); each client gets a bounded queue.
The stream stays the source of truth: a client reads history with XRANGE, then takes live
entries from its queue, skipping ids it already has. Whenever the live feed may have a gap (a full queue,
or a Pub/Sub reconnect, which re-confirms every subscription) the client is told to
re-read the stream from its last id. So a slow client costs bounded memory, and nothing
is lost or repeated; a client whose next entry was trimmed away is told (:class:`StreamExpired`).

Reads of a chat's stream are shared: one in flight per chat, and every reader who asks before
it is sent joins it. A feed reconnect sends every reader back to the stream at once: that is
one XRANGE per chat, not one per reader, through a pool of a few sockets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_right
from collections.abc import AsyncGenerator, Callable
from typing import Any, Final, NamedTuple, cast

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from streambridge.api.feed import Feed
from streambridge.api.shards import ShardedFeed
from streambridge.shared import keys, metrics
from streambridge.shared.errors import StreamExpired
from streambridge.shared.events import TERMINAL_TYPES
from streambridge.shared.machine import Store
from streambridge.shared.streams import (
    Entry,
    begins_the_chat,
    entry_from_fields,
    id_key,
    parse_notification,
    stream_info,
    trimmed,
)

log = logging.getLogger("streambridge.edge")

#: live entries a client may fall behind by before it re-reads the stream instead
QUEUE_SIZE: Final = 256
#: entries per XRANGE while catching up
PAGE: Final = 500
#: seconds a new chat's first read waits for its subscription's confirmation (read before it, the
#: history would be read again when it comes); past that, the read goes ahead and re-reads then
SUBSCRIBE_WAIT: Final = 0.5

RESYNC: Final = None  # queue marker: re-read the stream from your last id
#: seconds between two readings of Redis's clock (:class:`RedisClock`)
CLOCK_EVERY: Final = 30.0


class RedisClock:
    """How far Redis's clock is ahead of this host's (``offset``, seconds), read with TIME every
    :data:`CLOCK_EVERY` s: Redis's answer against the midpoint of the round trip. A stream entry's
    id is Redis's time of its append; the delivery lag compares it with this host's clock plus the
    offset, so a skewed host clock does not skew the lag (within half a round trip)."""

    def __init__(self, redis: Store) -> None:
        self._redis = redis
        self.offset = 0.0

    async def read(self) -> None:
        sent = time.time()
        seconds, micros = await self._redis.time()
        received = time.time()
        self.offset = seconds + micros / 1_000_000 - (sent + received) / 2
        metrics.REDIS_CLOCK_OFFSET.set(self.offset)

    async def keep(self) -> None:
        while True:
            try:
                await self.read()
            except (RedisError, OSError) as exc:  # the last offset stands until Redis answers again
                log.debug("edge hub: Redis's clock not read (%s)", exc)
            await asyncio.sleep(CLOCK_EVERY)


#: ``deliver(entries, now)`` writes live entries to the client at once, or returns False when it
#: cannot without waiting. Every reader of a message gets the same list, which it may cache on.
Deliver = Callable[[list[Entry], float], bool]


class Subscriber:
    """One reader's live feed: a bounded list of entries, the reader's wake-up, its heartbeat.

    A list and a future rather than an ``asyncio.Queue``, whose three deques cost ~2 KB per
    stream: a lot, at 10,000 streams an edge. And one heartbeat timer per reader that re-arms
    itself, rather than an ``asyncio.timeout`` around every wait: a reader of a busy chat then
    only moves a timestamp per batch (the timeouts were a tenth of the edge's CPU under load).

    A reader that is caught up and waiting may take live entries through ``deliver``, called from
    the hub's own reader, instead of being woken for each: waking a task and resuming its
    generators cost more than the write itself. The entries it declines, and the terminal one,
    wake the reader as before. ``last_id`` is the last entry handed over either way.
    """

    __slots__ = (
        "_idle",
        "_last",
        "_loop",
        "_timer",
        "closed",
        "deliver",
        "items",
        "last_id",
        "last_key",
        "reading",
        "waiter",
    )

    def __init__(self, idle: float, deliver: Deliver | None = None) -> None:
        self.items: list[Entry | None] = []
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False  # nothing more comes: the edge shuts down, or the reader is past the end
        self.reading = False  # has begun reading the stream: a confirmation then sends it back to it
        self.deliver = deliver
        self.last_id, self.last_key = "0-0", (0, 0)
        self._idle = idle
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._timer = self._loop.call_at(self._last + idle, self._tick)

    def close(self) -> None:
        self.closed = True
        self.push(RESYNC)

    def stop(self) -> None:
        self._timer.cancel()

    def handed(self, entry_id: str, key: tuple[int, int] | None = None) -> None:
        self.last_id, self.last_key = entry_id, key or id_key(entry_id)

    def offer(self, entries: list[Entry], keys: list[tuple[int, int]], live: int, now: float) -> None:
        """Live entries, in stream order, with their ids' keys; those before ``live`` are not
        terminal. Written through ``deliver`` in one write if the reader waits for its next
        batch, else queued for it. (Called for every reader of a message: kept lean.)"""
        start = 0
        waiter = self.waiter
        # The reader waits for its next batch: it writes nothing, and nothing waits for it
        # (whatever is queued has woken it, and stays queued until it runs).
        if self.deliver is not None and waiter is not None and not waiter.done():
            last = self.last_key
            while start < live and keys[start] <= last:
                start += 1  # it has those already
            if start < live and self.deliver(
                entries if start == 0 and live == len(entries) else entries[start:live], now
            ):
                self.last_id, self.last_key = entries[live - 1].id, keys[live - 1]
                self._last = now
                start = live
            elif start == live == len(entries):
                return
        # The terminal entry, and whatever was not written, go through the reader's task.
        for entry in entries[start:] if start else entries:
            self.push(entry)

    def push(self, item: Entry | None) -> None:
        """Queues a live entry, or :data:`RESYNC`, for the reader, and wakes it."""
        if len(self.items) < QUEUE_SIZE:
            self.items.append(item)
        else:  # too slow for the live feed: drop it, and catch up from the stream instead
            self.items = [RESYNC]
            metrics.RESYNC_OVERFLOW.inc()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> list[Entry | None]:
        """Everything pushed since the last take; an empty list after ``idle`` s without any."""
        if not self.items:
            self.waiter = self._loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items, self.items = self.items, []
        self._last = self._loop.time()
        return items

    def _tick(self) -> None:
        now, due = self._loop.time(), self._last + self._idle
        if now >= due:
            # Quiet for ``idle`` s: wake a waiting reader with nothing, for its heartbeat. A reader
            # not waiting is writing (history, or a batch to a slow client): no heartbeat is due.
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)
            due = now + self._idle
        self._timer = self._loop.call_at(due, self._tick)


class Page(NamedTuple):
    """One XRANGE of a chat's stream, shared by the readers who asked for it."""

    entries: list[Entry]  # from the earliest reader's position, inclusive; none after a terminal entry
    ids: list[tuple[int, int]]  # their ids' keys
    full: bool  # PAGE entries and no end: more may follow
    info: dict[str, Any] | None  # XINFO STREAM, read when the earliest position is not held


class Read:
    """A read of a chat's stream, which readers join until it is sent."""

    __slots__ = ("page", "readers")

    def __init__(self) -> None:
        self.readers: set[Subscriber] = set()
        self.page: asyncio.Future[Page | None] = asyncio.get_running_loop().create_future()


class Topic:
    __slots__ = ("confirmed", "next_read", "reading", "subscribers")

    def __init__(self) -> None:
        self.subscribers: set[Subscriber] = set()
        self.confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.next_read: Read | None = None  # sent once the read in flight is done
        self.reading: asyncio.Task[None] | None = None  # sends the chat's reads, one after another


class StreamHub:
    """``redis`` for reads; ``feed`` (default: ``redis``) for the Pub/Sub connection's settings,
    best made with :func:`shared.redis.connect_feed`. The feed needs a real socket: not fakeredis.
    On a Redis Cluster, the feed is sharded: a connection per primary (``api/shards.py``)."""

    def __init__(self, redis: Store, feed: Redis | None = None) -> None:
        self.redis = redis
        self.topics: dict[str, Topic] = {}
        self._channels: Feed | ShardedFeed
        if isinstance(redis, RedisCluster):  # the chats' channels are spread over its primaries
            self._channels = ShardedFeed(redis, self._publish, self._resync)
        else:
            self._feed = feed if feed is not None else cast(Redis, redis)
            self._channels = Feed(self._feed, self._publish, self._resync)
        self._reading: set[asyncio.Task[None]] = set()
        self.clock = RedisClock(redis)
        self._clock: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._channels.start()
        if isinstance(self._channels, Feed):  # so its one connection always has a channel (a shard's have theirs)
            self._channels.subscribe(keys.edges())
        if metrics.enabled:
            self._clock = asyncio.create_task(self.clock.keep())

    def feed_connected(self) -> bool:
        """Whether the Pub/Sub feed is up: without it, live entries reach no reader here."""
        return self._channels.connected()

    def close_all(self) -> None:
        """End every tail now (the edge is shutting down); their clients resume on another edge."""
        for topic in self.topics.values():
            for sub in topic.subscribers:
                sub.close()

    async def stop(self) -> None:
        self.close_all()
        for topic in self.topics.values():  # reads not sent yet, and those in flight: their readers end
            if topic.next_read is not None:
                topic.next_read.page.set_result(None)
                topic.next_read = None
        clock = [self._clock] if self._clock is not None else []
        for task in (*self._reading, *clock):
            task.cancel()
        await asyncio.gather(*self._reading, *clock, return_exceptions=True)
        await self._channels.close()

    async def tail(
        self, chat_id: str, after: str | None, *, idle: float, deliver: Deliver | None = None
    ) -> AsyncGenerator[list[Entry], None]:
        """The chat's entries after ``after`` (history, then live), ending with the terminal one.

        Entries come in batches, for one write each: a page of history, or every live entry that
        arrived while the last batch was being written. An empty batch comes after ``idle``
        seconds without an entry, for the caller's heartbeat. Ends early, without a terminal
        entry, when the edge shuts down: the client resumes elsewhere. With ``deliver``, live
        entries that arrive while the caller waits for the next batch may go through it instead
        (see :class:`Subscriber`): the caller must then not be writing anything else.
        """
        sub = Subscriber(idle, deliver)
        sub.handed(after or "0-0")
        try:
            topic = self._subscribe(chat_id, sub)
            if not topic.confirmed.done():  # a new chat: its history is read once, after the confirmation
                await asyncio.wait([topic.confirmed], timeout=SUBSCRIBE_WAIT)
            sub.reading = True
            while True:
                async for batch in self._catch_up(chat_id, topic, sub):
                    yield batch
                    if batch[-1].type in TERMINAL_TYPES:
                        return
                if not sub.closed:
                    async for batch in self._live(sub):
                        yield batch
                        if batch and batch[-1].type in TERMINAL_TYPES:
                            return
                if sub.closed:
                    return
        finally:
            sub.stop()
            self._unsubscribe(chat_id, sub)

    async def _catch_up(self, chat_id: str, topic: Topic, sub: Subscriber) -> AsyncGenerator[list[Entry], None]:
        """The stream after the reader's position, in pages; closes the reader at or past the end
        (or when the hub stops), and raises :class:`StreamExpired` if entries after it were trimmed."""
        while True:
            page = await self._read(chat_id, topic, sub)
            if page is None:  # the hub stopped
                sub.closed = True
                return
            n = bisect_right(page.ids, sub.last_key)  # what the reader has
            if n == 0 and page.entries and trimmed(page.info, sub.last_id):
                raise StreamExpired(f"events after {sub.last_id} were trimmed from chat {chat_id}'s stream")
            if n and page.entries[n - 1].type in TERMINAL_TYPES:
                sub.closed = True  # resumed at the end: nothing more will ever come
                return
            if n < len(page.entries):
                sub.handed(page.entries[-1].id, page.ids[-1])
                yield page.entries[n:]
            if not page.full:
                return

    async def _live(self, sub: Subscriber) -> AsyncGenerator[list[Entry], None]:
        """Live entries after the last one handed over, in batches; returns when the caller must
        re-read the stream."""
        while True:
            batch: list[Entry] = []
            items = await sub.take()
            if not items:
                yield batch
                continue
            for item in items:
                # Whatever was pushed after a RESYNC is in the stream by now (XADD precedes PUBLISH).
                if item is RESYNC:
                    break
                key = id_key(item.id)
                if key > sub.last_key:
                    batch.append(item)
                    sub.handed(item.id, key)
                if item.type in TERMINAL_TYPES:
                    break
            if batch:
                yield batch
            if item is RESYNC:
                return

    async def _read(self, chat_id: str, topic: Topic, sub: Subscriber) -> Page | None:
        """A read of the stream sent after this call, from the reader's position or before it:
        the chat's next read, which every reader asking meanwhile joins. None if the hub stopped."""
        read = topic.next_read
        if read is None:
            read = topic.next_read = Read()
        read.readers.add(sub)
        if topic.reading is None:
            topic.reading = asyncio.create_task(self._send_reads(chat_id, topic), name=f"edge-read-{chat_id}")
            self._reading.add(topic.reading)
            topic.reading.add_done_callback(self._reading.discard)
        try:
            return await asyncio.shield(read.page)  # a reader that leaves leaves the read to the others
        finally:
            read.readers.discard(sub)

    async def _send_reads(self, chat_id: str, topic: Topic) -> None:
        """The chat's reads, one at a time: a read in flight may have been sent before what a reader
        asking now must see was appended, so that reader waits for the next one."""
        read: Read | None = None
        try:
            while (read := topic.next_read) is not None:
                topic.next_read = None
                try:
                    read.page.set_result(await self._fetch(chat_id, read.readers) if read.readers else None)
                except Exception as exc:  # each of its readers raises it
                    read.page.set_exception(exc)
        finally:
            topic.reading = None
            if read is not None and not read.page.done():  # cancelled by stop(): its readers end
                read.page.set_result(None)

    async def _fetch(self, chat_id: str, readers: set[Subscriber]) -> Page:
        key = keys.events(chat_id)
        first = min(readers, key=lambda sub: sub.last_key)
        # From the earliest position inclusive: whether its entry is still held tells whether
        # what follows it is (entries leave a stream oldest first).
        entries = [entry_from_fields(i, f) for i, f in await self.redis.xrange(key, min=first.last_id, count=PAGE)]
        full = len(entries) == PAGE
        for n, entry in enumerate(entries):
            if entry.type in TERMINAL_TYPES:
                del entries[n + 1 :]  # nothing follows the end
                full = False
                break
        ids = [id_key(entry.id) for entry in entries]
        info = None
        # Whether entries after the earliest position left the stream: not if its entry is held, nor
        # if the first entry held is the chat's first (a new reader's usual case: no round trip).
        if ids and ids[0] > first.last_key and not begins_the_chat(entries[0]):
            info = await stream_info(self.redis, key)
        return Page(entries, ids, full, info)

    def _subscribe(self, chat_id: str, sub: Subscriber) -> Topic:
        """Join the chat's live feed. Its readers read the stream once Redis confirms it (or after
        ``SUBSCRIBE_WAIT``), which covers whatever was published before."""
        topic = self.topics.get(chat_id)
        if topic is None:
            topic = self.topics[chat_id] = Topic()
            self._channels.subscribe(keys.notify(chat_id))
        topic.subscribers.add(sub)
        return topic

    def _unsubscribe(self, chat_id: str, sub: Subscriber) -> None:
        """Leave it; the last reader to leave unsubscribes at once. One who joins meanwhile
        subscribes again after it, on the same connection, and re-reads on the confirmation."""
        topic = self.topics.get(chat_id)
        if topic is None:
            return
        topic.subscribers.discard(sub)
        if not topic.subscribers:
            del self.topics[chat_id]
            self._channels.unsubscribe(keys.notify(chat_id))

    def _resync(self, channel: bytes) -> None:
        """The channel's first confirmation, or a re-subscription after a reconnect: either way
        the live feed may have missed entries, so every reader already reading re-reads the
        stream. Those waiting for the first confirmation read it now, once."""
        topic = self._topic_of(channel)
        if topic is not None:
            if not topic.confirmed.done():
                topic.confirmed.set_result(None)
            for sub in topic.subscribers:
                if sub.reading:
                    metrics.RESYNC_FEED.inc()
                    sub.push(RESYNC)

    def _publish(self, channel: bytes, data: bytes) -> None:
        topic = self._topic_of(channel)
        if topic is None:
            return
        try:
            entries = parse_notification(data)
            keys_ = [id_key(entry.id) for entry in entries]
        except ValueError as exc:  # not ours to read (another version's?): the stream says what it announced
            log.warning("edge hub: unreadable notification on %r (%s); its readers re-read the stream", channel, exc)
            self._resync(channel)
            return
        live = next((n for n, entry in enumerate(entries) if entry.type in TERMINAL_TYPES), len(entries))
        now = asyncio.get_running_loop().time()
        for sub in topic.subscribers:
            sub.offer(entries, keys_, live, now)
        if keys_:  # written to every reader that waited; the others' writes follow from their tasks
            lag = time.time() + self.clock.offset - keys_[0][0] / 1000
            if lag >= 0:
                metrics.DELIVERY_LAG.observe(lag)
            else:  # the offset is off by more than the lag (a clock stepped since it was read)
                metrics.DELIVERY_LAG_NEGATIVE.inc()

    def _topic_of(self, channel: bytes) -> Topic | None:
        chat_id = _chat_of(channel)
        return self.topics.get(chat_id) if chat_id else None


_NOTIFY_PREFIX: Final = keys.notify("\0").split("\0")[0].encode()
_NOTIFY_SUFFIX: Final = keys.notify("\0").split("\0")[1].encode()


def _chat_of(channel: bytes) -> str | None:
    if channel.startswith(_NOTIFY_PREFIX) and channel.endswith(_NOTIFY_SUFFIX):
        return channel[len(_NOTIFY_PREFIX) : -len(_NOTIFY_SUFFIX)].decode()
    return None
