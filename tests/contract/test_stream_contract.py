"""The stream's contract, run on fakeredis, on a real redis-server and on a real 6-node Redis Cluster
(the hub on the real ones: on the cluster, with its sharded feed).

Appends are fenced and ordered; a tail gives history, then live entries, each once, and
stops after the terminal event; a resume gives exactly what follows its id.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
import redis
from redis.asyncio import Redis, RedisCluster

from streambridge.api.hub import QUEUE_SIZE, RESYNC, SUBSCRIBE_WAIT, StreamHub
from streambridge.shared import keys, machine
from streambridge.shared.chats import ChatResult
from streambridge.shared.errors import StreamExpired
from streambridge.shared.events import (
    Cancelled,
    Complete,
    Content,
    Event,
    Failed,
    Started,
    decode_event,
    encode_event,
    event_type,
)
from streambridge.shared.machine import APPEND, publish_command
from streambridge.shared.redis import connect_streams
from streambridge.shared.streams import Entry, entry_from_fields, id_key, parse_notification, trimmed_after
from streambridge.workers.sink import LeaseLost, StreamSink

CHAT = "contract-chat"
TOKEN = "lease-token"


@pytest.fixture(params=["fakeredis", "redis-server", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    client: Any
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis()
    elif request.param == "cluster":
        client = connect_streams(request.getfixturevalue("redis_cluster").url, max_connections=8)
    else:
        client = Redis.from_url(request.getfixturevalue("redis_url"))
    await client.hset(keys.lease(CHAT), mapping={"token": TOKEN, "seq": 0})
    yield client
    for key in [k for k in _sinks if k[0] == id(client)]:
        await _sinks.pop(key).close()
    await client.flushdb()
    await client.aclose()


#: the hub's Pub/Sub feed is a socket of its own (api/feed.py): these run on redis-server alone
needs_a_socket = pytest.mark.parametrize("store", ["redis-server", "cluster"], indirect=True)


@pytest.fixture
async def hub(store: Redis) -> AsyncIterator[StreamHub]:
    hub = StreamHub(store)
    await hub.start()
    yield hub
    await hub.stop()


def content(n: int) -> Content:
    return Content(content=f"piece {n} ", index=n, attempt=1)


_sinks: dict[tuple[int, str], StreamSink] = {}


async def append(store: Redis, events: list[Event], token: str = TOKEN) -> None:
    """Appends through one sink per store and token, as one attempt of a worker does."""
    sink = _sinks.setdefault(
        (id(store), token), StreamSink(store, CHAT, token, maxlen=10_000, publish=publish_command(store))
    )
    for event in events:
        await sink.append(event)
    await sink.drain()


async def collect(tail: AsyncIterator[list[Entry]]) -> list[Entry]:
    return [entry async for batch in tail for entry in batch]


def decoded(entries: list[Entry]) -> list[Event]:
    return [decode_event(e.data) for e in entries]


COMPLETE = Complete(attempt=1, total_chunks=3, content_length=24, elapsed_ms=1, finish_reason="stop")


async def test_appends_are_stored_in_order_with_increasing_ids(store: Redis) -> None:
    events: list[Event] = [Started(attempt=1, model="m"), content(1), content(2), COMPLETE]
    await append(store, events)
    raw = await store.xrange(keys.events(CHAT))
    assert [decode_event(fields[b"data"]) for _, fields in raw] == events
    assert [fields[b"type"].decode() for _, fields in raw] == ["started", "content", "content", "complete"]
    ids = [id_key(i.decode()) for i, _ in raw]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


async def test_a_worker_that_lost_its_lease_appends_nothing(store: Redis) -> None:
    with pytest.raises(LeaseLost):
        await append(store, [content(1)], token="a-zombie's-token")
    assert await store.xlen(keys.events(CHAT)) == 0


async def test_a_retried_batch_is_not_appended_twice(store: Redis) -> None:
    script = store.register_script(APPEND.lua)
    batch = [
        TOKEN,
        "1",
        "10000",
        "",
        publish_command(store),
        b"content",
        b'{"type":"content","content":"x","index":1,"attempt":1}',
    ]
    k = [keys.events(CHAT), keys.lease(CHAT), keys.notify(CHAT), keys.chat(CHAT)]
    assert await script(keys=k, args=batch) == 1
    assert await script(keys=k, args=batch) == 0
    assert await store.xlen(keys.events(CHAT)) == 1


async def test_an_attempts_started_event_and_its_number_on_the_chat_land_together(store: Redis) -> None:
    # A re-run after a crash numbers its attempt after the last one recorded: the number must be
    # on the chat whenever the attempt's events are in the stream.
    await store.hset(keys.chat(CHAT), mapping={"status": "running", "attempts": "1"})
    await append(store, [Started(attempt=2, model="m"), content(1)])
    assert await store.hget(keys.chat(CHAT), "attempts") == b"2"
    await append(store, [content(2)])  # later batches leave it be
    assert await store.hget(keys.chat(CHAT), "attempts") == b"2"


@needs_a_socket
async def test_tail_gives_history_then_live_and_stops_after_the_terminal_event(store: Redis, hub: StreamHub) -> None:
    await append(store, [Started(attempt=1, model="m"), content(1)])
    tail = hub.tail(CHAT, None, idle=5)
    first = await anext(tail)  # the history, in one batch
    await append(store, [content(2), content(3), COMPLETE])
    rest = await collect(tail)
    assert decoded(first + rest) == [
        Started(attempt=1, model="m"),
        content(1),
        content(2),
        content(3),
        COMPLETE,
    ]
    assert CHAT not in hub.topics, "the last reader leaving drops the chat's subscription"


@needs_a_socket
async def test_resume_gives_exactly_what_follows_the_last_event_id(store: Redis, hub: StreamHub) -> None:
    await append(store, [Started(attempt=1, model="m"), content(1), content(2), content(3), COMPLETE])
    everything = await collect(hub.tail(CHAT, None, idle=5))
    for cut in range(len(everything)):
        resumed = await collect(hub.tail(CHAT, everything[cut].id, idle=5))
        assert resumed == everything[cut + 1 :]


@needs_a_socket
async def test_a_new_reader_of_a_whole_stream_reads_it_without_asking_whether_it_was_trimmed(
    store: Redis, hub: StreamHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    await append(store, [Started(attempt=1, model="m"), content(1), COMPLETE])
    asked: list[object] = []
    xinfo_stream = hub.redis.xinfo_stream

    async def counted(*args: Any, **kwargs: Any) -> Any:
        asked.append(args)
        return await xinfo_stream(*args, **kwargs)

    monkeypatch.setattr(hub.redis, "xinfo_stream", counted)
    assert decoded(await collect(hub.tail(CHAT, None, idle=5))) == [Started(attempt=1, model="m"), content(1), COMPLETE]
    assert asked == [], "the chat's first entry is held: nothing before it can have been lost"


@needs_a_socket
async def test_a_new_reader_of_a_stream_trimmed_past_its_start_is_told(store: Redis, hub: StreamHub) -> None:
    await append(store, [Started(attempt=1, model="m"), *(content(n) for n in range(1, 10))])
    await store.xtrim(keys.events(CHAT), maxlen=4, approximate=False)
    with pytest.raises(StreamExpired):
        await collect(hub.tail(CHAT, None, idle=5))


@needs_a_socket
@pytest.mark.parametrize("terminal", [Failed(message="no", attempts=1), Cancelled()], ids=["failed", "cancelled"])
async def test_a_reader_of_a_stream_trimmed_to_its_last_event_is_told_even_if_that_event_could_open_a_chat(
    store: Redis, hub: StreamHub, terminal: Event
) -> None:
    # a failed or cancelled event may be a stream's first (a chat cancelled while queued), but here
    # it is the last of seven, six of them trimmed away: no reader may take it for the whole stream
    events: list[Event] = [Started(attempt=1, model="m"), *(content(n) for n in range(1, 6)), terminal]
    for n, event in enumerate(events, 1):
        await store.xadd(keys.events(CHAT), {"type": event_type(event), "data": encode_event(event)}, id=f"1-{n}")
    await store.xtrim(keys.events(CHAT), maxlen=1, approximate=False)
    for position in (None, "1-2"):
        with pytest.raises(StreamExpired):
            await collect(hub.tail(CHAT, position, idle=5))


@needs_a_socket
async def test_resume_after_the_terminal_event_ends_at_once(store: Redis, hub: StreamHub) -> None:
    await append(store, [Started(attempt=1, model="m"), COMPLETE])
    everything = await collect(hub.tail(CHAT, None, idle=5))
    async with asyncio.timeout(2):
        assert await collect(hub.tail(CHAT, everything[-1].id, idle=5)) == []


@needs_a_socket
async def test_a_reader_too_slow_for_the_live_feed_catches_up_from_the_stream(store: Redis, hub: StreamHub) -> None:
    await append(store, [Started(attempt=1, model="m")])
    tail = hub.tail(CHAT, None, idle=5)
    entries = await anext(tail)
    many = [content(n) for n in range(1, QUEUE_SIZE * 3)]
    await append(store, [*many, COMPLETE])  # far more than the reader's queue holds
    entries += await collect(tail)
    assert decoded(entries) == [Started(attempt=1, model="m"), *many, COMPLETE]


@needs_a_socket
async def test_an_idle_tail_yields_heartbeat_ticks(store: Redis, hub: StreamHub) -> None:
    await append(store, [Started(attempt=1, model="m")])
    tail = hub.tail(CHAT, None, idle=0.05)
    assert (await anext(tail)) != []
    assert (await anext(tail)) == []
    await tail.aclose()
    assert CHAT not in hub.topics


@needs_a_socket
async def test_a_tail_that_keeps_getting_entries_gets_no_heartbeat_and_a_quiet_one_does(
    store: Redis, hub: StreamHub
) -> None:
    await append(store, [Started(attempt=1, model="m")])
    tail = hub.tail(CHAT, None, idle=0.6)
    assert (await anext(tail)) != []
    batches: list[list[Entry]] = []

    async def read() -> None:
        async for batch in tail:
            batches.append(batch)

    reader = asyncio.create_task(read())
    for n in range(1, 13):  # 1.2 s of entries, 0.1 s apart: two heartbeat periods, never quiet for one
        await append(store, [content(n)])
        await asyncio.sleep(0.1)
    assert len(batches) >= 6
    assert all(batches), "a heartbeat came while entries kept coming"
    await asyncio.sleep(1.0)  # then quiet
    assert batches[-1] == [], "no heartbeat after a quiet heartbeat period"
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    await tail.aclose()


async def test_a_batch_whose_predecessor_was_lost_is_refused(store: Redis) -> None:
    script = store.register_script(APPEND.lua)
    k = [keys.events(CHAT), keys.lease(CHAT), keys.notify(CHAT), keys.chat(CHAT)]
    event = b'{"type":"content","content":"x","index":1,"attempt":1}'
    assert await script(keys=k, args=[TOKEN, "1", "10000", "", publish_command(store), "content", event]) == 1
    # batch 2 was lost in a Redis crash; batch 3 must not paper over the hole
    assert await script(keys=k, args=[TOKEN, "3", "10000", "", publish_command(store), "content", event]) == -2
    assert await store.xlen(keys.events(CHAT)) == 1


async def test_the_terminal_event_and_the_final_status_land_together_and_only_once(store: Redis) -> None:
    await store.hset(keys.chat(CHAT), mapping={"status": "running", "attempts": "1"})
    sink = StreamSink(store, CHAT, TOKEN, maxlen=10_000, publish=publish_command(store))
    await sink.append(content(1))
    result = ChatResult(status="complete", content="piece 1 ", finish_reason="stop", attempts=1)
    await sink.finish(COMPLETE, result, result_ttl=60, stream_ttl=30)
    await sink.finish(COMPLETE, result, result_ttl=60, stream_ttl=30)  # a retried call changes nothing
    raw = await store.xrange(keys.events(CHAT))
    assert [f[b"type"] for _, f in raw] == [b"content", b"complete"]
    assert await store.hget(keys.chat(CHAT), "status") == b"complete"
    assert not await store.exists(keys.lease(CHAT))
    assert 0 < await store.ttl(keys.events(CHAT)) <= 30
    await sink.append(content(2))  # nothing after the end, from this attempt or a stale one
    with pytest.raises(LeaseLost):
        await sink.drain()
    assert (await machine.call(store, machine.claim(CHAT, "a-second-run")))[0] != b"claimed"  # and no second run
    await sink.close()


@needs_a_socket
async def test_readers_that_leave_while_joining_leave_nothing_behind(store: Redis, hub: StreamHub) -> None:
    tails = [hub.tail(f"{CHAT}-{n}", None, idle=5) for n in range(20)]
    pending = [asyncio.ensure_future(anext(t)) for t in tails]
    await asyncio.sleep(0)
    for future in pending:
        future.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for tail in tails:
        await tail.aclose()
    assert hub.topics == {}


@needs_a_socket
async def test_shutting_the_hub_ends_every_tail_without_a_terminal_event(store: Redis, hub: StreamHub) -> None:
    await append(store, [Started(attempt=1, model="m")])
    tail = hub.tail(CHAT, None, idle=5)
    assert await anext(tail) != []
    reading = asyncio.ensure_future(collect(tail))
    await asyncio.sleep(0.05)
    hub.close_all()
    async with asyncio.timeout(2):
        assert await reading == []


async def waiting(hub: StreamHub) -> None:
    """Until the chat's readers are caught up and waiting for live entries, their subscription
    confirmed (its confirmation makes them re-read the stream once)."""
    await asyncio.sleep(0.1)
    async with asyncio.timeout(5):
        while not all(s.waiter is not None and not s.waiter.done() for s in hub.topics[CHAT].subscribers):
            await asyncio.sleep(0.01)


async def read_into(log: list[Entry], tail: AsyncIterator[list[Entry]]) -> None:
    async for batch in tail:
        log.extend(batch)


@needs_a_socket
async def test_a_waiting_reader_takes_live_entries_through_deliver_and_the_end_through_the_tail(
    store: Redis, hub: StreamHub
) -> None:
    await append(store, [Started(attempt=1, model="m")])
    delivered: list[Entry] = []
    tail = hub.tail(CHAT, None, idle=5, deliver=lambda entries, now: delivered.extend(entries) is None)
    assert decoded(await anext(tail)) == [Started(attempt=1, model="m")]
    reading = asyncio.ensure_future(collect(tail))
    await waiting(hub)
    await append(store, [content(1), content(2)])
    async with asyncio.timeout(5):
        while len(delivered) < 2:
            await asyncio.sleep(0.01)
    await append(store, [COMPLETE])
    assert decoded(await reading) == [COMPLETE], "the tail gave what deliver had taken, or not the end"
    assert decoded(delivered) == [content(1), content(2)]


@needs_a_socket
async def test_what_deliver_declines_comes_through_the_tail_in_order_and_once(store: Redis, hub: StreamHub) -> None:
    await append(store, [Started(attempt=1, model="m")])
    written: list[Entry] = []  # what the client gets, in the order it gets it
    offered = 0

    def every_other(entries: list[Entry], now: float) -> bool:
        nonlocal offered
        offered += 1
        if offered % 2:
            return False
        written.extend(entries)
        return True

    reading = asyncio.ensure_future(read_into(written, hub.tail(CHAT, None, idle=5, deliver=every_other)))
    await waiting(hub)
    many = [content(n) for n in range(1, 41)]
    for n in range(0, 40, 4):
        await append(store, many[n : n + 4])
        await asyncio.sleep(0.005)
    await append(store, [COMPLETE])
    async with asyncio.timeout(5):
        await reading
    assert decoded(written) == [Started(attempt=1, model="m"), *many, COMPLETE]
    assert offered > 1, "nothing went through deliver"


@needs_a_socket
async def test_a_reader_that_must_re_read_the_stream_starts_after_what_deliver_took(
    store: Redis, hub: StreamHub
) -> None:
    await append(store, [Started(attempt=1, model="m")])
    written: list[Entry] = []
    delivered = 0

    def deliver(entries: list[Entry], now: float) -> bool:
        nonlocal delivered
        written.extend(entries)
        delivered += len(entries)
        return True

    reading = asyncio.ensure_future(read_into(written, hub.tail(CHAT, None, idle=5, deliver=deliver)))
    await waiting(hub)
    await append(store, [content(1), content(2)])
    async with asyncio.timeout(5):
        while delivered < 2:
            await asyncio.sleep(0.01)
    for sub in hub.topics[CHAT].subscribers:  # as after a Pub/Sub reconnect: the live feed may have a gap
        sub.push(RESYNC)
    await append(store, [content(3), COMPLETE])
    async with asyncio.timeout(5):
        await reading
    assert decoded(written) == [Started(attempt=1, model="m"), content(1), content(2), content(3), COMPLETE]


async def test_a_batch_is_announced_in_one_notification_holding_each_entry(store: Any) -> None:
    if isinstance(store, RedisCluster):  # sharded Pub/Sub, on the chat's slot's primary
        node = store.get_node_from_key(keys.notify(CHAT))
        subscribed = threading.Event()
        listening = asyncio.ensure_future(asyncio.to_thread(_one_sharded_message, node.host, node.port, subscribed))
        while not subscribed.is_set():
            await asyncio.sleep(0.01)
        await append(store, [Started(attempt=1, model="m"), content(1), content(2)])
        data = await listening
    else:
        async with store.pubsub() as pubsub:
            await pubsub.subscribe(keys.notify(CHAT))
            assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
            await append(store, [Started(attempt=1, model="m"), content(1), content(2)])
            message = await pubsub.get_message(timeout=5)
            assert message is not None
            assert await pubsub.get_message(timeout=0.1) is None, "one batch, one notification"
            data = message["data"]
    stored = [entry_from_fields(i, f) for i, f in await store.xrange(keys.events(CHAT))]
    assert parse_notification(data) == stored
    assert decoded(stored) == [Started(attempt=1, model="m"), content(1), content(2)]


def _one_sharded_message(host: str, port: int, subscribed: threading.Event) -> bytes:
    """redis-py's asyncio Pub/Sub has no SSUBSCRIBE: its synchronous one listens, in a thread."""
    with redis.Redis(host=host, port=port) as listener, listener.pubsub() as pubsub:
        pubsub.ssubscribe(keys.notify(CHAT))
        assert pubsub.get_sharded_message(timeout=5)["type"] == "ssubscribe"
        subscribed.set()
        message = pubsub.get_sharded_message(timeout=5)
        assert message is not None
        assert pubsub.get_sharded_message(timeout=0.1) is None, "one batch, one notification"
        return bytes(message["data"])


@needs_a_socket
async def test_a_waiting_reader_gets_a_batch_in_one_write(store: Redis, hub: StreamHub) -> None:
    await append(store, [Started(attempt=1, model="m")])
    writes: list[list[Entry]] = []
    tail = hub.tail(CHAT, None, idle=5, deliver=lambda entries, now: writes.append(list(entries)) is None)
    assert decoded(await anext(tail)) == [Started(attempt=1, model="m")]
    reading = asyncio.ensure_future(collect(tail))
    await waiting(hub)
    await append(store, [content(1), content(2), content(3)])
    await append(store, [COMPLETE])
    async with asyncio.timeout(5):
        assert decoded(await reading) == [COMPLETE]
    assert [decoded(w) for w in writes] == [[content(1), content(2), content(3)]]


@needs_a_socket
async def test_an_unreadable_notification_sends_its_readers_back_to_the_stream(store: Redis, hub: StreamHub) -> None:
    await append(store, [Started(attempt=1, model="m")])
    written: list[Entry] = []
    reading = asyncio.ensure_future(
        read_into(written, hub.tail(CHAT, None, idle=5, deliver=lambda entries, now: False))
    )
    await waiting(hub)
    # An entry whose announcement the edge cannot read (say, from a version it does not know)
    await store.xadd(keys.events(CHAT), {"type": "content", "data": encode_event(content(1))})
    await store.execute_command(publish_command(store), keys.notify(CHAT), b"not\nwhole")
    await append(store, [COMPLETE])
    async with asyncio.timeout(5):
        await reading
    assert decoded(written) == [Started(attempt=1, model="m"), content(1), COMPLETE]
    assert not hub.topics, "the reader left"


@pytest.fixture(params=["redis-7", "redis-6.2"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    """A real redis-server of each version the project runs on: XINFO differs between them."""
    url = request.getfixturevalue("redis_url" if request.param == "redis-7" else "redis_6_2_url")
    client = Redis.from_url(url)
    yield client
    await client.aclose()


async def trimmed_stream(server: Redis, keep: int) -> list[str]:
    """A chat's stream of ten entries, at ids 1-1 … 1-10, trimmed to its last ``keep``: all ids."""
    events: list[Event] = [Started(attempt=1, model="m"), *(content(n) for n in range(1, 10))]
    for n, event in enumerate(events, 1):
        await server.xadd(keys.events(CHAT), {"type": event_type(event), "data": encode_event(event)}, id=f"1-{n}")
    if keep < len(events):
        await server.xtrim(keys.events(CHAT), maxlen=keep, approximate=False)
    return [f"1-{n}" for n in range(1, len(events) + 1)]


async def test_nothing_is_trimmed_after_any_position_of_a_whole_stream(server: Redis) -> None:
    ids = await trimmed_stream(server, keep=10)
    for position in ["0-0", *ids]:
        assert not await trimmed_after(server, keys.events(CHAT), position)


async def test_entries_after_a_position_the_length_cap_passed_are_trimmed(server: Redis) -> None:
    ids = await trimmed_stream(server, keep=4)  # 1-7 … 1-10 held
    for position in ["0-0", *ids[:5]]:
        assert await trimmed_after(server, keys.events(CHAT), position), position
    # 1-6 was trimmed, but its successor is held; and from 1-7 on, everything after is held
    for position in ids[5:]:
        assert not await trimmed_after(server, keys.events(CHAT), position), position


async def test_a_stream_that_does_not_exist_says_nothing_was_trimmed(server: Redis) -> None:
    assert not await trimmed_after(server, keys.events("no-such-chat"), "1-1")


@needs_a_socket
async def test_stopping_the_hub_ends_readers_whose_read_is_in_flight(
    store: Redis, hub: StreamHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    await append(store, [Started(attempt=1, model="m")])

    async def stuck(*args: object, **kwargs: object) -> None:
        await asyncio.Event().wait()  # a read that never comes back

    monkeypatch.setattr(hub.redis, "xrange", stuck)
    reading = asyncio.ensure_future(collect(hub.tail(CHAT, None, idle=5)))
    await asyncio.sleep(SUBSCRIBE_WAIT + 0.1)
    assert hub._reading, "a read is in flight"
    await hub.stop()
    async with asyncio.timeout(2):
        assert await reading == []
    assert not hub._reading
