"""A queued chat's place in the queue (``queue_position`` of ``GET /v1/chats/{id}``)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp.test_utils import TestClient

from streambridge.api.context import CONTEXT
from streambridge.shared import keys
from streambridge.shared.settings import Settings
from streambridge.workers.worker import make_worker, stop_worker
from tests.integration.conftest import RunWorker, bearer


async def create(client: TestClient, token: str, model: str = "fake") -> str:  # type: ignore[type-arg]
    response = await client.post("/v1/chats", json={"message": "hi", "model": model}, headers=bearer(token))
    assert response.status == 202
    await asyncio.sleep(0.002)  # the queue orders by the millisecond of enqueue: a tie is in no order
    return str((await response.json())["id"])


async def read(client: TestClient, token: str, chat_id: str) -> dict[str, Any]:  # type: ignore[type-arg]
    response = await client.get(f"/v1/chats/{chat_id}", headers=bearer(token))
    assert response.status == 200
    value = await response.json()
    assert isinstance(value, dict)
    return value


async def test_queued_chats_count_from_one_and_lose_the_field_once_they_end(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
) -> None:
    first, second = await create(client, token), await create(client, token)
    assert [(await read(client, token, c)).get("queue_position") for c in (first, second)] == [1, 2]
    await client.post(f"/v1/chats/{first}/cancel", headers=bearer(token))
    # a cancelled chat leaves the queue: the one behind it moves up, and the cancelled one has no place
    assert "queue_position" not in await read(client, token, first)
    assert (await read(client, token, second))["queue_position"] == 1
    await run_worker()
    done = await read(client, token, second)
    assert done["status"] == "complete"
    assert "queue_position" not in done


async def test_chats_behind_a_busy_worker_report_positions_one_and_two(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    settings: Settings,
    llm_url: str,
) -> None:
    # the first chat's model answers only after 30 s: it holds the worker's one slot while the test runs
    busy = await create(client, token, model="fake?ttft_ms=30000")
    waiting = [await create(client, token), await create(client, token)]
    worker = make_worker(msgspec.structs.replace(settings, worker_concurrency=1), llm_url, poll_delay=0.05)
    main = asyncio.create_task(worker.main())
    try:
        async with asyncio.timeout(5):
            while (running := await read(client, token, busy))["status"] != "running":
                await asyncio.sleep(0.02)
        assert "queue_position" not in running
        views = [await read(client, token, c) for c in waiting]
        assert [(v["status"], v.get("queue_position")) for v in views] == [("queued", 1), ("queued", 2)]
    finally:
        await client.post(f"/v1/chats/{busy}/cancel", headers=bearer(token))
        await stop_worker(worker, main, grace=0.5)


async def test_a_queued_chat_whose_job_was_just_taken_has_no_position(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
) -> None:
    # a worker's START may take the job between the read of the status and the ZRANK: no place, no 500
    chat_id = await create(client, token)
    await client.server.app[CONTEXT].redis.zrem(keys.queue(), chat_id)
    view = await read(client, token, chat_id)
    assert view["status"] == "queued"
    assert "queue_position" not in view
