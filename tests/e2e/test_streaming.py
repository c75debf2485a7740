"""End to end through real processes: api, two edges, two workers, fake-llm, redis-server.

Every test checks what a user relies on: the assembled text equals the simulated LLM's
known output, ids strictly increase, and no event arrives twice.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from streambridge.fake_llm import expected_text
from streambridge.shared.events import Complete, assemble_text, decode_event
from streambridge.shared.streams import id_key
from streambridge.sse import SSEMessage
from tests.e2e.conftest import System, create_chat, login, read_events

pytestmark = pytest.mark.e2e

WORDS = 60


def check_delivery(messages: list[SSEMessage], prompt: str, words: int = WORDS) -> None:
    ids = [id_key(m.id or "") for m in messages]
    assert len(ids) == len(set(ids)), "an event arrived twice"
    assert ids == sorted(ids), "ids must strictly increase"
    events = [decode_event(m.data) for m in messages]
    assert [m.event for m in messages] == [type(e).__struct_config__.tag for e in events]
    assert isinstance(events[-1], Complete)
    assert assemble_text(events) == expected_text(prompt, words)


def events_url(edge: str, chat_id: str) -> str:
    return f"{edge}/v1/chats/{chat_id}/events"


async def test_a_full_chat_streams_through_real_processes(system: System) -> None:
    async with aiohttp.ClientSession() as session:
        auth = await login(session, system.api.url)
        chat = await create_chat(session, system.api.url, auth, message="hello", model=f"fake?words={WORDS}")
        assert chat["stream_url"].startswith(system.edges[0].url)
        messages = await read_events(session, chat["stream_url"])  # the signed URL alone, like EventSource
        check_delivery(messages, "hello")
        async with session.get(f"{system.api.url}/v1/chats/{chat['id']}", headers=auth) as response:
            result = await response.json()
        assert result["status"] == "complete"
        assert result["content"] == expected_text("hello", WORDS)


async def test_a_client_that_drops_resumes_on_the_other_edge(system: System) -> None:
    prompt = "resume me elsewhere"
    async with aiohttp.ClientSession() as session:
        auth = await login(session, system.api.url)
        chat = await create_chat(session, system.api.url, auth, message=prompt, model=f"fake?words={WORDS}")
        first = await read_events(session, events_url(system.edges[0].url, chat["id"]), auth, limit=10)
        rest = await read_events(
            session, events_url(system.edges[1].url, chat["id"]), {**auth, "Last-Event-ID": first[-1].id or ""}
        )
        check_delivery(first + rest, prompt)


async def test_an_edge_killed_mid_stream_loses_nothing_for_a_client_resuming_on_another(system: System) -> None:
    prompt = "survive an edge crash"
    doomed = system.start_edge()
    try:
        async with aiohttp.ClientSession() as session:
            auth = await login(session, system.api.url)
            chat = await create_chat(
                session, system.api.url, auth, message=prompt, model=f"fake?words={WORDS}&delay_ms=20"
            )
            received: list[SSEMessage] = []

            async def read_until_the_edge_dies() -> None:
                try:
                    async for message in _stream(session, events_url(doomed.url, chat["id"]), auth):
                        received.append(message)
                        if len(received) == 8:
                            doomed.kill()  # SIGKILL: no goodbye, no flush
                except (TimeoutError, aiohttp.ClientError):
                    pass

            await read_until_the_edge_dies()
            assert doomed.proc.returncode == -9
            assert not any(m.event == "complete" for m in received), "the edge died before the chat ended"
            rest = await read_events(
                session, events_url(system.edges[1].url, chat["id"]), {**auth, "Last-Event-ID": received[-1].id or ""}
            )
            check_delivery(received + rest, prompt)
    finally:
        doomed.stop()


async def test_eight_clients_read_one_chat_at_once(system: System) -> None:
    prompt = "many readers"
    async with aiohttp.ClientSession() as session:
        auth = await login(session, system.api.url)
        chat = await create_chat(session, system.api.url, auth, message=prompt, model=f"fake?words={WORDS}")
        readers = [read_events(session, events_url(system.edges[n % 2].url, chat["id"]), auth) for n in range(8)]
        results = await asyncio.gather(*readers)
    for messages in results:
        check_delivery(messages, prompt)
    assert all(r == results[0] for r in results), "every reader sees the same ids and events"


async def _stream(session: aiohttp.ClientSession, url: str, headers: dict[str, str]):  # type: ignore[no-untyped-def]
    from streambridge.sse import SSEParser

    parser = SSEParser()
    async with session.get(url, headers=headers) as response:
        assert response.status == 200
        async for chunk in response.content.iter_any():
            for message in parser.feed(chunk):
                yield message
