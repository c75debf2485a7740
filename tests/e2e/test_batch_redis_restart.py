"""A batch across a restart of Redis itself: its own redis-server, persisting every write to its
append-only file (``appendfsync always``), stopped mid-batch and started again on the same port and
directory, while the API and workers ride out the outage."""

from __future__ import annotations

import asyncio
import json
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import psutil
import pytest

from tests.conftest import OwnRedis
from tests.e2e.conftest import Process, clean_env, fake_llm, login, start_together, stop_all
from tests.e2e.test_batches import line, lines_of, submit, until_ended

pytestmark = pytest.mark.e2e

#: the items' lease (STREAMBRIDGE_LEASE_TTL), and how long Redis stays down: longer, so leases lapse
LEASE_TTL = 1.0
OUTAGE = 2 * LEASE_TTL


@pytest.fixture
def persistent() -> Iterator[tuple[OwnRedis, Process, list[Process]]]:
    """A redis-server that fsyncs every write, fake-llm, api and two workers."""
    redis = OwnRedis("--appendonly", "yes", "--appendfsync", "always")
    logs = Path(tempfile.mkdtemp(prefix="sb-e2e-restart-"))
    started: list[Process] = []
    try:
        llm, llm_url = fake_llm(logs, "--ttft-ms", "20", "--delay-ms", "5")
        started.append(llm)
        env = clean_env(
            STREAMBRIDGE_REDIS_URL=redis.url(0),
            STREAMBRIDGE_LLM_BASE_URL=llm_url,
            STREAMBRIDGE_BATCH_WORKER_CONCURRENCY="10",  # a slow batch: mid-way for a while
            STREAMBRIDGE_LEASE_TTL=str(LEASE_TTL),  # explicit: the outage below outlasts it
        )
        api = Process(["api", "--port", "0"], env, logs, wait=False)
        started.append(api)
        started += [Process(["worker"], env, logs, ready="worker started", wait=False) for _ in range(2)]
        start_together(*started)
        yield redis, api, started
    finally:
        stop_all(reversed(started))
        redis.stop()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_a_batch_finishes_each_item_exactly_once_across_a_restart_of_redis(
    persistent: tuple[OwnRedis, Process, list[Process]], how: str
) -> None:
    redis, api, processes = persistent
    total = 200
    model = "fake?words=5&delay_ms=40"  # about 0.3 s an item, 20 at once: about 3 s in all
    async with aiohttp.ClientSession() as session:
        token = (await login(session, api.url))["Authorization"].removeprefix("Bearer ")
        sdk = openai.AsyncOpenAI(base_url=f"{api.url}/v1", api_key=token, max_retries=8)
        batch = await submit(sdk, b"".join(line(f"r{n}", f"restart {n}", model=model) for n in range(total)))
        deadline = time.monotonic() + 30
        while True:  # mid-way: some items done, many not
            counts = (await sdk.batches.retrieve(batch.id)).request_counts
            assert counts is not None
            if counts.completed >= 30:
                break
            assert time.monotonic() < deadline, "the batch did not get going"
            await asyncio.sleep(0.05)
        assert counts.completed < total - 50, "the batch ran too fast to be stopped mid-way"

        if how == "sigkill":
            redis.kill()  # a crash: only what was fsynced survives, which is every acknowledged write
        else:
            redis.process.send_signal(signal.SIGTERM)  # a graceful shutdown
            redis.process.wait(10)
        await asyncio.sleep(OUTAGE)  # longer than a lease: running items' leases lapse meanwhile
        redis.start()

        done = await until_ended(sdk, batch.id, within=90)
        assert done.status == "completed"
        assert done.request_counts is not None
        counts = done.request_counts
        assert (counts.completed, counts.failed, counts.total) == (total, 0, total)
        output = await lines_of(sdk, done.output_file_id)
        assert sorted(x["custom_id"] for x in output) == sorted(f"r{n}" for n in range(total))  # once each
        assert done.error_file_id is None
        # the progress stream tells each item once, and its counts end where the batch's do
        headers = {"Authorization": f"Bearer {token}"}
        async with session.get(f"{api.url}/v1/batches/{batch.id}/events", headers=headers) as response:
            text = await response.text()
        events = [json.loads(x.removeprefix("data: ")) for x in text.splitlines() if x.startswith("data: ")]
        items = [e["custom_id"] for e in events if e["type"] == "item"]
        assert sorted(items) == sorted(f"r{n}" for n in range(total))
        assert events[-1] == {"type": "end", "status": "completed", "completed": total, "failed": 0, "total": total}
        await sdk.close()
    for process in processes:
        assert process.proc.poll() is None, f"{process.args[0]} exited during the outage"
    for worker in (p for p in processes if p.args[0] == "worker"):
        lanes = [
            c
            for c in psutil.Process(worker.proc.pid).children()
            if "resource_tracker" not in " ".join(c.cmdline()) and c.status() != psutil.STATUS_ZOMBIE
        ]
        assert len(lanes) == 1, f"worker {worker.proc.pid}'s batch lane is gone after the outage"
