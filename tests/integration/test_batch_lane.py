"""The batch lane (``workers/lane.py``): a worker's batch items in a child process at a lower CPU
priority, claiming only into the slots the worker's chats leave free."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import msgspec
import openai
import psutil
import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from streambridge.shared import keys
from streambridge.shared.settings import Settings
from streambridge.workers.lane import NICE, BatchLane
from tests.integration.test_batches import jsonl, line, submit


@pytest.fixture
async def sdk(client: TestClient, token: str) -> AsyncIterator[openai.AsyncOpenAI]:  # type: ignore[type-arg]
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=token, max_retries=0)
    yield sdk
    await sdk.close()


async def completed(sdk: openai.AsyncOpenAI, batch_id: str) -> int:
    counts = (await sdk.batches.retrieve(batch_id)).request_counts
    assert counts is not None
    return counts.completed


async def test_the_lane_runs_items_niced_only_in_slots_its_workers_chats_leave_and_hands_back_on_stop(
    sdk: openai.AsyncOpenAI, settings: Settings, llm_url: str, real_redis: Redis
) -> None:
    lane = BatchLane(msgspec.structs.replace(settings, worker_concurrency=10, batch_reserved_slots=2), llm_url)
    lane.busy(8)  # the worker's chats and the reserve fill its 10 slots: no room for an item
    lane.start()
    try:
        assert lane.pid is not None
        deadline = time.monotonic() + 20
        while psutil.Process(lane.pid).nice() != os.nice(0) + NICE:  # once the spawned child has started
            assert time.monotonic() < deadline, "the lane is not niced"
            await asyncio.sleep(0.05)
        batch = await submit(sdk, jsonl(*(line(f"r{n}", f"lane {n}") for n in range(6))))
        await asyncio.sleep(1.0)  # the lane looks for room every 0.1 s
        assert await completed(sdk, batch.id) == 0
        assert await real_redis.zcard(keys.batch_leases(batch.id)) == 0, "no item claimed"

        lane.busy(0)  # the chats ended: the lane fills the free slots
        deadline = time.monotonic() + 20
        while await completed(sdk, batch.id) < 6:
            assert time.monotonic() < deadline, "the lane ran no items"
            await asyncio.sleep(0.05)
    finally:
        await lane.stop()
    assert lane.exitcode == 0  # a clean stop: it handed back what it ran (nothing, by now)
