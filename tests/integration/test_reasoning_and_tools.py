"""Reasoning and a streamed tool call, from the simulated LLM to the native SSE stream and the stored result."""

from __future__ import annotations

import asyncio

import msgspec
from aiohttp.test_utils import TestClient

from streambridge.fake_llm import expected_reasoning, expected_tool_call, split_text
from streambridge.shared.events import (
    Complete,
    Content,
    Reasoning,
    Started,
    ToolCall,
    ToolCallFragment,
    assemble_reasoning,
    assemble_text,
    assemble_tool_calls,
)
from streambridge.sse import SSEParser
from tests.integration.conftest import RunWorker, bearer, events_of, read_sse

PROMPT = "what is the weather in Paris and 東京 👩\u200d💻?"


async def test_reasoning_and_a_tool_call_stream_as_events_and_land_in_the_result(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
) -> None:
    body = {"message": PROMPT, "model": "fake?reasoning=7&tool=get_weather"}
    response = await client.post("/v1/chats", json=body, headers=bearer(token))
    assert response.status == 202, await response.text()
    chat_id = (await response.json())["id"]
    await run_worker()

    messages = await read_sse(await client.get(f"/v1/chats/{chat_id}/events", headers=bearer(token)))
    events = events_of(messages)
    assert [m.event for m in messages] == [type(e).__struct_config__.tag for e in events]
    kinds = [type(e) for e in events]
    assert kinds[0] is Started
    assert kinds[-1] is Complete
    assert Content not in kinds  # a tool call answers in place of text
    assert kinds.index(ToolCallFragment) > max(i for i, kind in enumerate(kinds) if kind is Reasoning)
    reasoning = [e for e in events if isinstance(e, Reasoning)]
    assert [e.index for e in reasoning] == list(range(1, len(reasoning) + 1))
    fragments = [e for e in events if isinstance(e, ToolCallFragment)]
    assert len(fragments) > 3  # the arguments arrived in pieces, each its own event
    expected = expected_tool_call(PROMPT, "get_weather")
    assert (fragments[0].id, fragments[0].name) == (expected.id, "get_weather")
    assert all(f.id is None and f.name is None for f in fragments[1:])
    assert assemble_reasoning(events) == expected_reasoning(PROMPT, 7)
    assert assemble_tool_calls(events) == [expected]
    assert assemble_text(events) == ""
    complete = events[-1]
    assert isinstance(complete, Complete)
    assert (complete.finish_reason, complete.total_chunks, complete.content_length) == ("tool_calls", 0, 0)

    result = await (await client.get(f"/v1/chats/{chat_id}", headers=bearer(token))).json()
    assert result["status"] == "complete"
    assert result["finish_reason"] == "tool_calls"
    assert result["content"] == ""
    assert result["reasoning"] == expected_reasoning(PROMPT, 7)
    assert msgspec.convert(result["tool_calls"], list[ToolCall]) == [expected]
    assert result["tool_calls"][0]["type"] == "function"


async def test_while_the_chat_runs_its_view_shows_the_reasoning_and_tool_call_so_far(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
) -> None:
    # the LLM stalls after the reasoning, the tool call's first fragment and two of its arguments' pieces
    stall_at = len(split_text(expected_reasoning(PROMPT, 3))) + 3
    body = {"message": PROMPT, "model": f"fake?reasoning=3&tool=get_weather&fail=stall:{stall_at}"}
    chat_id = (await (await client.post("/v1/chats", json=body, headers=bearer(token))).json())["id"]
    worker = asyncio.create_task(run_worker())
    response = await client.get(f"/v1/chats/{chat_id}/events", headers=bearer(token))
    parser, fragments = SSEParser(), 0
    async for piece in response.content.iter_any():
        fragments += sum(message.event == "tool_call" for message in parser.feed(piece))
        if fragments == 3:
            break
    response.close()

    view = await (await client.get(f"/v1/chats/{chat_id}", headers=bearer(token))).json()
    assert view["status"] == "running"
    assert view["reasoning"] == expected_reasoning(PROMPT, 3)
    expected = expected_tool_call(PROMPT, "get_weather")
    (call,) = view["tool_calls"]
    assert (call["id"], call["function"]["name"]) == (expected.id, "get_weather")
    assert call["function"]["arguments"] == "".join(split_text(expected.function.arguments)[:2])
    await client.post(f"/v1/chats/{chat_id}/cancel", headers=bearer(token))
    await asyncio.wait_for(worker, 10)
