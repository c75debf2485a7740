"""Redis misbehaves under real processes: every client connection killed at once (a failover, a
proxy reset, Redis's own ``timeout``), or Redis frozen while the processes are told to stop."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis

from streambridge.fake_llm import expected_text
from streambridge.shared.events import Complete, Event, Started, assemble_text, decode_event
from streambridge.sse import SSEParser
from tests.conftest import OwnRedis
from tests.e2e.conftest import Process, clean_env, create_chat, fake_llm, login, start_together, stop_all

pytestmark = pytest.mark.e2e

# a token every 2 ms for 3 s: appends are in flight most of the time, so a kill lands on one
WORDS = 1500
FAST = f"fake?words={WORDS}&delay_ms=2"
KILLS = 40
GRACE = 2
UP_GRACE = 4


class Stack:
    """redis-server and fake-llm; with ``processes``, an edge, an api and a worker on them too."""

    def __init__(self, logs: Path, *, processes: bool = True) -> None:
        self.redis = OwnRedis()
        self.llm, llm_url = fake_llm(logs, "--ttft-ms", "10")
        env = clean_env(
            STREAMBRIDGE_REDIS_URL=self.redis.url(0),
            STREAMBRIDGE_LLM_BASE_URL=llm_url,
            STREAMBRIDGE_SHUTDOWN_GRACE=str(GRACE),
        )
        self.admin = redis.Redis.from_url(self.redis.url(0))
        self.processes = [self.llm]
        if not processes:
            start_together(*self.processes)
            return
        self.edge = Process(["edge", "--port", "0"], env, logs, wait=False)
        self.worker = Process(["worker"], env, logs, ready="worker started", wait=False)
        edge_url = self.edge.wait_ready().url
        self.api = Process(["api", "--port", "0"], {**env, "STREAMBRIDGE_PUBLIC_EDGE_URL": edge_url}, logs, wait=False)
        self.processes += [self.worker, self.api, self.edge]
        start_together(*self.processes)

    def stop(self) -> None:
        self.admin.close()  # (a paused Redis would hold even UNPAUSE: it is stopped paused)
        stop_all(self.processes)
        self.redis.stop()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path)
    yield stack
    stack.stop()


@pytest.fixture
def redis_and_llm(tmp_path: Path) -> Iterator[Stack]:
    """For a test that starts its own process (``up``) on them: no edge, api or worker of the stack's."""
    stack = Stack(tmp_path, processes=False)
    yield stack
    stack.stop()


async def read_to_the_end(session: aiohttp.ClientSession, url: str) -> list[Event]:
    """Every event of the chat, resuming with Last-Event-ID whenever the stream drops."""
    events: list[Event] = []
    last = ""
    while not events or not isinstance(events[-1], Complete):
        parser = SSEParser()
        try:
            async with session.get(url, headers={"Last-Event-ID": last} if last else {}) as response:
                async for chunk in response.content.iter_any():
                    for message in parser.feed(chunk):
                        events.append(decode_event(message.data))
                        last = message.id or last
        except aiohttp.ClientError:
            await asyncio.sleep(0.1)
    return events


async def test_connections_killed_by_redis_cost_a_retry_never_a_second_attempt(stack: Stack) -> None:
    prompts = [f"outlive a connection reset {n}" for n in range(6)]
    async with aiohttp.ClientSession() as session:
        auth = await login(session, stack.api.url)
        chats = [await create_chat(session, stack.api.url, auth, message=p, model=FAST) for p in prompts]
        readers = [asyncio.create_task(read_to_the_end(session, c["stream_url"])) for c in chats]
        await asyncio.sleep(0.8)  # every chat streaming
        killed = 0
        for _ in range(KILLS):
            killed += await asyncio.to_thread(stack.admin.execute_command, "CLIENT", "KILL", "TYPE", "normal")
            await asyncio.sleep(0.03)
        assert killed > 0
        results = await asyncio.wait_for(asyncio.gather(*readers), 30)
        async with session.get(f"{stack.llm.url}/_stats") as response:
            upstream = (await response.json())["paths"]
    for prompt, events in zip(prompts, results, strict=True):
        assert [e.attempt for e in events if isinstance(e, Started)] == [1]
        assert assemble_text(events) == expected_text(prompt, WORDS)
    assert upstream == {"/v1/chat/completions": len(prompts)}, "the upstream was called once per chat"


async def test_every_process_stops_within_its_grace_while_redis_is_frozen(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        auth = await login(session, stack.api.url)
        chat = await create_chat(session, stack.api.url, auth, message="freeze", model="fake?words=400&delay_ms=25")
        reading = asyncio.create_task(read_to_the_end(session, chat["stream_url"]))
        await asyncio.sleep(1.0)
        stack.admin.execute_command("CLIENT", "PAUSE", "30000", "ALL")
        # a request in flight on the frozen Redis, too
        posting = asyncio.create_task(session.post(f"{stack.api.url}/v1/chats", json={"message": "x"}, headers=auth))
        await asyncio.sleep(0.5)
        processes = {"worker": stack.worker, "api": stack.api, "edge": stack.edge}
        started = time.monotonic()
        for process in processes.values():
            process.proc.send_signal(signal.SIGTERM)
        took: dict[str, float] = {}
        codes: dict[str, int | None] = {}
        while len(took) < len(processes) and time.monotonic() - started < GRACE + 15:
            for name, process in processes.items():
                if name not in took and process.proc.poll() is not None:
                    took[name] = time.monotonic() - started
                    codes[name] = process.proc.returncode
            await asyncio.sleep(0.05)
        reading.cancel()
        posting.cancel()
        await asyncio.gather(reading, posting, return_exceptions=True)
    assert set(took) == set(processes), f"still running after {GRACE + 15} s: {set(processes) - set(took)}"
    assert codes == dict.fromkeys(processes, 0)
    assert max(took.values()) <= GRACE + 8, f"stopping took {took}"


async def test_up_stops_within_one_grace_while_redis_is_frozen(redis_and_llm: Stack, tmp_path: Path) -> None:
    """``up`` runs api, edge and a worker in one process: they stop together, not one after another."""
    stack = redis_and_llm
    env = clean_env(
        STREAMBRIDGE_REDIS_URL=stack.redis.url(1),
        STREAMBRIDGE_LLM_BASE_URL=f"{stack.llm.url}/v1",
        STREAMBRIDGE_SHUTDOWN_GRACE=str(UP_GRACE),
    )
    up = Process(["up", "--port", "0"], env, tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            auth = await login(session, up.url)
            chat = await create_chat(session, up.url, auth, message="freeze", model="fake?words=400&delay_ms=25")
            reading = asyncio.create_task(read_to_the_end(session, chat["stream_url"]))
            await asyncio.sleep(1.0)
            stack.admin.execute_command("CLIENT", "PAUSE", "30000", "ALL")
            started = time.monotonic()
            up.proc.send_signal(signal.SIGTERM)
            while up.proc.poll() is None and time.monotonic() - started < 2 * UP_GRACE + 15:
                await asyncio.sleep(0.05)
            took = time.monotonic() - started
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
        assert up.proc.returncode == 0
        # measured: about the grace and 2 s; one part after the other took 12 s
        assert took <= UP_GRACE + 4, f"stopping took {took:.1f} s"
    finally:
        up.stop()
