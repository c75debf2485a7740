"""Batches with the official openai SDK against real processes started through the CLI: the
round trip, a worker SIGKILLed mid-batch, and interactive chats beside a large batch."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import psutil
import pytest

from streambridge.fake_llm import expected_text
from streambridge.sse import SSEParser
from tests.e2e.conftest import Process, System, clean_env, create_chat, login, read_events

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def replacements(system: System) -> Iterator[list[Process]]:
    """Processes a test started in place of one it killed or stopped: stopped with the system."""
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


def line(custom_id: str, prompt: str, model: str = "fake?words=5") -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    item = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    return json.dumps(item).encode() + b"\n"


async def sdk_for(session: aiohttp.ClientSession, system: System) -> openai.AsyncOpenAI:
    auth = await login(session, system.api.url)
    return openai.AsyncOpenAI(base_url=f"{system.api.url}/v1", api_key=auth["Authorization"].removeprefix("Bearer "))


async def submit(sdk: openai.AsyncOpenAI, data: bytes) -> openai.types.Batch:
    uploaded = await sdk.files.create(file=("prompts.jsonl", io.BytesIO(data)), purpose="batch")
    return await sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")


async def until_ended(sdk: openai.AsyncOpenAI, batch_id: str, within: float = 60) -> openai.types.Batch:
    deadline = time.monotonic() + within
    while True:
        batch = await sdk.batches.retrieve(batch_id)
        if batch.status in {"completed", "failed", "expired", "cancelled"}:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status} after {within} s"
        await asyncio.sleep(0.2)


async def lines_of(sdk: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, object]]:
    assert file_id is not None
    return [json.loads(x) for x in (await sdk.files.content(file_id)).text.splitlines()]


async def items_done(
    session: aiohttp.ClientSession, system: System, sdk: openai.AsyncOpenAI, batch_id: str, n: int
) -> str:
    """Reads the batch's progress until ``n`` items ended; the last event's id."""
    parser = SSEParser()
    seen = 0
    headers = {"Authorization": f"Bearer {sdk.api_key}"}
    async with session.get(f"{system.api.url}/v1/batches/{batch_id}/events", headers=headers) as response:
        assert response.status == 200
        async for chunk in response.content.iter_any():
            for message in parser.feed(chunk):
                seen += message.event == "item"
                if seen >= n:
                    return str(message.id)
    raise AssertionError(f"the batch ended before {n} items did")


async def test_the_sdk_round_trip_with_a_refused_line_and_a_flaky_one(system: System) -> None:
    async with aiohttp.ClientSession() as session:
        sdk = await sdk_for(session, system)
        prompts = {f"r{n}": f"e2e prompt {n}" for n in range(10)}
        data = b"".join(line(cid, p) for cid, p in prompts.items())
        data += line("refused", "x", model="fake?no_such_option=1")
        data += line("flaky", "fails twice first", model="fake?words=5&fail=500&fail_times=2")
        batch = await until_ended(sdk, (await submit(sdk, data)).id)
        assert batch.status == "completed"
        assert batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (11, 1)
        output = {x["custom_id"]: x for x in await lines_of(sdk, batch.output_file_id)}
        assert set(output) == {*prompts, "flaky"}
        for cid, prompt in prompts.items():
            body = output[cid]["response"]["body"]  # type: ignore[index]
            assert body["choices"][0]["message"]["content"] == expected_text(prompt, 5)
        assert output["flaky"]["response"]["body"]["choices"][0]["message"]["content"] == expected_text(  # type: ignore[index]
            "fails twice first", 5
        )
        errors = await lines_of(sdk, batch.error_file_id)
        assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [("refused", 400)]  # type: ignore[index]
        await sdk.close()


async def test_a_worker_sigkilled_mid_batch_loses_no_item_and_doubles_none(
    system: System, replacements: list[Process]
) -> None:
    async with aiohttp.ClientSession() as session:
        sdk = await sdk_for(session, system)
        slow = "fake?words=20&delay_ms=15"  # about 0.3 s an item
        total = 300
        batch = await submit(sdk, b"".join(line(f"r{n}", f"kill {n}", model=slow) for n in range(total)))
        await items_done(session, system, sdk, batch.id, 20)
        children = psutil.Process(system.workers[0].proc.pid).children()
        (lane,) = [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]  # its batch lane
        system.workers[0].kill()  # its running items' leases lapse; the other worker runs them again
        lane.wait(5)  # and its lane goes with it (else it would finish them, unseen)
        system.workers[0] = Process(["worker"], system.env, system.logs, ready="worker started")
        replacements.append(system.workers[0])
        done = await until_ended(sdk, batch.id)
        assert done.status == "completed"
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (total, 0)
        output = await lines_of(sdk, done.output_file_id)
        assert sorted(x["custom_id"] for x in output) == sorted(f"r{n}" for n in range(total))  # once each
        reaped = [p for p in system.logs.glob("worker-*.log") if "lost their worker" in p.read_text()]
        assert reaped, "the killed worker had items running, and another worker ran them again"
        await sdk.close()


async def test_the_progress_stream_resumes_mid_batch_on_last_event_id(system: System) -> None:
    async with aiohttp.ClientSession() as session:
        sdk = await sdk_for(session, system)
        batch = await submit(
            sdk, b"".join(line(f"r{n}", f"resume {n}", model="fake?words=10&delay_ms=10") for n in range(40))
        )
        cut = await items_done(session, system, sdk, batch.id, 5)  # the connection drops here
        auth = {"Authorization": f"Bearer {sdk.api_key}"}
        rest = await read_events(
            session, f"{system.api.url}/v1/batches/{batch.id}/events", {**auth, "Last-Event-ID": cut}
        )
        everything = await read_events(session, f"{system.api.url}/v1/batches/{batch.id}/events", auth)
        ids = [m.id for m in everything]
        assert [m.id for m in rest] == ids[ids.index(cut) + 1 :]
        items = [json.loads(m.data) for m in everything if m.event == "item"]
        assert sorted(i["custom_id"] for i in items) == sorted(f"r{n}" for n in range(40))
        assert json.loads(everything[-1].data)["status"] == "completed"
        await sdk.close()


async def test_an_interactive_chat_is_not_held_up_by_a_large_batch(system: System) -> None:
    async with aiohttp.ClientSession() as session:
        sdk = await sdk_for(session, system)
        slow = "fake?words=5&delay_ms=250"  # about 1 s an item: the batch fills every spare slot for long
        batch = await submit(sdk, b"".join(line(f"r{n}", f"big {n}", model=slow) for n in range(2000)))
        await items_done(session, system, sdk, batch.id, 1)
        auth = await login(session, system.api.url)
        chats = [await create_chat(session, system.api.url, auth, message=f"interactive {n}") for n in range(5)]
        for chat in chats:
            events = await read_events(session, chat["stream_url"])
            assert events[-1].event == "complete"
        # the chats ran in the slots the batch leaves free: they ended long before it could
        running = await sdk.batches.retrieve(batch.id)
        assert running.status == "in_progress"
        assert running.request_counts is not None
        assert running.request_counts.completed < 2000
        cancelled = await until_ended(sdk, (await sdk.batches.cancel(batch.id)).id)
        assert cancelled.status == "cancelled"
        await sdk.close()


async def llm_requests(session: aiohttp.ClientSession, system: System) -> int:
    async with session.get(system.llm_url.removesuffix("/v1") + "/_stats") as response:
        return int((await response.json())["paths"].get("/v1/chat/completions", 0))


async def test_the_cli_interrupted_and_run_again_finishes_the_same_batch_once(system: System, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"cli prompt {n}\n" for n in range(40)))
    out = tmp_path / "out.jsonl"
    env = clean_env(XDG_STATE_HOME=str(tmp_path / "state"))
    model = "fake?words=5&delay_ms=300"  # about 1.5 s an item: the batch runs on past the interruption
    run = [sys.executable, "-m", "streambridge", "batch", "run", str(prompts), "-o", str(out)]
    run += ["--url", system.api.url, "--model", model]
    async with aiohttp.ClientSession() as session:
        before = await llm_requests(session, system)
        first = await asyncio.create_subprocess_exec(*run, env=env, stderr=asyncio.subprocess.PIPE)
        state = out.with_name("out.jsonl.batch.json")
        deadline = time.monotonic() + 20
        while not state.exists():
            assert time.monotonic() < deadline, "the CLI did not start a batch"
            await asyncio.sleep(0.05)
        first.send_signal(signal.SIGINT)
        _, said = await asyncio.wait_for(first.communicate(), 20)
        assert first.returncode == 0, said
        assert b"run the same command again" in said.lower()
        batch_id = json.loads(state.read_text())["batch_id"]

        again = await asyncio.to_thread(subprocess.run, run, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        assert f"re-attaching to batch {batch_id}" in again.stderr
        results = [json.loads(x) for x in out.read_text().splitlines()]
        assert [r["custom_id"] for r in results] == [f"line-{n + 1}" for n in range(40)]  # input order
        texts = [r["response"]["body"]["choices"][0]["message"]["content"] for r in results]
        assert texts == [expected_text(f"cli prompt {n}", 5) for n in range(40)]
        assert await llm_requests(session, system) - before == 40, "each prompt asked upstream once"

    for action in (["list"], ["status", batch_id], ["cancel", batch_id]):  # an ended batch stays as it is
        cli = await asyncio.create_subprocess_exec(
            *run[:3], "batch", *action, "--url", system.api.url, env=env, stdout=asyncio.subprocess.PIPE
        )
        said, _ = await asyncio.wait_for(cli.communicate(), 20)
        assert cli.returncode == 0
        assert [line.split()[:2] for line in said.decode().splitlines()] == [[batch_id, "completed"]], action


async def test_a_batch_survives_a_restart_of_the_api(system: System, replacements: list[Process]) -> None:
    async with aiohttp.ClientSession() as session:
        sdk = await sdk_for(session, system)
        model = "fake?words=10&delay_ms=30"
        batch = await submit(sdk, b"".join(line(f"r{n}", f"restart {n}", model=model) for n in range(100)))
        token = sdk.api_key
        await sdk.close()
        assert system.api.stop() == 0
        env = {**system.env, "STREAMBRIDGE_PUBLIC_EDGE_URL": system.edges[0].url}
        system.api = Process(["api", "--port", "0"], env, system.logs)
        replacements.append(system.api)
        sdk = openai.AsyncOpenAI(base_url=f"{system.api.url}/v1", api_key=token)
        done = await until_ended(sdk, batch.id)
        assert done.status == "completed"
        assert done.request_counts is not None
        assert done.request_counts.completed == 100
        await sdk.close()


async def worker_logs_say(system: System, text: str, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not any(text in p.read_text() for p in system.logs.glob("worker-*.log")):
        assert time.monotonic() < deadline, f"no worker said {text!r} within {within} s"
        await asyncio.sleep(0.05)


async def test_upstream_429s_slow_the_batch_which_completes_once_per_item_while_chats_run_first_time(
    system: System,
) -> None:
    async with aiohttp.ClientSession() as session:
        sdk = await sdk_for(session, system)
        # every item is refused twice with a 429 (each asking for 0.3 s) before it is answered
        limited = "fake?words=5&fail=429&fail_times=2&retry_after=0.3"
        total = 120
        before = await llm_requests(session, system)
        batch = await submit(sdk, b"".join(line(f"r{n}", f"limited {n}", model=limited) for n in range(total)))
        await worker_logs_say(system, "the upstream is rate limiting")  # the batch is backing off now
        auth = await login(session, system.api.url)
        chats = await asyncio.gather(
            *(create_chat(session, system.api.url, auth, message=f"first {n}") for n in range(10))
        )
        for chat in chats:
            events = await read_events(session, chat["stream_url"])
            assert events[-1].event == "complete"
            assert not [m for m in events if m.event in {"error", "status"}], "no chat retried or waited"
            assert json.loads(events[-1].data)["attempt"] == 1

        done = await until_ended(sdk, batch.id)
        assert done.status == "completed"
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (total, 0)
        output = await lines_of(sdk, done.output_file_id)
        assert sorted(x["custom_id"] for x in output) == sorted(f"r{n}" for n in range(total))  # once each
        # beside one request a chat: each item twice refused, then answered (a 429 is not an attempt);
        # more if a lease lapsed and an item ran again, but its result line is still written once (above)
        assert await llm_requests(session, system) - before - len(chats) >= 3 * total
        await sdk.close()


def lane_of(worker: Process) -> psutil.Process | None:
    """The worker's batch lane, if one runs (a dead, unreaped one is a zombie)."""
    lanes = []
    for child in psutil.Process(worker.proc.pid).children():
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                lanes.append(child)
        except psutil.ZombieProcess:
            lanes.append(child)  # the dead lane, not reaped (yet)
    return lanes[-1] if lanes else None


async def test_a_lane_sigkilled_is_reaped_logged_and_started_again_by_its_worker(system: System) -> None:
    worker = system.workers[0]
    first = lane_of(worker)
    assert first is not None
    first.send_signal(signal.SIGKILL)  # as the OOM killer would
    deadline = time.monotonic() + 20
    while (lane := lane_of(worker)) is None or lane.pid == first.pid or lane.status() == psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "no new lane"
        await asyncio.sleep(0.1)
    assert f"pid {first.pid} exited with code -9" in worker.log_path.read_text()
    async with aiohttp.ClientSession() as session:
        sdk = await sdk_for(session, system)
        batch = await until_ended(sdk, (await submit(sdk, b"".join(line(f"r{n}", f"k {n}") for n in range(20)))).id)
        assert batch.status == "completed"
        await sdk.close()
