"""The chats' own keys on a real 6-node Redis Cluster (``STREAMBRIDGE_STREAMS_REDIS_URL``), the queue
on a redis-server of its own, and every process started through the CLI: chats stream and resume
across edges; a primary SIGKILLed or a slot moved mid-stream costs no chat an attempt, and no
reader an event."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.crc import key_slot

from streambridge.fake_llm import expected_text
from streambridge.shared import keys
from streambridge.shared.events import Complete, Event, Started, assemble_text, decode_event
from streambridge.sse import SSEParser
from tests.cluster import RedisCluster
from tests.conftest import OwnRedis
from tests.e2e.conftest import Process, clean_env, create_chat, fake_llm, login, start_together

pytestmark = pytest.mark.e2e


class ClusterStack:
    """api, two edges and two workers; the control Redis apart from the cluster."""

    def __init__(self, logs: Path, cluster: RedisCluster) -> None:
        self.cluster = cluster
        self.control = OwnRedis()
        self.llm, llm_url = fake_llm(logs, "--ttft-ms", "10")
        env = clean_env(
            STREAMBRIDGE_REDIS_URL=self.control.url(0),
            STREAMBRIDGE_STREAMS_REDIS_URL=cluster.url,
            STREAMBRIDGE_LLM_BASE_URL=llm_url,
        )
        self.edges = [Process(["edge", "--port", "0"], env, logs, wait=False) for _ in range(2)]
        self.workers = [Process(["worker"], env, logs, ready="worker started", wait=False) for _ in range(2)]
        edge_url = self.edges[0].wait_ready().url
        self.api = Process(["api", "--port", "0"], {**env, "STREAMBRIDGE_PUBLIC_EDGE_URL": edge_url}, logs, wait=False)
        start_together(self.llm, *self.edges, *self.workers, self.api)

    def stop(self) -> None:
        for process in (*self.workers, self.api, *self.edges, self.llm):
            process.stop()
        self.control.stop()


@pytest.fixture
def own_stack(tmp_path: Path, fresh_redis_cluster: RedisCluster) -> Iterator[ClusterStack]:
    stack = ClusterStack(tmp_path, fresh_redis_cluster)
    yield stack
    stack.stop()


async def read(
    session: aiohttp.ClientSession, url: str, last: str = "", *, stop_after: int | None = None
) -> tuple[list[tuple[str, Event]], str]:
    """The chat's events after ``last``, with their ids, resuming with Last-Event-ID whenever the
    stream drops, to the end (or ``stop_after`` events: then the connection is dropped)."""
    got: list[tuple[str, Event]] = []
    while not got or not isinstance(got[-1][1], Complete):
        parser = SSEParser()
        try:
            async with session.get(url, headers={"Last-Event-ID": last} if last else {}) as response:
                if response.status == 503:  # Redis unavailable for a moment (a failover): as a client does
                    await asyncio.sleep(0.2)
                    continue
                assert response.status == 200, await response.text()
                async for chunk in response.content.iter_any():
                    for message in parser.feed(chunk):
                        got.append((message.id or "", decode_event(message.data)))
                        last = message.id or last
                        if stop_after is not None and len(got) >= stop_after:
                            return got, last
        except aiohttp.ClientError:
            await asyncio.sleep(0.1)
    return got, last


def check_exact(got: list[tuple[str, Event]], prompt: str, words: int) -> None:
    ids = [entry_id for entry_id, _ in got]
    assert len(ids) == len(set(ids)), "an event came twice"
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))), "out of order"
    events = [event for _, event in got]
    assert [e.attempt for e in events if isinstance(e, Started)] == [1], "no chat needed a second attempt"
    assert assemble_text(events) == expected_text(prompt, words)


async def upstream_calls(session: aiohttp.ClientSession, stack: ClusterStack) -> dict[str, int]:
    async with session.get(f"{stack.llm.url}/_stats") as response:
        return dict((await response.json())["paths"])


async def resume_on_the_other_edge(session: aiohttp.ClientSession, stack: ClusterStack, auth: dict[str, str]) -> None:
    """Chats spread over the primaries, each read to its fifth event, dropped, and resumed on the
    other edge with Last-Event-ID: exactly the chat's events."""
    words = 40
    prompts = [f"cluster resume {n}" for n in range(6)]
    model = f"fake?words={words}&delay_ms=10"
    chats = [await create_chat(session, stack.api.url, auth, message=p, model=model) for p in prompts]
    other_edge = stack.edges[1].url
    for prompt, chat in zip(prompts, chats, strict=True):
        first, last = await read(session, chat["stream_url"], stop_after=5)  # dropped mid-answer
        rest, _ = await read(session, chat["stream_url"].replace(stack.edges[0].url, other_edge), last)
        check_exact(first + rest, prompt, words)
    owners = {stack.cluster.owner_of(key_slot(keys.events(c["id"]).encode())).port for c in chats}
    assert len(owners) >= 2, "six chats' keys all on one primary: the hash tag does not spread them"


async def test_chats_resume_across_edges_and_outlive_a_primarys_death_and_a_moved_slot(own_stack: ClusterStack) -> None:
    """One cluster of the test's own (its faults damage it), and one deployment, for the three
    stories one after the other: a resume on the other edge; a primary SIGKILLed mid-stream; a slot
    moved mid-stream (each fault ~6 s of streaming, landing 1.5 s in)."""
    words = 60  # ~150 chunks, 40 ms apart: 6 s, and each fault lands 1.5 s in
    model = f"fake?words={words}&delay_ms=40"
    cluster = own_stack.cluster
    async with aiohttp.ClientSession() as session:
        auth = await login(session, own_stack.api.url)
        await resume_on_the_other_edge(session, own_stack, auth)

        # A primary SIGKILLed, with one reader per chat.
        prompts = [f"outlive a failover {n}" for n in range(9)]
        chats = [await create_chat(session, own_stack.api.url, auth, message=p, model=model) for p in prompts]
        readers = [asyncio.create_task(read(session, c["stream_url"])) for c in chats]
        await asyncio.sleep(1.5)
        victim = cluster.owner_of(key_slot(keys.events(chats[0]["id"]).encode()))
        on_victim = sum(cluster.owner_of(key_slot(keys.events(c["id"]).encode())) is victim for c in chats)
        await asyncio.to_thread(cluster.replica_of, victim)  # one to promote (a loaded host may have moved it)
        cluster.kill(victim)
        await asyncio.to_thread(cluster.wait_failover, victim)
        results = await asyncio.wait_for(asyncio.gather(*readers), 60)
        assert on_victim >= 1
        for prompt, (got, _) in zip(prompts, results, strict=True):
            check_exact(got, prompt, words)

        # A slot moved to another primary, with two readers per chat.
        moved = [f"outlive a resharding {n}" for n in range(3)]
        chats = [await create_chat(session, own_stack.api.url, auth, message=p, model=model) for p in moved]
        readers = [asyncio.create_task(read(session, c["stream_url"])) for c in chats for _ in range(2)]
        await asyncio.sleep(1.5)
        slot = key_slot(keys.events(chats[0]["id"]).encode())
        source = cluster.owner_of(slot)
        target = next(p for p in cluster.primaries() if p is not source)
        await asyncio.to_thread(cluster.migrate_slot, slot, target)
        assert cluster.owner_of(slot) is target
        results = await asyncio.wait_for(asyncio.gather(*readers), 60)
        for n, (got, _) in enumerate(results):
            check_exact(got, moved[n // 2], words)
        upstream = await upstream_calls(session, own_stack)
    assert upstream == {"/v1/chat/completions": 6 + len(prompts) + len(moved)}, "the upstream was called once per chat"
