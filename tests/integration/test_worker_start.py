"""How a long-running worker starts chats: woken by the API's token, oldest first, or found by arq's
scan; whichever worker takes a chat's job off the queue runs it, and nobody else."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from arq.connections import ArqRedis
from arq.worker import Worker
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streambridge.fake_llm import FakeLLMConfig
from streambridge.fake_llm import make_app as make_fake_llm
from streambridge.shared import keys, machine
from streambridge.shared.jobs import JOB_EXPIRES_MS, job_record
from streambridge.shared.settings import Settings
from streambridge.shared.streams import id_key
from streambridge.workers.lease import Lease
from streambridge.workers.llm import make_client
from streambridge.workers.runner import ChatRunner
from streambridge.workers.worker import ChatWorker, make_worker, stop_worker
from tests.integration.conftest import bearer, events_of, read_sse


async def create(client: TestClient, token: str, n: int) -> str:  # type: ignore[type-arg]
    response = await client.post("/v1/chats", json={"message": f"chat {n}"}, headers=bearer(token))
    assert response.status == 202, await response.text()
    return str((await response.json())["id"])


async def event_types(client: TestClient, token: str, chat_id: str) -> list[str]:  # type: ignore[type-arg]
    """The chat's whole stream, read to its end, as its events' type names."""
    response = await client.get(f"/v1/chats/{chat_id}/events", headers=bearer(token))
    return [type(e).__name__ for e in events_of(await read_sse(response))]


@pytest.fixture
async def idle_worker(settings: Settings, llm_url: str) -> AsyncIterator[ChatWorker]:
    """A worker whose loop does not run: a test calls its parts."""
    worker = make_worker(settings, llm_url)
    worker.ctx["runner"] = runner = ChatRunner(worker.pool, make_client(llm_url, None), settings)
    await machine.call(worker.pool, machine.heartbeat(runner.worker_id, 60_000, first=True))  # its loop's would
    yield worker
    await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
    await worker.ctx["runner"].llm.close()
    await worker.close()


async def test_chats_woken_together_each_start_once_and_complete(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    settings: Settings,
    llm_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Queued before the worker runs, so its first wake-up pops all of them at once; arq's scan
    # starts nothing, or it would find them first.
    chat_ids = [await create(client, token, n) for n in range(8)]

    async def starts_nothing(self: ChatWorker, job_ids: list[str]) -> None:
        pass

    monkeypatch.setattr(ChatWorker, "start", starts_nothing)
    worker = make_worker(settings, llm_url)
    main = asyncio.create_task(worker.main())
    try:
        for chat_id in chat_ids:
            types = await event_types(client, token, chat_id)
            assert types.count("Started") == 1, types
            assert types[-1] == "Complete"
        pickups = [float(await worker.pool.hget(keys.chat(c), "pickup_ms")) for c in chat_ids]  # type: ignore[misc,arg-type]
        assert all(0 <= ms < 10_000 for ms in pickups), pickups  # each timed from its own enqueue
        assert await worker.pool.zcard(keys.queue()) == 0, "a started chat's job leaves the queue"
    finally:
        await stop_worker(worker, main, grace=1)


@pytest.fixture
def stuck_scan(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """arq's scan of the queue, stuck for good at its first round (in arq's health record, after
    its look at the queue): only a wake-up starts a chat. The event is set once the scan is stuck."""
    stuck = asyncio.Event()

    async def heart_beat_that_never_returns(self: Worker) -> None:
        stuck.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(Worker, "heart_beat", heart_beat_that_never_returns)
    return stuck


async def test_a_woken_chat_starts_while_arqs_scan_is_stuck(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    settings: Settings,
    llm_url: str,
    stuck_scan: asyncio.Event,
) -> None:
    # The wake-up listener is a task of its own: a scan waiting on Redis (a slow answer, an
    # outage's backoff) holds up no chat the API has woken.
    worker = make_worker(settings, llm_url)
    main = asyncio.create_task(worker.main())
    try:
        await asyncio.wait_for(stuck_scan.wait(), 10)
        types = await event_types(client, token, await create(client, token, 0))
        assert types[0] == "Started", types
        assert types[-1] == "Complete", types
    finally:
        await stop_worker(worker, main, grace=1)


async def test_a_wake_up_for_a_chat_started_elsewhere_or_cancelled_starts_nothing(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    idle_worker: ChatWorker,
) -> None:
    started, cancelled = await create(client, token, 0), await create(client, token, 1)
    await machine.call(idle_worker.pool, machine.heartbeat("another-worker", 60_000, first=True))
    elsewhere = Lease(idle_worker.pool, idle_worker.pool, "another-worker", started, "its-token")
    assert await elsewhere.claim() == "claimed"
    response = await client.post(f"/v1/chats/{cancelled}/cancel", headers=bearer(token))
    assert (await response.json())["status"] == "cancelled"
    assert await idle_worker._start([started, cancelled]) == []
    assert idle_worker.busy == 0
    statuses = [await idle_worker.pool.hget(keys.chat(c), "status") for c in (started, cancelled)]  # type: ignore[misc]
    assert statuses == [b"running", b"cancelled"]  # neither claimed here
    assert await idle_worker.pool.hget(keys.lease(started), "token") == b"its-token"  # type: ignore[misc]


async def test_a_chat_woken_twice_starts_once(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    idle_worker: ChatWorker,
) -> None:
    chat_id = await create(client, token, 0)
    await idle_worker._start([chat_id, chat_id])  # a duplicate token in the same round trip
    await idle_worker._start([chat_id])  # and a stale one later
    assert idle_worker.busy == 1
    types = await event_types(client, token, chat_id)
    assert types.count("Started") == 1, types


async def test_arqs_scan_takes_the_oldest_waiting_chats_as_many_as_it_has_room_for(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    idle_worker: ChatWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    given: list[list[str]] = []

    async def recorded(self: ChatWorker, job_ids: list[str]) -> None:
        given.append(job_ids)

    monkeypatch.setattr(ChatWorker, "start", recorded)
    chat_ids = []
    for n in range(4):
        chat_ids.append(await create(client, token, n))
        await asyncio.sleep(0.002)  # the queue orders by the millisecond of enqueue: a tie is in no order
    idle_worker.max_jobs = 3
    idle_worker.busy = 1
    idle_worker._began = True  # no wake-up listener: only the scan starts chats here
    await idle_worker._poll_iteration()
    assert given == [chat_ids[:2]]


async def test_a_stopping_worker_leaves_woken_chats_to_the_other_workers(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    idle_worker: ChatWorker,
) -> None:
    idle_worker.allow_pick_jobs = False  # what stop_worker() does first
    await create(client, token, 0)
    await idle_worker._wake_once()
    assert idle_worker.busy == 0
    assert await idle_worker.pool.llen(keys.wake()) == 1  # type: ignore[misc]


async def test_the_wake_up_listener_outlives_a_refusal_from_redis(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    settings: Settings,
    llm_url: str,
    monkeypatch: pytest.MonkeyPatch,
    stuck_scan: asyncio.Event,
) -> None:
    # READONLY after a failover, OOM: an error reply, not a lost connection. The listener waits
    # and tries again; arq's scan is held stuck, so only the listener can start the chat.
    worker = make_worker(settings, llm_url)
    refused = 0
    real_blpop = ArqRedis.blpop

    async def refused_once(self: ArqRedis, *args: object, **kwargs: object) -> object:
        nonlocal refused
        if not refused:
            refused += 1
            raise ResponseError("READONLY You can't write against a read only replica.")
        return await real_blpop(self, *args, **kwargs)  # type: ignore[arg-type,misc]

    monkeypatch.setattr(ArqRedis, "blpop", refused_once)
    main = asyncio.create_task(worker.main())
    try:
        await stuck_scan.wait()  # it looked at the queue before the chat was there
        while not refused:
            await asyncio.sleep(0.01)
        types = await event_types(client, token, await create(client, token, 0))
        assert types[-1] == "Complete", types
        assert refused == 1
    finally:
        await stop_worker(worker, main, grace=1)


async def test_a_chat_woken_just_as_its_worker_stops_is_left_for_another(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    idle_worker: ChatWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_blpop = ArqRedis.blpop

    async def stopping_meanwhile(self: ArqRedis, *args: object, **kwargs: object) -> object:
        popped = await real_blpop(self, *args, **kwargs)  # type: ignore[arg-type,misc]
        idle_worker.allow_pick_jobs = False  # stop_worker() began while BLPOP waited
        return popped

    monkeypatch.setattr(ArqRedis, "blpop", stopping_meanwhile)
    chat_id = await create(client, token, 0)
    await idle_worker._wake_once()
    assert idle_worker.busy == 0
    assert await idle_worker.pool.lrange(keys.wake(), 0, -1) == [chat_id.encode()]  # type: ignore[misc]


async def test_under_saturation_chats_start_in_the_order_they_were_accepted(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Twelve chats for two slots, accepted while the worker runs: each starts within one slot's
    turnover of its turn (a last-in-first-out wake list started the newest first)."""
    server = TestServer(make_fake_llm(FakeLLMConfig(ttft_ms=0, delay_ms=10, words=6)))
    await server.start_server()
    worker = make_worker(msgspec.structs.replace(settings, worker_concurrency=2), str(server.make_url("/v1")))
    main = asyncio.create_task(worker.main())
    try:
        chat_ids = [await create(client, token, n) for n in range(12)]
        for chat_id in chat_ids:
            assert (await event_types(client, token, chat_id))[-1] == "Complete"
        started = [(await worker.pool.xrange(keys.events(c), count=1))[0][0] for c in chat_ids]
        order = sorted(range(len(chat_ids)), key=lambda n: id_key(started[n].decode()))
        assert all(abs(turn - n) <= 2 for turn, n in enumerate(order)), order
    finally:
        await stop_worker(worker, main, grace=1)
        await server.close()


async def test_a_worker_never_runs_more_chats_than_its_concurrency(settings: Settings, real_redis: Redis) -> None:
    """Its wake-up listener and its scan share the free slots (each counted them on its own, and
    together they started a third chat on two slots)."""
    server = TestServer(make_fake_llm(FakeLLMConfig(ttft_ms=0, delay_ms=5, words=1)))
    await server.start_server()
    worker = make_worker(msgspec.structs.replace(settings, worker_concurrency=2), str(server.make_url("/v1")))
    main = asyncio.create_task(worker.main())
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, worker.busy)
            await asyncio.sleep(0.001)

    watching = asyncio.create_task(watch())
    await real_redis.set(keys.credential("c"), b"{}")
    limits = machine.Admission(
        max_queue=10_000, chats_per_minute=10_000, max_running=10_000, deadline_ms=60_000, result_ttl=60
    )
    try:
        chat_ids = [uuid.uuid4().hex for _ in range(400)]
        for n, chat_id in enumerate(chat_ids):  # as fast as Redis takes them
            request = msgspec.json.encode({"messages": [{"role": "user", "content": f"chat {n}"}]})
            await machine.call(real_redis, machine.create(chat_id, "u", created_at="", request=request, result_ttl=60))
            admit = machine.admit(
                chat_id,
                "u",
                "c",
                request=request,
                job=job_record(chat_id),
                job_expires_ms=JOB_EXPIRES_MS,
                limits=limits,
            )
            await machine.call(real_redis, admit)
        for _ in range(300):
            statuses = {await real_redis.hget(keys.chat(c), "status") for c in chat_ids}  # type: ignore[misc]
            if statuses == {b"complete"}:
                break
            await asyncio.sleep(0.1)
        assert statuses == {b"complete"}
    finally:
        watching.cancel()
        await stop_worker(worker, main, grace=1)
        await server.close()
    assert peak <= 2


async def test_a_chat_woken_twice_in_one_round_trip_starts_once_and_stays_listed_with_its_attempt(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    idle_worker: ChatWorker,
) -> None:
    """Two of its ids in one start (two wake tokens popped together): a second listing would replace
    the running attempt's token, then leave the list with it, and a crash would orphan the chat."""
    chat_id = await create(client, token, 0)
    await idle_worker._start([chat_id, chat_id])
    runner = idle_worker.ctx["runner"]
    listed = await idle_worker.pool.hgetall(keys.worker_chats(runner.worker_id))  # type: ignore[misc]
    held = await idle_worker.pool.hget(keys.lease(chat_id), "token")  # type: ignore[misc]
    assert idle_worker.busy == 1
    assert listed == {chat_id.encode(): held}


async def test_a_chat_claimed_whose_jobs_take_failed_still_runs(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    idle_worker: ChatWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The take's round trip (jobs off the queue, listings again) lost: the claimed chat must run,
    not sit claimed and listed with nothing running it for the worker's whole life."""
    chat_id = await create(client, token, 0)
    take = ChatWorker._take

    async def take_lost(self: ChatWorker, listed: list[Lease], answers: list[object], claimed: list[Lease]) -> None:
        async def lost(*args: object, **kwargs: object) -> list[object]:
            raise ConnectionError("the take's round trip was lost")

        monkeypatch.setattr(type(self.pool.pipeline()), "execute", lost)
        try:
            await take(self, listed, answers, claimed)
        finally:
            monkeypatch.undo()

    monkeypatch.setattr(ChatWorker, "_take", take_lost)
    await idle_worker._start([chat_id])
    assert idle_worker.busy == 1, "it runs"
    await asyncio.gather(*idle_worker.tasks.values())
    assert await idle_worker.pool.hget(keys.chat(chat_id), "status") == b"complete"  # type: ignore[misc]
