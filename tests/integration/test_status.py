"""Heartbeats and the status snapshot against a real Redis: what ``streambridge status`` reads."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Callable

import openai
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from streambridge.api.presence import ServerDescriber
from streambridge.shared import batches, keys, machine, presence
from streambridge.shared.presence import (
    LEAVE_WAIT,
    Heartbeat,
    Record,
    ServerRecord,
    WorkerRecord,
    announced,
    read_records,
)
from streambridge.shared.status import gather_snapshot
from streambridge.workers.lease import Lease
from tests.integration.conftest import bearer

STARTED = time.time()


async def until(redis: Redis, done: Callable[[list[Record]], bool], timeout: float = 10) -> list[Record]:
    """The live records, read until ``done(records)``; fails past ``timeout`` s (slow is not stuck)."""
    deadline = time.monotonic() + timeout
    while not done(records := await read_records(redis)):
        assert time.monotonic() < deadline, f"not so within {timeout} s: {records}"
        await asyncio.sleep(0.01)
    return records


def a_worker(name: str, **fields: object) -> WorkerRecord:
    return WorkerRecord(id=name, host="h", pid=1, started_at=STARTED, **fields)  # type: ignore[arg-type]


async def test_a_heartbeat_announces_its_process_and_a_clean_stop_withdraws_it(real_redis: Redis) -> None:
    heartbeat = Heartbeat(real_redis, lambda: a_worker("w1", chats=2))
    await heartbeat.beat()
    assert await read_records(real_redis) == [a_worker("w1", chats=2)]
    assert 0 < await real_redis.pttl(keys.process("w1")) <= 4000

    await heartbeat.leave()
    assert await read_records(real_redis) == []
    assert await real_redis.zcard(keys.processes()) == 0


async def test_a_process_that_stops_beating_is_gone_once_its_ttl_lapses(real_redis: Redis) -> None:
    dead = Heartbeat(real_redis, lambda: a_worker("dead"), ttl=1)
    alive = Heartbeat(real_redis, lambda: a_worker("alive"), ttl=30)
    await dead.beat()
    await alive.beat()
    assert [r.id for r in await read_records(real_redis)] == ["alive", "dead"]

    await asyncio.sleep(1.2)  # the dead one's heartbeat lapses (by Redis's clock)
    assert [r.id for r in await read_records(real_redis)] == ["alive"]
    await alive.beat()  # any beat drops lapsed ids from the index
    assert await real_redis.zrange(keys.processes(), 0, -1) == [b"alive"]


async def test_a_record_this_version_cannot_read_is_left_out(real_redis: Redis) -> None:
    await real_redis.zadd(keys.processes(), {"future": time.time() * 1000 + 60_000})
    await real_redis.set(keys.process("future"), b'{"kind":"router","id":"future"}', px=60_000)
    await Heartbeat(real_redis, lambda: a_worker("w1")).beat()
    assert [r.id for r in await read_records(real_redis)] == ["w1"]


async def test_announced_beats_until_the_block_ends(redis_url: str, real_redis: Redis) -> None:
    beats = 0

    def describe() -> WorkerRecord:
        nonlocal beats
        beats += 1
        return a_worker("w9", chats=beats)

    async with announced(redis_url, describe, lambda: a_worker("w10")) as heartbeats:
        await until(real_redis, lambda records: len(records) == 2)
        assert [h.id for h in heartbeats] == ["w9", "w10"]
    assert beats >= 1
    assert await read_records(real_redis) == []


async def test_a_stop_is_never_held_by_a_frozen_redis(redis_url: str) -> None:
    admin = Redis.from_url(redis_url)
    async with announced(redis_url, lambda: a_worker("w1")):
        await until(admin, bool)
        await admin.execute_command("CLIENT", "PAUSE", "3000", "WRITE")
        started = time.monotonic()
    assert time.monotonic() - started <= LEAVE_WAIT + 0.3
    await admin.execute_command("CLIENT", "UNPAUSE")
    await admin.aclose()


async def test_a_snapshot_counts_queued_and_running_chats(client: TestClient, token: str, real_redis: Redis) -> None:  # type: ignore[type-arg]
    ids = []
    for n in range(3):
        response = await client.post("/v1/chats", json={"message": f"m{n}"}, headers=bearer(token))
        assert response.status == 202
        ids.append((await response.json())["id"])
    await machine.call(real_redis, machine.heartbeat("a-worker", 60_000, first=True))
    assert await Lease(real_redis, real_redis, "a-worker", ids[0], "token").claim() == "claimed"
    await Heartbeat(real_redis, lambda: a_worker("w1", chats=1, chat_ids=[ids[0]], chats_last_minute=4)).beat()
    await Heartbeat(real_redis, lambda: a_worker("w2", chats_last_minute=3)).beat()

    snapshot = await gather_snapshot(real_redis)

    assert (snapshot.queued, snapshot.running) == (2, 1)
    assert [w.id for w in snapshot.workers] == ["w1", "w2"]
    assert snapshot.workers[0].chat_ids == [ids[0]]
    assert snapshot.chats_per_minute == 7
    assert abs(snapshot.at - time.time()) < 5  # Redis's clock, in seconds
    assert snapshot.batches == []


async def test_chats_and_batch_items_whose_worker_was_lost_show_as_orphaned_not_running(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    sdk: openai.AsyncOpenAI,
    real_redis: Redis,
) -> None:
    """A dead worker's chats stay on its list, and a batch's lapsed leases in the batch, until a live
    worker takes them back: with no worker alive (it was SIGKILLed) they must not count as running."""
    ids = []
    for n in range(2):
        response = await client.post("/v1/chats", json={"message": f"m{n}"}, headers=bearer(token))
        ids.append((await response.json())["id"])
    await machine.call(real_redis, machine.heartbeat("dies", 200, first=True))
    await machine.call(real_redis, machine.heartbeat("lives", 60_000, first=True))
    assert await Lease(real_redis, real_redis, "dies", ids[0], "t0").claim() == "claimed"
    assert await Lease(real_redis, real_redis, "lives", ids[1], "t1").claim() == "claimed"
    k = await a_batch(sdk, real_redis, items=5)
    assert len(await machine.call(real_redis, batches.claim(k, 2, lease_ms=200, max_running=100))) == 4
    assert len(await machine.call(real_redis, batches.claim(k, 1, lease_ms=60_000, max_running=100))) == 2

    await asyncio.sleep(0.5)  # the short leases lapse; no worker is alive to take them back
    snapshot = await gather_snapshot(real_redis)

    assert (snapshot.running, snapshot.orphaned) == (1, 1)
    b = snapshot.batches[0]
    assert (b.running, b.orphaned, b.waiting) == (1, 2, 4)  # the orphaned items wait to run again
    assert (snapshot.batch_running, snapshot.batch_orphaned, snapshot.batch_waiting) == (1, 2, 4)


async def test_a_beat_in_flight_as_the_process_stops_cannot_bring_its_record_back(
    redis_url: str, real_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A beat already on the wire lands in Redis even if its sender stops waiting for the answer:
    the stop lets it end before withdrawing the record."""
    real_call = presence.call

    async def on_the_wire(redis: Redis, c: machine.Call) -> object:
        async def sent() -> object:
            await asyncio.sleep(0.2)  # Redis has it; the answer is on its way
            return await real_call(redis, c)

        return await asyncio.shield(asyncio.ensure_future(sent()))

    monkeypatch.setattr(presence, "call", on_the_wire)
    async with announced(redis_url, lambda: a_worker("w1")):
        await asyncio.sleep(0.05)  # the first beat is in flight
    await asyncio.sleep(0.4)
    assert await read_records(real_redis) == []
    assert await real_redis.zcard(keys.processes()) == 0


async def test_a_nudge_beats_at_once(real_redis: Redis) -> None:
    beats = 0

    def describe() -> WorkerRecord:
        nonlocal beats
        beats += 1
        return a_worker("w1", chats=beats)

    heartbeat = Heartbeat(real_redis, describe, interval=30)
    task = asyncio.create_task(heartbeat.run())
    try:
        await until(real_redis, lambda records: [r.id for r in records] == ["w1"])
        heartbeat.nudge()
        records = await until(real_redis, lambda records: isinstance(r := records[0], WorkerRecord) and r.chats == 2)
        assert len(records) == 1
    finally:
        heartbeat.finish()
        await asyncio.wait_for(task, 5)


async def test_an_edge_describes_its_open_streams(client: TestClient, token: str) -> None:  # type: ignore[type-arg]
    describe = ServerDescriber(client.app, 8001, api=True, edge=True)
    record = describe()
    assert (record.serves, record.port, record.open_streams) == (["api", "edge"], 8001, 0)
    assert record.id.startswith("api+edge-")
    response = await client.post("/v1/chats", json={"message": "hi"}, headers=bearer(token))
    chat_id = (await response.json())["id"]

    # no worker runs: the stream stays open, waiting for the chat's events
    async with client.get(f"/v1/chats/{chat_id}/events", headers=bearer(token)) as stream:
        assert stream.status == 200
        assert describe().open_streams == 1
    deadline = time.monotonic() + 10
    while describe().open_streams:  # the edge notices the close
        assert time.monotonic() < deadline, "the edge still counts a closed stream"
        await asyncio.sleep(0.01)


@pytest.fixture
async def sdk(client: TestClient, token: str) -> AsyncIterator[openai.AsyncOpenAI]:  # type: ignore[type-arg]
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=token, max_retries=0)
    yield sdk
    await sdk.close()


async def a_batch(sdk: openai.AsyncOpenAI, redis: Redis, items: int) -> batches.BatchKeys:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    lines = [
        {"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions", "body": body} for n in range(items)
    ]
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    uploaded = await sdk.files.create(file=("p.jsonl", io.BytesIO(data)), purpose="batch")
    batch = await sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    k = await batches.batch_keys(redis, batch.id)
    assert k is not None
    return k


async def test_a_snapshot_shows_a_running_batchs_progress(sdk: openai.AsyncOpenAI, real_redis: Redis) -> None:
    k = await a_batch(sdk, real_redis, items=6)
    claimed = await machine.call(real_redis, batches.claim(k, 3, lease_ms=60_000, max_running=100))
    index, item = int(claimed[0]), claimed[1]
    assert item
    done = batches.done(k, index, ok=True, line=b"{}", custom_id=f"r{index}", usage=batches.Usage(), ttl=60)
    assert await machine.call(real_redis, done) == 1

    snapshot = await gather_snapshot(real_redis)

    assert len(snapshot.batches) == 1
    b = snapshot.batches[0]
    assert (b.id, b.status, b.total, b.completed, b.failed) == (k.batch_id, "in_progress", 6, 1, 0)
    assert (b.running, b.waiting) == (2, 3)
    assert b.owner.startswith("visitor_")
    assert b.expires_at > snapshot.at
    assert (snapshot.batch_running, snapshot.batch_waiting) == (2, 3)


async def test_servers_and_workers_are_told_apart(real_redis: Redis) -> None:
    edge = ServerRecord(id="e1", host="h", pid=2, started_at=0, serves=["edge"], open_streams=5)
    await Heartbeat(real_redis, lambda: edge).beat()
    await Heartbeat(real_redis, lambda: a_worker("w1")).beat()
    snapshot = await gather_snapshot(real_redis)
    assert snapshot.servers == [edge]
    assert [w.id for w in snapshot.workers] == ["w1"]
