"""Faults with real processes: a worker SIGKILLed, frozen (a zombie), or stopped; a running chat cancelled.

Workers are started and killed by each test; the rest (redis-server, fake-llm, api, edge) is shared.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from streambridge.fake_llm import expected_text
from streambridge.shared.events import Cancelled, Complete, Content, Event, Started, Status, assemble_text, decode_event
from streambridge.shared.streams import id_key
from streambridge.sse import SSEParser
from tests.conftest import OwnRedis
from tests.e2e.conftest import Process, clean_env, create_chat, fake_llm, login, start_together, stop_all

pytestmark = pytest.mark.e2e

WORDS = 150
SLOW = f"fake?words={WORDS}&delay_ms=25"  # about 4 s of streaming


class Deployment:
    def __init__(self, logs: Path) -> None:
        self.redis = OwnRedis()
        self.logs = logs
        self.llm, llm_url = fake_llm(logs, "--ttft-ms", "10", "--delay-ms", "5")
        self.env = clean_env(
            STREAMBRIDGE_REDIS_URL=self.redis.url(0),
            STREAMBRIDGE_LLM_BASE_URL=llm_url,
            STREAMBRIDGE_LEASE_TTL="1.5",
        )
        self.edge = Process(["edge", "--port", "0"], self.env, logs)
        edge_env = {**self.env, "STREAMBRIDGE_PUBLIC_EDGE_URL": self.edge.url}
        self.api = Process(["api", "--port", "0"], edge_env, logs, wait=False)
        start_together(self.llm, self.api)
        self.workers: list[Process] = []

    def worker(self, **env: str) -> Process:
        process = Process(["worker"], {**self.env, **env}, self.logs, ready="worker started")
        self.workers.append(process)
        return process

    def stop(self) -> None:
        stop_all(thawed([*self.workers, self.api, self.edge, self.llm]))
        self.redis.stop()


def thawed(processes: list[Process]) -> list[Process]:
    """``processes``, each SIGCONTed first if still running: a frozen one could not stop."""
    for process in processes:
        if process.proc.poll() is None:
            os.kill(process.proc.pid, signal.SIGCONT)
    return processes


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path_factory.mktemp("recovery"))
    yield deployment
    deployment.stop()


@pytest.fixture(autouse=True)
def no_workers_left(deployment: Deployment) -> Iterator[None]:
    yield
    stop_all(thawed(deployment.workers))
    deployment.workers.clear()


async def follow(session: aiohttp.ClientSession, url: str) -> AsyncIterator[tuple[float, str, Event]]:
    """(arrival time, id, event) for every event of the chat, to the end."""
    parser = SSEParser()
    async with session.get(url) as response:
        assert response.status == 200
        async for chunk in response.content.iter_any():
            for message in parser.feed(chunk):
                yield time.monotonic(), message.id or "", decode_event(message.data)


def check(received: list[tuple[float, str, Event]], prompt: str) -> list[Event]:
    ids = [id_key(i) for _, i, _ in received]
    assert ids == sorted(set(ids)), "ids strictly increase, none twice"
    events = [e for _, _, e in received]
    assert isinstance(events[-1], Complete)
    assert assemble_text(events) == expected_text(prompt, WORDS)
    return events


async def test_a_sigkilled_workers_chat_runs_again_on_another_within_3_seconds(deployment: Deployment) -> None:
    prompt = "survive a worker crash"
    first = deployment.worker()
    async with aiohttp.ClientSession() as session:
        auth = await login(session, deployment.api.url)
        chat = await create_chat(session, deployment.api.url, auth, message=prompt, model=SLOW)
        received: list[tuple[float, str, Event]] = []
        killed_at = 0.0
        async for arrival, entry_id, event in follow(session, chat["stream_url"]):
            received.append((arrival, entry_id, event))
            if isinstance(event, Content) and event.index == 10 and not killed_at:
                deployment.worker()  # the survivor, idle until the crash
                first.kill()
                killed_at = time.monotonic()
    events = check(received, prompt)
    restarted = next(t for t, _, e in received if isinstance(e, Started) and e.attempt == 2)
    assert restarted - killed_at < 3.0, f"recovered after {restarted - killed_at:.2f} s"
    assert any(isinstance(e, Status) and "worker lost" in e.message for e in events)
    assert events[-1].attempt == 2  # type: ignore[union-attr]


async def test_a_frozen_worker_that_wakes_up_appends_nothing_more(deployment: Deployment) -> None:
    prompt = "zombie worker"
    zombie = deployment.worker()
    async with aiohttp.ClientSession() as session:
        auth = await login(session, deployment.api.url)
        chat = await create_chat(session, deployment.api.url, auth, message=prompt, model=SLOW)
        received: list[tuple[float, str, Event]] = []
        async for arrival, entry_id, event in follow(session, chat["stream_url"]):
            received.append((arrival, entry_id, event))
            if isinstance(event, Content) and event.index == 10 and event.attempt == 1:
                deployment.worker()
                os.kill(zombie.proc.pid, signal.SIGSTOP)  # paused: its lease lapses, another worker takes over
            if isinstance(event, Content) and event.index == 5 and event.attempt == 2:
                os.kill(zombie.proc.pid, signal.SIGCONT)  # wakes up mid-stream, still believing it runs the chat
    events = check(received, prompt)
    second = next(n for n, e in enumerate(events) if isinstance(e, Started) and e.attempt == 2)
    assert all(getattr(e, "attempt", 2) == 2 for e in events[second:]), "the zombie's appends were fenced off"


async def test_sigterm_lets_a_short_chat_finish_and_hands_a_long_one_back_at_once(deployment: Deployment) -> None:
    prompt = "hand me back"
    leaving = deployment.worker(STREAMBRIDGE_SHUTDOWN_GRACE="0.5")
    async with aiohttp.ClientSession() as session:
        auth = await login(session, deployment.api.url)
        chat = await create_chat(session, deployment.api.url, auth, message=prompt, model=SLOW)
        received: list[tuple[float, str, Event]] = []
        signalled_at = 0.0
        async for arrival, entry_id, event in follow(session, chat["stream_url"]):
            received.append((arrival, entry_id, event))
            if isinstance(event, Content) and event.index == 10 and not signalled_at:
                deployment.worker()
                leaving.proc.send_signal(signal.SIGTERM)
                signalled_at = time.monotonic()
    assert leaving.proc.wait(10) == 0
    events = check(received, prompt)
    restarted = next(t for t, _, e in received if isinstance(e, Started) and e.attempt == 2)
    # grace (0.5 s) + hand-back: well before the 1.5 s lease could have lapsed
    assert restarted - signalled_at < 1.5, f"resumed after {restarted - signalled_at:.2f} s"
    assert events[-1].attempt == 2  # type: ignore[union-attr]


async def test_cancelling_a_running_chat_closes_the_upstream_within_500_ms(deployment: Deployment) -> None:
    deployment.worker()
    async with aiohttp.ClientSession() as session:
        auth = await login(session, deployment.api.url)
        chat = await create_chat(session, deployment.api.url, auth, message="cancel me", model=SLOW)
        events: list[Event] = []
        closed_after = None
        async for _, _, event in follow(session, chat["stream_url"]):
            events.append(event)
            if isinstance(event, Content) and event.index == 5:
                async with session.get(f"{deployment.llm.url}/_stats") as response:
                    assert (await response.json())["streams_open"] == 1
                started = time.monotonic()
                async with session.post(f"{deployment.api.url}/v1/chats/{chat['id']}/cancel", headers=auth) as r:
                    assert r.status == 202
                while closed_after is None:
                    async with session.get(f"{deployment.llm.url}/_stats") as response:
                        if (await response.json())["streams_open"] == 0:
                            closed_after = time.monotonic() - started
                    await asyncio.sleep(0.01)
        assert events[-1] == Cancelled()
        assert closed_after is not None
        assert closed_after < 0.5, f"the provider saw the close after {closed_after:.3f} s"
        async with session.get(f"{deployment.api.url}/v1/chats/{chat['id']}", headers=auth) as response:
            assert (await response.json())["status"] == "cancelled"
        async with session.post(f"{deployment.api.url}/v1/chats/{chat['id']}/cancel", headers=auth) as response:
            assert (await response.json())["status"] == "cancelled"
