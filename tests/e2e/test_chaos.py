"""Chaos: 50 concurrent chats while clients drop at random and edges and workers are SIGKILLed.

Every chat must reach a terminal event, every reader's text must equal the simulated LLM's
known output, and no reader may see an id twice or out of order. Prints what happened.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from streambridge.fake_llm import expected_text
from streambridge.shared.events import Complete, Event, Started, Status, assemble_text, decode_event, is_terminal
from streambridge.shared.streams import id_key
from streambridge.sse import SSEParser
from tests.conftest import OwnRedis
from tests.e2e.conftest import (
    Process,
    clean_env,
    create_chat,
    fake_llm,
    login,
    metrics_url,
    scrape,
    start_together,
    stop_all,
)

pytestmark = pytest.mark.e2e

CHATS = 50
WORDS = 80
EDGES = 3
WORKERS = 3


class Cluster:
    def __init__(self, logs: Path) -> None:
        self.redis = OwnRedis()
        self.logs = logs
        self.llm, llm_url = fake_llm(logs)
        self.env = clean_env(
            STREAMBRIDGE_REDIS_URL=self.redis.url(0),
            STREAMBRIDGE_LLM_BASE_URL=llm_url,
            # two workers alone run all 50 chats: a killed worker's chats restart at once, never
            # waiting for its replacement to boot
            STREAMBRIDGE_WORKER_CONCURRENCY="25",
            STREAMBRIDGE_LEASE_TTL="1.0",  # margin under the 3 s bound on a loaded 2-core machine
        )
        self.everyone: list[Process] = []  # every edge and worker ever started: all stopped at the end
        self.edges = [self.edge(wait=False) for _ in range(EDGES)]
        self.workers = [self.worker(wait=False) for _ in range(WORKERS)]
        self.api = Process(
            ["api", "--port", "0"],
            {**self.env, "STREAMBRIDGE_PUBLIC_EDGE_URL": self.edges[0].wait_ready().url},
            logs,
            wait=False,
        )
        start_together(self.llm, *self.edges, *self.workers, self.api)

    def edge(self, *, wait: bool = True) -> Process:
        self.everyone.append(Process(["edge", "--port", "0"], self.env, self.logs, wait=wait))
        return self.everyone[-1]

    def worker(self, *, wait: bool = True) -> Process:
        self.everyone.append(Process(["worker"], self.env, self.logs, ready="worker started", wait=wait))
        return self.everyone[-1]

    def stop(self) -> None:
        stop_all([*self.everyone, self.api, self.llm])
        self.redis.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path)
    yield cluster
    cluster.stop()


async def busiest(session: aiohttp.ClientSession, workers: list[Process]) -> Process:
    running = [(await scrape(session, metrics_url(w))).get(("streambridge_running_chats", ()), 0.0) for w in workers]
    return workers[running.index(max(running))]


class Reader:
    """One client of one chat: reads a few events, drops, resumes on a random edge, until the end."""

    def __init__(self, cluster: Cluster, chat_id: str, auth: dict[str, str], rng: random.Random) -> None:
        self.cluster, self.chat_id, self.auth, self.rng = cluster, chat_id, auth, rng
        self.received: list[tuple[float, str, Event]] = []
        self.disconnects = 0
        self.connection_errors = 0

    async def run(self, session: aiohttp.ClientSession) -> None:
        while not self.received or not is_terminal(self.received[-1][2]):
            edge = self.rng.choice(self.cluster.edges).url
            headers = {**self.auth, **({"Last-Event-ID": self.received[-1][1]} if self.received else {})}
            budget = self.rng.randint(3, 15)
            try:
                async with session.get(f"{edge}/v1/chats/{self.chat_id}/events", headers=headers) as response:
                    assert response.status == 200, await response.text()
                    parser = SSEParser()
                    async for chunk in response.content.iter_any():
                        for message in parser.feed(chunk):
                            if budget == 0:
                                break  # the rest of this chunk is lost with the connection
                            self.received.append((time.monotonic(), message.id or "", decode_event(message.data)))
                            budget -= 1
                        if budget == 0 and not is_terminal(self.received[-1][2]):
                            self.disconnects += 1
                            break
            except (aiohttp.ClientError, ConnectionError, TimeoutError):
                self.connection_errors += 1  # its edge was killed: resume elsewhere
                await asyncio.sleep(0.05)


async def test_chaos_every_chat_ends_right_through_disconnects_and_kills(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(20261124)
    kills = {"edge": 0, "worker": 0}
    worker_kills: list[float] = []
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(sock_read=20)
    ) as session:
        auth = await login(session, cluster.api.url)
        prompts = [f"chaos chat {n}" for n in range(CHATS)]
        chats = [
            await create_chat(session, cluster.api.url, auth, message=p, model=f"fake?words={WORDS}&delay_ms=40")
            for p in prompts
        ]
        readers = [Reader(cluster, chat["id"], auth, random.Random(rng.random())) for chat in chats]
        reading = asyncio.gather(*(r.run(session) for r in readers))

        async def kill_things() -> None:
            for n in range(8):
                await asyncio.sleep(0.6)
                kind = "worker" if n % 2 == 0 else "edge"
                pool = cluster.workers if kind == "worker" else cluster.edges
                # the busiest worker, so that the kill interrupts chats however the queue spread them
                victim = await busiest(session, pool) if kind == "worker" else rng.choice(pool)
                # The victim dies at once, while its chats run: a replacement that boots slowly on a
                # loaded host must not push the kills past the chats' end. A worker's replacement
                # boots once the survivors took its chats over (they can run all of them), so its
                # boot does not compete with their recovery; it joins once ready.
                pool.remove(victim)
                killed_at = time.monotonic()  # SIGKILL acts at once; kill() then waits for its end
                await asyncio.to_thread(victim.kill)
                kills[kind] += 1
                if kind == "worker":
                    worker_kills.append(killed_at)
                    await asyncio.sleep(2.0)  # twice the lease TTL
                replacement = cluster.worker(wait=False) if kind == "worker" else cluster.edge(wait=False)
                pool.append(await asyncio.to_thread(replacement.wait_ready))

        killing = asyncio.ensure_future(kill_things())
        try:
            async with asyncio.timeout(120):
                await asyncio.gather(reading, killing)
        finally:
            reading.cancel()
            killing.cancel()

    recoveries: list[float] = []
    for reader, prompt in zip(readers, prompts, strict=True):
        ids = [id_key(i) for _, i, _ in reader.received]
        assert ids == sorted(set(ids)), f"chat {reader.chat_id}: an id twice or out of order"
        events = [e for _, _, e in reader.received]
        assert isinstance(events[-1], Complete), f"chat {reader.chat_id} ended {events[-1]}"
        assert assemble_text(events) == expected_text(prompt, WORDS)
        for n, (arrival, _, event) in enumerate(reader.received):
            if isinstance(event, Status) and "interrupted" in event.message:
                restarted = next(t for t, _, e in reader.received[n:] if isinstance(e, Started))
                killed = max(t for t in worker_kills if t <= arrival)
                recoveries.append(restarted - killed)

    disconnects = sum(r.disconnects + r.connection_errors for r in readers)
    summary = (
        f"\nchaos: {CHATS} chats, {disconnects} client disconnects "
        f"({sum(r.connection_errors for r in readers)} from killed edges), "
        f"{kills['edge']} edge kills, {kills['worker']} worker kills, {len(recoveries)} chat recoveries, "
        f"worst recovery {max(recoveries, default=0):.2f} s"
    )
    with capsys.disabled():
        print(summary)
    assert disconnects >= 100
    assert kills["edge"] >= 3
    assert kills["worker"] >= 3
    assert recoveries, "the worker kills interrupted running chats"
    assert max(recoveries) < 3.0
