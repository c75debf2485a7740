"""``/metrics`` and ``/readyz``: real chats move the counters and histograms, with the right labels;
a worker's own port serves both; readiness follows Redis (a redis-server of the test's own)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from streambridge.api.app import make_app
from streambridge.api.context import CONTEXT
from streambridge.shared import keys, machine
from streambridge.shared.settings import Settings
from streambridge.workers.ops import make_worker_app
from streambridge.workers.worker import make_worker, stop_worker
from tests.conftest import OwnRedis
from tests.integration.conftest import RunWorker, bearer, events_of, read_sse

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: TestClient) -> Samples:  # type: ignore[type-arg]
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in after, f"{name}{labels} is not exported"
    return after[key] - before.get(key, 0.0)


async def create(client: TestClient, token: str, **body: object) -> dict[str, str]:  # type: ignore[type-arg]
    response = await client.post("/v1/chats", json=body, headers=bearer(token))
    assert response.status == 202, await response.text()
    return dict(await response.json())


async def test_real_chats_move_the_counters_and_histograms_with_their_labels(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
) -> None:
    before = await scrape(client)
    ok = await create(client, token, message="count me")
    await create(client, token, message="fail me", model="fake?fail=500")
    queued = await scrape(client)
    assert queued["streambridge_queue_depth", (("queue", "interactive"),)] == 2
    # a reader already waiting when the worker runs: its entries come live, and their lag is observed
    response = await client.get(f"/v1/chats/{ok['id']}/events", headers=bearer(token))
    reader = asyncio.create_task(read_sse(response))
    assert moved(before, await scrape(client), "streambridge_open_streams") == 1
    hub = client.app[CONTEXT].hub
    assert hub is not None
    deadline = time.monotonic() + 5
    while ok["id"] not in hub.topics:
        assert time.monotonic() < deadline, "the stream never subscribed"
        await asyncio.sleep(0.01)
    await run_worker()
    events = events_of(await reader)
    assert type(events[-1]).__name__ == "Complete"
    after = await scrape(client)

    assert moved(before, after, "streambridge_chats_created_total") == 2
    assert moved(before, after, "streambridge_chats_finished_total", status="complete") == 1
    assert moved(before, after, "streambridge_chats_finished_total", status="failed") == 1
    assert moved(before, after, "streambridge_chats_finished_total", status="cancelled") == 0
    # fail=500: three attempts fail, two of them are retried
    assert moved(before, after, "streambridge_attempt_failures_total", cause="server_error") == 3
    assert moved(before, after, "streambridge_retries_total", cause="server_error") == 2
    assert moved(before, after, "streambridge_retries_total", cause="timeout") == 0
    assert moved(before, after, "streambridge_pickup_seconds_count") == 2
    assert moved(before, after, "streambridge_time_to_first_token_seconds_count") == 1
    assert moved(before, after, "streambridge_chat_duration_seconds_count", status="complete") == 1
    assert moved(before, after, "streambridge_chat_duration_seconds_count", status="failed") == 1
    tokens = moved(before, after, "streambridge_completion_tokens_total")
    assert tokens == events[-1].usage.completion_tokens  # type: ignore[attr-defined]
    assert moved(before, after, "streambridge_tokens_per_second_count") == 1
    assert moved(before, after, "streambridge_delivery_lag_seconds_count") >= 1
    assert moved(before, after, "streambridge_delivery_lag_seconds_bucket", le="+Inf") >= 1
    assert after["streambridge_queue_depth", (("queue", "interactive"),)] == 0
    assert after["streambridge_open_streams", ()] == before.get(("streambridge_open_streams", ()), 0)


async def test_refusals_410s_and_redis_errors_are_counted(
    settings: Settings,
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
    real_redis: Redis,
) -> None:
    before = await scrape(client)
    chat = await create(client, token, message="expire me")
    await run_worker()
    await real_redis.delete(keys.events(chat["id"]))  # the stream's TTL ran out
    response = await client.get(f"/v1/chats/{chat['id']}/events", headers=bearer(token))
    assert response.status == 410
    limited = msgspec.structs.replace(settings, visitor_logins_per_minute=1)
    async with TestClient(TestServer(make_app(limited))) as strict:  # the token's login was this minute's one
        refused = await strict.post("/v1/auth/visitor")
        assert refused.status == 429
        code = (await refused.json())["error"]["code"]
    redis = client.app[CONTEXT].redis

    async def unreachable(*args: object, **kwargs: object) -> object:
        raise RedisConnectionError("Redis went away")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(redis, "execute_command", unreachable)
        response = await client.get(f"/v1/chats/{chat['id']}", headers=bearer(token))
        assert response.status == 503, await response.text()
    after = await scrape(client)
    assert moved(before, after, "streambridge_streams_expired_total", at="open") == 1
    assert moved(before, after, "streambridge_rate_limited_total", code=code) == 1
    assert moved(before, after, "streambridge_redis_errors_total", where="request") == 1


@pytest.fixture
def own_server() -> Iterator[OwnRedis]:
    """A redis-server of this test's own, to stop: never the session's, never the machine's."""
    server = OwnRedis()
    yield server
    server.stop()


async def test_readyz_is_200_while_redis_answers_and_503_with_a_json_body_when_it_is_gone(
    own_server: OwnRedis, settings: Settings
) -> None:
    mine = msgspec.structs.replace(settings, redis_url=own_server.url(0))
    async with TestClient(TestServer(make_app(mine))) as client:
        response = await client.get("/readyz")
        assert response.status == 200
        checks = {"process": "ok", "redis": "ok", "feed": "ok"}  # an edge too: its Pub/Sub feed
        assert await response.json() == {"status": "ready", "checks": checks}
        own_server.kill()
        response = await client.get("/readyz")
        assert response.status == 503
        body = await response.json()
        assert body["error"]["code"] == "not_ready"
        assert body["status"] == "not_ready"
        assert body["checks"]["redis"].startswith("unreachable")
        assert own_server.url(0).split("//")[1].split("/")[0] not in await response.text(), "no host:port"
        deadline = time.monotonic() + 5
        while body["checks"]["feed"] == "ok":  # the feed's socket closed with Redis: it says so
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.05)
            body = await (await client.get("/readyz")).json()
        assert (await client.get("/healthz")).status == 503  # liveness keeps its contract
        after = await scrape(client)  # metrics still answer, without the queue depths
        assert math.isnan(after["streambridge_queue_depth", (("queue", "interactive"),)])
        assert moved({}, after, "streambridge_redis_errors_total", where="scrape") >= 1


async def test_a_workers_own_port_serves_metrics_and_readyz(
    own_server: OwnRedis, settings: Settings, llm_url: str
) -> None:
    mine = msgspec.structs.replace(settings, redis_url=own_server.url(0))
    worker = make_worker(mine, llm_url, poll_delay=0.05)
    main = asyncio.create_task(worker.main())
    try:
        async with TestClient(TestServer(make_worker_app(worker, main))) as client:
            deadline = time.monotonic() + 10
            while (response := await client.get("/readyz")).status != 200:
                assert time.monotonic() < deadline, await response.text()
                await asyncio.sleep(0.02)
            assert (await response.json())["checks"] == {"process": "ok", "redis": "ok"}
            samples = await scrape(client)
            assert ("streambridge_chats_finished_total", (("status", "complete"),)) in samples
            assert samples["streambridge_queue_depth", (("queue", "batch"),)] == 0
            assert ("streambridge_running_chats", ()) in samples
            own_server.kill()
            response = await client.get("/readyz")
            assert response.status == 503
            assert (await response.json())["checks"]["redis"].startswith("unreachable")
    finally:
        await stop_worker(worker, main, grace=0)


async def test_a_completions_stream_counts_as_open_while_it_is_open(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
) -> None:
    before = await scrape(client)
    body = {"model": "fake", "messages": [{"role": "user", "content": "count my stream"}], "stream": True}
    response = await client.post("/v1/chat/completions", json=body, headers=bearer(token))
    assert response.status == 200, await response.text()
    assert (await response.content.readline()).startswith(b":")  # a ping: the stream is open, nothing yet
    assert moved(before, await scrape(client), "streambridge_open_streams") == 1
    await run_worker()
    assert b"data: [DONE]" in await response.read()
    assert moved(before, await scrape(client), "streambridge_open_streams") == 0


async def test_a_chat_cancelled_while_queued_counts_as_finished_cancelled(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
) -> None:
    before = await scrape(client)
    chat = await create(client, token, message="cancel me before any worker")
    for _ in range(2):  # the second cancel finds it cancelled: counted once
        response = await client.post(f"/v1/chats/{chat['id']}/cancel", headers=bearer(token))
        assert response.status == 202
        assert (await response.json())["status"] == "cancelled"
    await run_worker()  # its claim finds it cancelled: not counted again
    after = await scrape(client)
    assert moved(before, after, "streambridge_chats_finished_total", status="cancelled") == 1
    assert moved(before, after, "streambridge_chat_duration_seconds_count", status="cancelled") == 1
    assert 0 <= moved(before, after, "streambridge_chat_duration_seconds_sum", status="cancelled") < 5


async def test_a_failure_measuring_a_chats_start_still_lets_the_run_clean_up(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    settings: Settings,
    llm_url: str,
    real_redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from streambridge.workers.llm import make_client
    from streambridge.workers.runner import ChatRunner

    chat = await create(client, token, message="measure me")
    llm = make_client(llm_url, None)
    runner = ChatRunner(real_redis, llm, settings)

    def broken(self: ChatRunner, lease: object) -> float:
        raise RuntimeError("measuring failed")

    monkeypatch.setattr(ChatRunner, "_accepted", broken)
    await machine.call(real_redis, machine.heartbeat(runner.worker_id, 60_000, first=True))
    lease = runner.lease(chat["id"])
    try:
        with pytest.raises(RuntimeError, match="measuring failed"):
            await runner.run_claimed(lease, await lease.claim())
        assert chat["id"] not in runner.active, "the run's finally ran: it is not left running here"
        assert chat["id"] not in runner.starting
    finally:
        await runner.appender.close()
        await llm.close()


async def test_the_token_rate_leaves_out_the_time_to_first_token_and_tool_call_only_answers(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
    real_redis: Redis,
) -> None:
    before = await scrape(client)
    await create(client, token, message="slow to start, quick to stream", model="fake?ttft_ms=1000&delay_ms=2&words=20")
    await run_worker()
    after = await scrape(client)
    assert moved(before, after, "streambridge_tokens_per_second_count") == 1
    rate = moved(before, after, "streambridge_tokens_per_second_sum")
    assert rate > 100, f"{rate:.1f} tokens/s: the second's wait for the first token was counted"
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    body = {"model": "fake?tool=lookup", "messages": [{"role": "user", "content": "call it"}], "tools": tools}
    posting = asyncio.create_task(client.post("/v1/chat/completions", json=body, headers=bearer(token)))
    deadline = time.monotonic() + 5
    while not await real_redis.zcard(keys.queue()):  # queued: the burst worker finds it
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await run_worker()
    response = await posting
    assert response.status == 200, await response.text()
    last = await scrape(client)
    assert moved(after, last, "streambridge_chats_finished_total", status="complete") == 1
    assert moved(after, last, "streambridge_tokens_per_second_count") == 0, "no content: no rate"


async def test_readyz_and_the_queue_depths_do_not_wait_behind_a_busy_pool(
    client: TestClient,  # type: ignore[type-arg]
) -> None:
    redis = client.app[CONTEXT].redis
    busy = [
        asyncio.create_task(redis.blpop([f"sb:test:never:{n}"], timeout=3))
        for n in range(redis.connection_pool.max_connections)  # type: ignore[attr-defined]
    ]
    await asyncio.sleep(0.2)  # every connection of the pool is blocked in BLPOP
    try:
        response = await client.get("/readyz")
        assert response.status == 200, await response.text()
        samples = await scrape(client)
        assert not math.isnan(samples["streambridge_queue_depth", (("queue", "interactive"),)])
    finally:
        for task in busy:
            task.cancel()
        await asyncio.gather(*busy, return_exceptions=True)
