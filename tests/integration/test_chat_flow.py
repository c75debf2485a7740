"""A chat from POST to the last SSE byte: real Redis, arq burst worker, simulated LLM over HTTP."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from aiohttp.test_utils import TestClient

from streambridge.api.edge import ClientWrites
from streambridge.fake_llm import expected_text
from streambridge.shared.events import Complete, Content, Failed, Started, assemble_text
from streambridge.shared.settings import Settings
from streambridge.shared.streams import Entry, id_key
from streambridge.sse import SSEParser
from streambridge.workers.worker import make_worker
from tests.integration.conftest import FAST_LLM, RunWorker, bearer, events_of, read_sse

PROMPT = "tell me about streams"


async def create(client: TestClient, token: str, body: object) -> dict[str, str]:  # type: ignore[type-arg]
    response = await client.post("/v1/chats", json=body, headers=bearer(token))
    assert response.status == 202, await response.text()
    return dict(await response.json())


async def test_chat_is_accepted_at_once_and_queued(client: TestClient, token: str) -> None:  # type: ignore[type-arg]
    chat = await create(client, token, {"message": PROMPT})
    assert chat["status"] == "queued"
    assert len(chat["id"]) == 32
    assert f"/v1/chats/{chat['id']}/events?token=" in chat["stream_url"]
    assert chat["created_at"].endswith("Z")
    response = await client.get(f"/v1/chats/{chat['id']}", headers=bearer(token))
    assert (await response.json())["status"] == "queued"


async def test_a_chat_streams_to_completion_and_its_result_is_stored(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
) -> None:
    chat = await create(client, token, {"messages": [{"role": "user", "content": PROMPT}]})
    await run_worker()
    response = await client.get(f"/v1/chats/{chat['id']}/events", headers=bearer(token))
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    messages = await read_sse(response)
    events = events_of(messages)
    assert isinstance(events[0], Started)
    assert isinstance(events[-1], Complete)
    assert events[-1].finish_reason == "stop"
    assert events[-1].content_length == len(expected_text(PROMPT, FAST_LLM.words))
    assert assemble_text(events) == expected_text(PROMPT, FAST_LLM.words)
    assert [m.event for m in messages] == [type(e).__struct_config__.tag for e in events]
    ids = [id_key(m.id or "") for m in messages]
    assert ids == sorted(set(ids))

    result = await (await client.get(f"/v1/chats/{chat['id']}", headers=bearer(token))).json()
    assert result["status"] == "complete"
    assert result["content"] == expected_text(PROMPT, FAST_LLM.words)
    assert result["finish_reason"] == "stop"
    assert result["usage"]["completion_tokens"] == events[-1].total_chunks
    assert result["attempts"] == 1
    assert result["error"] is None


async def test_a_client_waiting_before_the_worker_starts_gets_every_event_live(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
) -> None:
    chat = await create(client, token, {"message": PROMPT})
    response = await client.get("/" + chat["stream_url"].split("/", 3)[3])  # the signed URL, no bearer
    assert response.status == 200
    reader = asyncio.create_task(read_sse(response))
    await run_worker()
    events = events_of(await asyncio.wait_for(reader, 10))
    assert assemble_text(events) == expected_text(PROMPT, FAST_LLM.words)
    assert sum(isinstance(e, Content) for e in events) == events[-1].total_chunks  # type: ignore[union-attr]


@pytest.mark.parametrize("http", ["1.1", "1.0"])
async def test_live_events_written_straight_from_the_hub_arrive_whole_in_either_http_version(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
    monkeypatch: pytest.MonkeyPatch,
    http: str,
) -> None:
    # Live entries go to a waiting reader's socket from the hub (ClientWrites.deliver), framed by
    # hand: a chunk for HTTP/1.1, the bare bytes for HTTP/1.0, which aiohttp does not chunk.
    direct = 0
    deliver = ClientWrites.deliver

    def counting(writes: ClientWrites, entries: list[Entry], now: float) -> bool:
        nonlocal direct
        taken = deliver(writes, entries, now)
        direct += taken
        return taken

    monkeypatch.setattr(ClientWrites, "deliver", counting)
    chat = await create(client, token, {"message": PROMPT, "model": "fake?delay_ms=20&ttft_ms=200"})
    server = client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    path = f"/v1/chats/{chat['id']}/events"
    head = f"GET {path} HTTP/{http}\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    writer.write(head.encode())
    reading = asyncio.ensure_future(reader.read())  # until the server closes, after the end
    await run_worker()
    raw = await asyncio.wait_for(reading, 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    if http == "1.1":
        assert b"Transfer-Encoding: chunked" in head
        body = dechunked(body)
    else:
        assert b"Transfer-Encoding" not in head
    assert b"\r\n" not in body, "framing left in the body (the edge writes its SSE with \\n alone)"
    events = events_of(SSEParser().feed(body))
    assert assemble_text(events) == expected_text(PROMPT, FAST_LLM.words)
    assert isinstance(events[-1], Complete)
    assert direct > 0, "no entry went straight from the hub"


def dechunked(body: bytes) -> bytes:
    out = b""
    while True:
        size, _, body = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return out
        assert body[n : n + 2] == b"\r\n", "a chunk's length does not match its data"
        out, body = out + body[:n], body[n + 2 :]


async def test_resume_with_last_event_id_header_or_query_gives_exactly_the_rest(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
) -> None:
    chat = await create(client, token, {"message": PROMPT})
    await run_worker()
    path = f"/v1/chats/{chat['id']}/events"
    everything = await read_sse(await client.get(path, headers=bearer(token)))
    cut = everything[len(everything) // 2]
    by_header = await read_sse(await client.get(path, headers={**bearer(token), "Last-Event-ID": cut.id or ""}))
    by_query = await read_sse(await client.get(path, params={"last_event_id": cut.id or ""}, headers=bearer(token)))
    rest = everything[len(everything) // 2 + 1 :]
    assert by_header == rest
    assert by_query == rest


async def test_a_failing_provider_is_retried_then_the_chat_fails_with_its_message(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
) -> None:
    chat = await create(client, token, {"message": PROMPT, "model": "fake?fail=500"})
    await run_worker()
    events = events_of(await read_sse(await client.get(f"/v1/chats/{chat['id']}/events", headers=bearer(token))))
    kinds = [type(e).__struct_config__.tag for e in events]
    assert kinds.count("started") == 3
    assert kinds.count("error") == 3
    assert kinds[-1] == "failed"
    result = await (await client.get(f"/v1/chats/{chat['id']}", headers=bearer(token))).json()
    assert result["status"] == "failed"
    assert result["attempts"] == 3
    assert "500" in result["error"]


async def test_a_stream_that_breaks_part_way_is_retried_and_the_text_is_the_completing_attempts(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
) -> None:
    chat = await create(client, token, {"message": PROMPT, "model": "fake?fail=drop:3&fail_times=1"})
    await run_worker()
    events = events_of(await read_sse(await client.get(f"/v1/chats/{chat['id']}/events", headers=bearer(token))))
    complete = events[-1]
    assert isinstance(complete, Complete)
    assert complete.attempt == 2
    assert any(isinstance(e, Content) and e.attempt == 1 for e in events)
    assert assemble_text(events) == expected_text(PROMPT, FAST_LLM.words)
    result = await (await client.get(f"/v1/chats/{chat['id']}", headers=bearer(token))).json()
    assert result["content"] == expected_text(PROMPT, FAST_LLM.words)


async def test_a_non_retryable_provider_answer_fails_at_once(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
) -> None:
    chat = await create(client, token, {"message": PROMPT, "model": "fake?words=oops"})
    await run_worker()
    result = await (await client.get(f"/v1/chats/{chat['id']}", headers=bearer(token))).json()
    assert result["status"] == "failed"
    assert result["attempts"] == 1
    assert "400" in result["error"]


async def test_an_idle_stream_gets_ping_comments_on_the_wire(client: TestClient, token: str) -> None:  # type: ignore[type-arg]
    chat = await create(client, token, {"message": PROMPT})  # no worker runs: the stream stays idle
    response = await client.get(f"/v1/chats/{chat['id']}/events", headers=bearer(token))
    received = b""
    async with asyncio.timeout(5):
        while b": ping\n\n" not in received:
            received += await response.content.readany()
    # nothing but heartbeats (the test settings send one every 0.2 s; a slow machine may see two)
    assert received.startswith(b": ping\n\n")
    assert set(received.split(b"\n\n")) == {b": ping", b""}
    response.close()


async def test_a_chat_that_cannot_finish_fails_at_its_deadline(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    settings: Settings,
    llm_url: str,
) -> None:
    chat = await create(client, token, {"message": PROMPT, "model": "fake?fail=stall"})
    worker = make_worker(msgspec.structs.replace(settings, chat_deadline=0.5), llm_url, burst=True, poll_delay=0)
    try:
        async with asyncio.timeout(10):
            await worker.main()
    finally:
        await worker.close()
    events = events_of(await read_sse(await client.get(f"/v1/chats/{chat['id']}/events", headers=bearer(token))))
    assert isinstance(events[-1], Failed)
    assert "deadline of 0.5 s" in events[-1].message
    result = await (await client.get(f"/v1/chats/{chat['id']}", headers=bearer(token))).json()
    assert result["status"] == "failed"


async def test_emoji_a_server_splits_between_utf16_halves_arrive_whole(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
) -> None:
    chat = await create(client, token, {"message": "emoji", "model": "fake?split=utf16&words=40"})
    await run_worker()
    messages = await read_sse(await client.get(f"/v1/chats/{chat['id']}/events", headers=bearer(token)))
    events = events_of(messages)
    assert isinstance(events[-1], Complete)
    assert assemble_text(events) == expected_text("emoji", 40)
    for message in messages:
        message.data.encode("utf-8")  # every event is valid UTF-8: no lone surrogate got through
