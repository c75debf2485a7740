"""Metrics of real processes started through the CLI: each worker's own port, the API's and the edge's."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest

from tests.e2e.conftest import Process, System, create_chat, login, metrics_url, read_events, scrape

pytestmark = pytest.mark.e2e


async def test_each_workers_own_port_serves_its_chats_metrics_and_readiness(system: System) -> None:
    async with aiohttp.ClientSession() as session:
        auth = await login(session, system.api.url)
        chat = await create_chat(session, system.api.url, auth, message="metrics, please")
        events = await read_events(session, chat["stream_url"])
        assert events[-1].event == "complete"
        complete = ("streambridge_chats_finished_total", (("status", "complete"),))
        deadline = time.monotonic() + 10
        while True:  # the worker counts the chat just after its last event is written
            scraped = [await scrape(session, metrics_url(worker)) for worker in system.workers]
            if sum(s[complete] for s in scraped) >= 1 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert sum(s[complete] for s in scraped) >= 1
        assert sum(s["streambridge_pickup_seconds_count", ()] for s in scraped) >= 1
        assert all(("streambridge_queue_depth", (("queue", "interactive"),)) in s for s in scraped)
        for worker in system.workers:
            async with session.get(f"{metrics_url(worker)}/readyz") as response:
                assert response.status == 200
                assert (await response.json())["checks"] == {"process": "ok", "redis": "ok"}
        api = await scrape(session, system.api.url)
        assert api["streambridge_chats_created_total", ()] >= 1
        edges = [await scrape(session, edge.url) for edge in system.edges]
        assert all(("streambridge_open_streams", ()) in e for e in edges)
        assert not any(name == "streambridge_queue_depth" for e in edges for name, _ in e)  # the API's to read
        assert api["streambridge_queue_depth", (("queue", "interactive"),)] == 0
        for process in (system.api, *system.edges):
            async with session.get(f"{process.url}/readyz") as response:
                assert response.status == 200


async def test_a_worker_with_metrics_off_serves_readiness_and_no_metrics(system: System) -> None:
    env = {**system.env, "STREAMBRIDGE_METRICS": "false"}
    worker = Process(["worker", "--metrics-port", "0"], env, system.logs, ready="worker started")
    try:
        url = metrics_url(worker)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/metrics") as response:
                assert response.status == 404
                assert (await response.json())["error"]["code"] == "metrics_disabled"
            deadline = time.monotonic() + 10
            while True:  # ready once arq's startup is done, just after the worker says it started
                async with session.get(f"{url}/readyz") as response:
                    body = await response.json()
                if response.status == 200 or time.monotonic() > deadline:
                    break
                # starting, or started with a PING slower than the check waits (a busy machine)
                assert body["checks"]["process"] == "starting" or body["checks"]["redis"] != "ok", body
                await asyncio.sleep(0.05)
            assert response.status == 200, body
    finally:
        assert worker.stop() == 0


async def test_a_killed_workers_chat_is_counted_reaped_and_resumed_by_the_other(system: System) -> None:
    running = ("streambridge_running_chats", ())
    async with aiohttp.ClientSession() as session:
        auth = await login(session, system.api.url)
        chat = await create_chat(
            session, system.api.url, auth, message="outlive me", model="fake?words=150&delay_ms=20"
        )
        await read_events(session, chat["stream_url"], limit=3)  # started, and content flowing
        busy = [w for w in system.workers if (await scrape(session, metrics_url(w)))[running] >= 1]
        assert len(busy) == 1
        (survivor,) = [w for w in system.workers if w is not busy[0]]
        before = await scrape(session, metrics_url(survivor))
        busy[0].kill()
        try:
            events = await read_events(session, chat["stream_url"])
            assert events[-1].event == "complete"
            after = await scrape(session, metrics_url(survivor))
            for kind in ("reaped", "resumed"):
                key = ("streambridge_recoveries_total", (("kind", kind),))
                assert after[key] - before[key] == 1, kind
        finally:
            system.workers[system.workers.index(busy[0])] = Process(
                ["worker"], system.env, system.logs, ready="worker started"
            )


async def test_a_stopping_edge_answers_readyz_503_before_its_port_closes(system: System) -> None:
    edge = system.start_edge(STREAMBRIDGE_SHUTDOWN_DRAIN="2")
    seen: list[int | str] = []
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{edge.url}/readyz") as response:
                assert response.status == 200
            started = time.monotonic()
            edge.proc.send_signal(signal.SIGTERM)
            while time.monotonic() - started < 15:
                try:
                    async with session.get(f"{edge.url}/readyz", headers={"Connection": "close"}) as response:
                        seen.append(response.status)
                except aiohttp.ClientConnectionError:
                    seen.append("refused")
                    break
                await asyncio.sleep(0.05)
        assert edge.proc.wait(15) == 0
    finally:
        edge.stop()
    assert seen[-1] == "refused", seen
    assert 503 in seen, f"no probe saw the 503 before the port closed: {seen}"
    assert 200 not in seen[seen.index(503) :], seen


async def test_batch_items_run_in_the_lane_are_counted_on_their_workers_port(system: System) -> None:
    from tests.e2e.test_batches import line, sdk_for, submit, until_ended

    completed = ("streambridge_batch_items_total", (("outcome", "completed"),))
    running = ("streambridge_running_batch_items", ())
    async with aiohttp.ClientSession() as session:
        before = [await scrape(session, metrics_url(w)) for w in system.workers]
        sdk = await sdk_for(session, system)
        slow = "fake?words=60&delay_ms=40"  # ~2.5 s: long enough to be seen running
        data = line("a", "one") + line("b", "two") + line("c", "three", model=slow)
        batch = await submit(sdk, data)
        most = 0.0
        deadline = time.monotonic() + 60
        while (await sdk.batches.retrieve(batch.id)).status not in {"completed", "failed", "cancelled"}:
            assert time.monotonic() < deadline
            now = [await scrape(session, metrics_url(w)) for w in system.workers]
            most = max(most, sum(s[running] for s in now))
            await asyncio.sleep(0.1)
        ended = await until_ended(sdk, batch.id)
        assert ended.status == "completed"
        await sdk.close()
        deadline = time.monotonic() + 5
        while True:  # the lane says what runs every 0.2 s
            after = [await scrape(session, metrics_url(w)) for w in system.workers]
            if all(a[running] == 0 for a in after) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    assert sum(a[completed] - b.get(completed, 0) for a, b in zip(after, before, strict=True)) == 3
    assert most >= 1, "the lane's running item was never seen on its worker's port"
    assert all(a[running] == 0 for a in after)


async def test_two_workers_with_default_settings_start_on_one_host(system: System) -> None:
    env = {k: v for k, v in system.env.items() if k != "STREAMBRIDGE_WORKER_METRICS_PORT"}
    first = Process(["worker"], env, system.logs, ready="worker started")
    try:
        second = Process(["worker"], env, system.logs, ready="worker started")
        try:
            urls = {metrics_url(first), metrics_url(second)}
            assert len(urls) == 2, urls
            # the warning goes through the log's writer thread: it may land just after "worker started"
            said = lambda: "taken" in second.log_path.read_text() + "".join(second.stdout)  # noqa: E731
            deadline = time.monotonic() + 10
            while not said() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert said(), "the fallback is said"
            async with aiohttp.ClientSession() as session:
                for url in urls:
                    async with session.get(f"{url}/metrics") as response:
                        assert response.status == 200
        finally:
            assert second.stop() == 0
    finally:
        assert first.stop() == 0
