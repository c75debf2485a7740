"""Redis goes away mid-chat and comes back: 503s meanwhile, then everything reconnects by itself,
and the chat in flight still ends with the right text: nothing lost or repeated for its reader."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from streambridge.fake_llm import expected_text
from streambridge.shared.events import Complete, Event, assemble_text, decode_event
from streambridge.shared.streams import id_key
from streambridge.sse import SSEParser
from tests.conftest import OwnRedis
from tests.e2e.conftest import Process, clean_env, create_chat, fake_llm, login, start_together, stop_all

pytestmark = pytest.mark.e2e

WORDS = 120


@pytest.fixture
def outage_system(tmp_path: Path) -> Iterator[tuple[OwnRedis, Process, Process, Process]]:
    # appendfsync always: this test is about reconnecting, not about what an fsync policy may lose
    redis = OwnRedis("--appendonly", "yes", "--appendfsync", "always")
    llm, llm_url = fake_llm(tmp_path)
    env = clean_env(STREAMBRIDGE_REDIS_URL=redis.url(0), STREAMBRIDGE_LLM_BASE_URL=llm_url)
    edge = Process(["edge", "--port", "0"], env, tmp_path, wait=False)
    worker = Process(["worker"], env, tmp_path, ready="worker started", wait=False)
    edge_env = {**env, "STREAMBRIDGE_PUBLIC_EDGE_URL": edge.wait_ready().url}
    api = Process(["api", "--port", "0"], edge_env, tmp_path, wait=False)
    start_together(llm, edge, worker, api)
    yield redis, api, edge, worker
    stop_all((worker, api, edge, llm))
    redis.stop()


async def status_of(session: aiohttp.ClientSession, url: str, **kwargs: object) -> tuple[int, object]:
    async with session.request(str(kwargs.pop("method", "GET")), url, **kwargs) as response:  # type: ignore[arg-type]
        return response.status, await response.json()


async def test_a_redis_outage_answers_503_then_everything_recovers_and_the_chat_ends_right(
    outage_system: tuple[OwnRedis, Process, Process, Process],
) -> None:
    redis, api, edge, worker = outage_system
    prompt = "outlive a redis restart"
    received: list[tuple[str, Event]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_read=10)) as session:
        auth = await login(session, api.url)
        chat = await create_chat(session, api.url, auth, message=prompt, model=f"fake?words={WORDS}&delay_ms=25")
        outage_done = False
        while not received or not isinstance(received[-1][1], Complete):
            headers = {"Last-Event-ID": received[-1][0]} if received else {}
            try:
                async with session.get(chat["stream_url"], headers=headers) as response:
                    if response.status != 200:
                        await asyncio.sleep(0.2)
                        continue
                    parser = SSEParser()
                    async for chunk in response.content.iter_any():
                        for message in parser.feed(chunk):
                            received.append((message.id or "", decode_event(message.data)))
                        if len(received) >= 10 and not outage_done:
                            outage_done = True
                            redis.kill()
                            for url in (f"{api.url}/healthz", f"{edge.url}/healthz"):
                                status, body = await status_of(session, url)
                                assert status == 503
                                assert body["error"]["code"] == "redis_unavailable"  # type: ignore[index]
                            status, body = await status_of(
                                session, f"{api.url}/v1/chats", method="POST", json={"message": "x"}, headers=auth
                            )
                            assert status == 503
                            assert body["error"]["code"] == "redis_unavailable"  # type: ignore[index]
                            await asyncio.sleep(1.0)
                            redis.start()
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.2)  # the edge dropped us during the outage: resume
        deadline = time.monotonic() + 10
        while (await status_of(session, f"{api.url}/healthz"))[0] != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        after = await create_chat(session, api.url, auth, message="after the outage", model="fake?words=5")
        assert after["status"] == "queued"

    ids = [id_key(i) for i, _ in received]
    assert ids == sorted(set(ids)), "no event twice, none out of order"
    events = [e for _, e in received]
    assert assemble_text(events) == expected_text(prompt, WORDS)
    assert worker.proc.poll() is None, "the worker rode out the outage"
