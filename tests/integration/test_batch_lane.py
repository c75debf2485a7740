"""The batch lane (``workers/lane.py``): a worker's batch items in a child process at a lower CPU
priority, claiming only into the slots the worker's chats leave free."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import openai
import psutil
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from streambridge.shared import keys
from streambridge.shared.settings import Settings
from streambridge.workers import lane as lane_module
from streambridge.workers.lane import NICE, BatchLane
from streambridge.workers.ops import make_worker_app
from streambridge.workers.worker import make_worker, stop_worker
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


async def test_the_lane_runs_items_niced_only_in_slots_its_workers_chats_leave(
    sdk: openai.AsyncOpenAI, settings: Settings, llm_url: str, real_redis: Redis
) -> None:
    lane = BatchLane(msgspec.structs.replace(settings, worker_concurrency=10, batch_reserved_slots=2), llm_url)
    lane.start()
    try:
        assert lane.pid is not None
        # first proven running and claiming: with no chats, a batch completes
        warm = await submit(sdk, jsonl(*(line(f"w{n}", f"warm {n}") for n in range(3))))
        deadline = time.monotonic() + 20
        while await completed(sdk, warm.id) < 3:
            assert time.monotonic() < deadline, "the lane ran no items"
            await asyncio.sleep(0.05)
        assert psutil.Process(lane.pid).nice() == os.nice(0) + NICE
        # born with SIGINT blocked (BatchLane.start), it ignores it, and unblocked
        text = await asyncio.to_thread(Path(f"/proc/{lane.pid}/status").read_text)
        status = dict(row.split(":\t") for row in text.splitlines())
        sigint = 1 << (signal.SIGINT - 1)
        assert int(status["SigIgn"], 16) & sigint
        assert not int(status["SigBlk"], 16) & sigint

        lane.busy(8)  # the worker's chats and the reserve fill its 10 slots: no room for an item
        await asyncio.sleep(0.3)  # the lane reads the counter each time it looks for room (every 0.1 s)
        batch = await submit(sdk, jsonl(*(line(f"r{n}", f"lane {n}") for n in range(6))))
        await asyncio.sleep(1.0)  # ten looks
        assert await completed(sdk, batch.id) == 0
        assert await real_redis.zcard(keys.batch_leases(batch.id)) == 0, "no item claimed"

        lane.busy(0)  # the chats ended: the lane fills the free slots
        deadline = time.monotonic() + 20
        while await completed(sdk, batch.id) < 6:
            assert time.monotonic() < deadline, "the lane ran no items"
            await asyncio.sleep(0.05)
    finally:
        await lane.stop()
    assert lane.exitcode == 0


async def test_a_lane_stopped_with_items_running_hands_every_one_back(
    sdk: openai.AsyncOpenAI, settings: Settings, llm_url: str, real_redis: Redis
) -> None:
    lane = BatchLane(settings, llm_url)
    lane.start()
    n = 5
    slow = "fake?words=100&delay_ms=100"  # 10 s an item: all still running at the stop
    batch = await submit(sdk, jsonl(*(line(f"r{i}", f"slow {i}", model=slow) for i in range(n))))
    try:
        deadline = time.monotonic() + 20
        while await real_redis.zcard(keys.batch_leases(batch.id)) < n:
            assert time.monotonic() < deadline, "the lane claimed too few"
            await asyncio.sleep(0.05)
    finally:
        await lane.stop()
    assert lane.exitcode == 0  # a clean stop, not a kill
    assert await real_redis.zcard(keys.batch_leases(batch.id)) == 0
    assert sorted(int(i) for i in await real_redis.lrange(keys.batch_again(batch.id), 0, -1)) == list(range(n))  # type: ignore[misc]


async def until_status(sdk: openai.AsyncOpenAI, batch_id: str, statuses: set[str], within: float = 20) -> str:
    deadline = time.monotonic() + within
    while (status := (await sdk.batches.retrieve(batch_id)).status) not in statuses:
        assert time.monotonic() < deadline, f"batch {batch_id} still {status}"
        await asyncio.sleep(0.05)
    return status


async def test_a_killed_lane_is_logged_reaped_and_started_again_and_its_batch_completes(
    sdk: openai.AsyncOpenAI, settings: Settings, llm_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    worker = make_worker(settings, llm_url, lane=True)
    main = asyncio.create_task(worker.main())
    try:
        deadline = time.monotonic() + 20
        while worker.lane is None or not worker.lane.alive:
            assert time.monotonic() < deadline, "no lane started"
            await asyncio.sleep(0.05)
        first = worker.lane.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)  # as the OOM killer would
        deadline = time.monotonic() + 20
        while worker.lane.pid == first or not worker.lane.alive:
            assert time.monotonic() < deadline, "the dead lane was not started again"
            await asyncio.sleep(0.05)
        assert not psutil.pid_exists(first) or psutil.Process(first).status() != psutil.STATUS_ZOMBIE, "not reaped"
        assert any("exited with code -9" in r.getMessage() for r in caplog.records), "the death was not logged"
        batch = await submit(sdk, jsonl(*(line(f"r{n}", f"again {n}") for n in range(4))))
        assert await until_status(sdk, batch.id, {"completed", "failed"}) == "completed"
    finally:
        await stop_worker(worker, main, grace=1)


async def test_a_batch_cancelled_while_the_lane_is_dead_still_ends_cancelled(
    sdk: openai.AsyncOpenAI, settings: Settings, llm_url: str, real_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lane_module, "RESTART_DELAYS", (60.0,))  # it stays dead for the test
    worker = make_worker(msgspec.structs.replace(settings, lease_ttl=1.0), llm_url, lane=True)
    main = asyncio.create_task(worker.main())
    try:
        deadline = time.monotonic() + 20
        while worker.lane is None or not worker.lane.alive:
            assert time.monotonic() < deadline, "no lane started"
            await asyncio.sleep(0.05)
        slow = "fake?words=100&delay_ms=100"  # 10 s an item: running when the lane dies
        batch = await submit(sdk, jsonl(*(line(f"r{n}", f"dead {n}", model=slow) for n in range(4))))
        deadline = time.monotonic() + 20
        while await real_redis.zcard(keys.batch_leases(batch.id)) < 4:
            assert time.monotonic() < deadline, "the lane claimed nothing"
            await asyncio.sleep(0.05)
        assert worker.lane.pid is not None
        os.kill(worker.lane.pid, signal.SIGKILL)  # its items' leases stay, until they lapse
        while worker.lane.alive:
            await asyncio.sleep(0.05)
        async with TestClient(TestServer(make_worker_app(worker, main))) as ops:
            ready = await ops.get("/readyz")
            assert ready.status == 503, "a worker whose lane is down is not ready"
        assert (await sdk.batches.cancel(batch.id)).status == "cancelling"
        assert await until_status(sdk, batch.id, {"cancelled"}, within=10) == "cancelled"
    finally:
        await stop_worker(worker, main, grace=1)


async def test_the_lane_logs_as_its_worker_does_json_with_credentials_redacted_and_no_request_lines(
    sdk: openai.AsyncOpenAI, settings: Settings, llm_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    with_password = llm_url.replace("://", "://u:hunter2@", 1)  # an LLM URL with its credentials in it
    lane = BatchLane(msgspec.structs.replace(settings, log_format="json", log_level="INFO"), with_password)
    lane.start()
    try:
        batch = await submit(
            sdk, jsonl(line("r0", "logged"), line("r1", "limited", model="fake?fail=429&fail_times=1"))
        )
        assert await until_status(sdk, batch.id, {"completed", "failed"}) == "completed"
    finally:
        await lane.stop()
    err = capfd.readouterr().err
    lines = [json.loads(x) for x in err.splitlines() if x.strip()]  # every line JSON
    assert any("batch lane: running" in x["message"] for x in lines), repr(err)
    assert all(x.get("role") == "worker" for x in lines), err
    assert "hunter2" not in err
    assert "HTTP Request" not in err


async def test_chats_starting_count_as_busy_for_the_lane_as_well_as_chats_running(
    settings: Settings, llm_url: str
) -> None:
    worker = make_worker(settings, llm_url)
    told: list[int] = []

    class Told:
        def busy(self, chats: int) -> None:
            told.append(chats)

    worker.lane = Told()  # type: ignore[assignment]
    held = worker.reserve(3)  # slots held for starts in flight: not the lane's to claim
    assert told[-1] == 3
    worker.unreserve(held)
    assert told[-1] == 0
    worker.lane = None
    await worker.close()
