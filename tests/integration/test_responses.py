"""OpenAI's Responses API over the upstream's Chat Completions, driven by the real openai SDK:
the API and edge in-process, a long-running worker, the simulated LLM on a real port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from redis.asyncio import Redis

from streambridge.fake_llm import expected_reasoning, expected_text, expected_tool_call
from streambridge.shared import keys
from streambridge.shared.settings import Settings
from tests.integration.conftest import FAST_LLM
from tests.integration.test_completions import base_url  # noqa: F401  (the fixture)
from tests.numbering import sequence_numbers

WORDS = FAST_LLM.words
SLOW = "fake?words=30&delay_ms=30"  # about 1 s


@pytest.fixture
async def token(base_url: str) -> str:  # noqa: F811
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base_url}/auth/visitor") as response:
            return str((await response.json())["token"])


@pytest.fixture
async def sdk(base_url: str, token: str) -> AsyncIterator[openai.AsyncOpenAI]:  # noqa: F811
    client = openai.AsyncOpenAI(base_url=base_url, api_key=token, max_retries=0)
    yield client
    await client.close()


async def raw_events(base_url: str, token: str, path: str) -> list[dict[str, Any]]:  # noqa: F811
    """The events of a response stream as the wire has them."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base_url}{path}", headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 200, await response.text()
            body = (await response.read()).decode()
    assert not [line for line in body.splitlines() if line.startswith("id:")], "the SDK's decoder breaks on id: lines"
    return [msgspec.json.decode(line[6:]) for line in body.splitlines() if line.startswith("data: ")]


async def test_a_response_comes_back_whole(sdk: openai.AsyncOpenAI) -> None:
    response = await sdk.responses.create(model="fake", input="whole", instructions="be brief", metadata={"k": "v"})
    assert response.status == "completed"
    assert response.output_text == expected_text("whole", WORDS)
    assert response.id.startswith("resp_")
    assert response.instructions == "be brief"
    assert response.metadata == {"k": "v"}
    assert response.usage is not None
    assert response.usage.output_tokens > 0
    again = await sdk.responses.retrieve(response.id)
    assert again.output_text == response.output_text
    assert [item.id for item in again.output] == [item.id for item in response.output]


async def test_the_stream_helper_assembles_the_final_response(sdk: openai.AsyncOpenAI) -> None:
    async with sdk.responses.stream(model="fake", input="helper") as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    assert final.output_text == expected_text("helper", WORDS)
    numbers = sequence_numbers(events)
    assert numbers == list(range(len(numbers)))
    kinds = [e.type for e in events if e.type != "keepalive"]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds.index("response.output_item.added") < kinds.index("response.content_part.added")
    assert kinds.index("response.content_part.added") < kinds.index("response.output_text.delta")
    assert kinds[-1] == "response.completed"


async def test_a_background_stream_dropped_resumes_by_both_sdk_calls_exactly(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.responses.create(model=SLOW, input="resume me", background=True, stream=True)
    seen: list[Any] = []
    async for event in stream:
        seen.append(event)
        if event.type == "response.output_text.delta" and len(seen) > 8:
            break
    await stream.close()  # the connection drops mid-answer
    response_id, last = seen[0].response.id, seen[-1].sequence_number
    said = "".join(e.delta for e in seen if e.type == "response.output_text.delta")

    # the server filters: everything after `last`, nothing before
    rest = [e async for e in await sdk.responses.retrieve(response_id, stream=True, starting_after=last)]
    numbers = sequence_numbers(rest)
    assert numbers == list(range(last + 1, last + 1 + len(numbers)))
    text = said + "".join(e.delta for e in rest if e.type == "response.output_text.delta")
    assert text == expected_text("resume me", 30)
    assert rest[-1].type == "response.completed"

    # the SDK filters (it sends no starting_after, so the route replays from 0)
    async with sdk.responses.stream(response_id=response_id, starting_after=last) as helper:
        again = [e async for e in helper]
    assert sequence_numbers(again) == sequence_numbers(rest)


async def test_a_background_response_is_polled_to_its_end(sdk: openai.AsyncOpenAI) -> None:
    response = await sdk.responses.create(model=SLOW, input="poll", background=True)
    assert response.status in {"queued", "in_progress"}
    assert response.background is True
    while response.status in {"queued", "in_progress"}:
        await asyncio.sleep(0.1)
        response = await sdk.responses.retrieve(response.id)
    assert response.status == "completed"
    assert response.output_text == expected_text("poll", 30)


async def test_cancel_stops_a_background_response_and_is_idempotent(sdk: openai.AsyncOpenAI) -> None:
    response = await sdk.responses.create(model="fake?words=200&delay_ms=30", input="stop me", background=True)
    cancelled = await sdk.responses.cancel(response.id)
    assert cancelled.status == "cancelled"
    assert (await sdk.responses.cancel(response.id)).status == "cancelled"
    assert (await sdk.responses.retrieve(response.id)).status == "cancelled"


async def test_cancel_of_a_completed_response_is_a_bad_request(sdk: openai.AsyncOpenAI) -> None:
    response = await sdk.responses.create(model="fake", input="done")
    with pytest.raises(openai.BadRequestError, match="completed"):
        await sdk.responses.cancel(response.id)


async def test_function_tools_stream_as_function_calls(sdk: openai.AsyncOpenAI) -> None:
    tools: Any = [{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}]
    async with sdk.responses.stream(model="fake?tool=lookup", input="weather", tools=tools) as stream:
        final = await stream.get_final_response()
    call = expected_tool_call("weather", "lookup")
    [item] = [item for item in final.output if item.type == "function_call"]
    assert (item.name, item.arguments) == (call.function.name, call.function.arguments)
    assert final.tools[0].name == "lookup"  # type: ignore[union-attr]


async def test_reasoning_streams_as_a_reasoning_item_before_the_message(sdk: openai.AsyncOpenAI) -> None:
    response = await sdk.responses.create(model="fake?reasoning=5", input="think")
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "message"]
    reasoning = response.output[0]
    assert reasoning.type == "reasoning"
    assert reasoning.content is not None
    assert reasoning.content[0].text == expected_reasoning("think", 5)
    assert response.output_text == expected_text("think", WORDS)
    assert response.usage is not None
    assert response.usage.output_tokens_details.reasoning_tokens > 0, "the upstream's breakdown is passed on"


async def test_a_conversation_of_input_items_reaches_the_upstream(sdk: openai.AsyncOpenAI) -> None:
    items: Any = [
        {"role": "user", "content": "first"},
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "and now"}]},
    ]
    response = await sdk.responses.create(model="fake", input=items)
    assert response.output_text == expected_text("and now", WORDS)


async def test_the_wire_numbers_every_event_and_carries_no_ids(
    sdk: openai.AsyncOpenAI,
    base_url: str,  # noqa: F811
    token: str,
) -> None:
    response = await sdk.responses.create(model="fake", input="wire", background=True)
    events = await raw_events(base_url, token, f"/responses/{response.id}?stream=true")
    numbers = sequence_numbers(events)
    assert numbers == list(range(len(numbers)))
    after = await raw_events(base_url, token, f"/responses/{response.id}?stream=true&starting_after=3")
    told = [e for e in events if e["type"] != "keepalive"]
    assert [e for e in after if e["type"] != "keepalive"] == told[4:]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "x", "background": True, "store": False}, "store"),
        ({"input": "x", "temperature": 3}, "temperature"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
        ({"input": "x", "tools": -9167}, "tools"),  # found by the fuzz: it was a 500
    ],
)
async def test_what_cannot_be_served_is_a_400_naming_the_field(
    base_url: str,  # noqa: F811
    token: str,
    body: dict[str, Any],
    param: str | None,
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base_url}/responses", json=body, headers={"Authorization": f"Bearer {token}"}
        ) as response:
            assert response.status == 400
            error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


async def test_someone_elses_response_is_not_found(
    sdk: openai.AsyncOpenAI,
    base_url: str,  # noqa: F811
    settings: Settings,
) -> None:
    response = await sdk.responses.create(model="fake", input="mine", background=True)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base_url}/auth/visitor") as answer:
            other = (await answer.json())["token"]
    stranger = openai.AsyncOpenAI(base_url=base_url, api_key=other, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        await stranger.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        await stranger.responses.cancel(response.id)
    await stranger.close()


async def test_a_stream_trimmed_past_its_start_is_gone_and_the_object_remains(
    sdk: openai.AsyncOpenAI,
    base_url: str,  # noqa: F811
    token: str,
    settings: Settings,
) -> None:
    response = await sdk.responses.create(model="fake", input="trimmed")
    chat_id = response.id.removeprefix("resp_")
    async with Redis.from_url(str(settings.redis_url)) as redis:
        await redis.xtrim(keys.events(chat_id), maxlen=3, approximate=False)
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=auth) as session:
        for path in (f"/responses/{response.id}?stream=true", f"/chat/completions/{chat_id}/stream"):
            async with session.get(f"{base_url}{path}") as answer:
                assert answer.status == 410, path
                assert (await answer.json())["error"]["code"] == "stream_expired"
    assert (await sdk.responses.retrieve(response.id)).output_text == expected_text("trimmed", WORDS)


async def post(base_url: str, token: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:  # noqa: F811
    auth = {"Authorization": f"Bearer {token}", **(headers or {})}
    async with aiohttp.ClientSession(headers=auth) as session:
        async with session.post(f"{base_url}/responses", json=body) as response:
            return response.status, await response.json()


async def test_an_sdk_retry_of_a_create_finds_the_first_response_as_it_is_now(
    base_url: str,  # noqa: F811
    token: str,
) -> None:
    body = {"model": "fake", "input": "once", "background": True}
    status, first = await post(base_url, token, body)
    assert (status, first["status"]) == (200, "queued")
    async with asyncio.timeout(10):
        while (await post(base_url, token, body, {"x-stainless-retry-count": "1"}))[1]["status"] != "completed":
            await asyncio.sleep(0.05)
    status, again = await post(base_url, token, body, {"x-stainless-retry-count": "2"})
    assert again["id"] == first["id"], "the SDK's retry is the first request"
    assert again["output"][0]["content"][0]["text"] == expected_text("once", WORDS)
    assert (await post(base_url, token, body))[1]["id"] != first["id"], "asked afresh, it is a new response"


async def test_a_retry_after_the_events_expired_is_answered_not_left_waiting(
    sdk: openai.AsyncOpenAI,
    base_url: str,  # noqa: F811
    token: str,
    settings: Settings,
) -> None:
    body = {"model": "fake", "input": "expired"}
    status, first = await post(base_url, token, body, {"Idempotency-Key": "expire-1"})
    async with Redis.from_url(str(settings.redis_url)) as redis:
        await redis.delete(keys.events(first["id"].removeprefix("resp_")))  # as STREAM_TTL would
    async with asyncio.timeout(5):
        status, again = await post(base_url, token, body, {"Idempotency-Key": "expire-1"})
        assert (status, again["id"], again["status"]) == (200, first["id"], "completed")
        status, streamed = await post(base_url, token, {**body, "stream": True}, {"Idempotency-Key": "expire-1"})
        assert (status, streamed["error"]["code"]) == (410, "stream_expired")
    messages = [{"role": "user", "content": "expired too"}]
    completion = await sdk.chat.completions.create(model="fake", messages=messages)  # type: ignore[arg-type]
    async with Redis.from_url(str(settings.redis_url)) as redis:
        await redis.delete(keys.events(completion.id.removeprefix("chatcmpl-")))
    async with asyncio.timeout(5):
        again_completion = await sdk.chat.completions.create(
            model="fake",
            messages=messages,  # type: ignore[arg-type]
            extra_headers={"x-stainless-retry-count": "1"},
        )
    assert again_completion.id == completion.id
    assert again_completion.choices[0].message.content == expected_text("expired too", WORDS)


async def test_a_quiet_stream_keeps_alive_with_the_last_events_number(
    base_url: str,  # noqa: F811
    token: str,
) -> None:
    _, created = await post(
        base_url, token, {"model": "fake?words=3&ttft_ms=700", "input": "quiet", "background": True}
    )
    events = await raw_events(base_url, token, f"/responses/{created['id']}?stream=true")
    alive = [n for n, e in enumerate(events) if e["type"] == "keepalive"]
    assert alive, "heartbeats come every 0.2 s here, the first token after 0.7 s"
    for n in alive:
        assert events[n]["sequence_number"] == events[n - 1]["sequence_number"]
    numbered = [e["sequence_number"] for e in events if e["type"] != "keepalive"]
    assert numbered == list(range(len(numbered)))


async def test_cancel_of_a_running_response_keeps_what_it_said(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.responses.create(model="fake?words=300&delay_ms=20", input="stop", background=True, stream=True)
    said = ""
    async for event in stream:
        if event.type == "response.created":
            response_id = event.response.id
        if event.type == "response.output_text.delta":
            said += event.delta
            if len(said) > 20:
                break
    await stream.close()
    cancelled = await sdk.responses.cancel(response_id)
    assert cancelled.status == "cancelled"
    assert cancelled.output_text.startswith(said)
    assert cancelled.output_text != expected_text("stop", 300)


async def test_a_chat_completions_field_is_not_a_vendors_on_the_responses_route(
    base_url: str,  # noqa: F811
    token: str,
) -> None:
    for name, value in [("max_completion_tokens", 99999), ("messages", []), ("logprobs", True), ("n", 3)]:
        status, answer = await post(base_url, token, {"input": "x", name: value})
        assert (status, answer["error"]["param"]) == (400, name)


async def test_a_refused_request_is_the_sdks_error_and_its_object_keeps_the_code(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.responses.create(model="fake?fail=400", input="too long")
    assert caught.value.code == "context_length_exceeded"
    background = await sdk.responses.create(model="fake?fail=400", input="too long", background=True)
    async with sdk.responses.stream(response_id=background.id) as stream:
        failed = [e async for e in stream][-1]
    assert failed.type == "response.failed"
    assert failed.response.error is not None
    assert failed.response.error.code == "context_length_exceeded"
    read = await sdk.responses.retrieve(background.id)
    assert read.status == "failed"
    assert read.error is not None
    assert read.error.code == "context_length_exceeded"


async def test_deep_nesting_is_malformed_json_on_every_create_route(
    base_url: str,  # noqa: F811
    token: str,
) -> None:
    deep = "[" * 5000 + "]" * 5000
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(headers=auth) as session:
        for path in ("/responses", "/chat/completions", "/chats"):
            data = '{"input": "x", "messages": [], "metadata": ' + deep + "}"
            async with session.post(f"{base_url}{path}", data=data) as response:
                assert response.status == 400, path
                assert (await response.json())["error"]["code"] == "malformed_json"


async def test_a_retry_after_the_whole_chat_expired_is_a_410_not_a_wait(
    sdk: openai.AsyncOpenAI,
    base_url: str,  # noqa: F811
    token: str,
    settings: Settings,
) -> None:
    body = {"model": "fake", "input": "forgotten"}
    _, first = await post(base_url, token, body, {"Idempotency-Key": "gone-1"})
    chat_id = first["id"].removeprefix("resp_")
    async with Redis.from_url(str(settings.redis_url)) as redis:
        await redis.delete(keys.chat(chat_id), keys.events(chat_id))  # RESULT_TTL shorter than the key's 24 h
    async with asyncio.timeout(5):
        status, again = await post(base_url, token, body, {"Idempotency-Key": "gone-1"})
    assert (status, again["error"]["code"]) == (410, "stream_expired")


async def test_a_refused_sync_create_retried_after_expiry_is_refused_again(
    base_url: str,  # noqa: F811
    token: str,
    settings: Settings,
) -> None:
    body = {"model": "fake?fail=400", "input": "too long again"}
    status, first = await post(base_url, token, body, {"Idempotency-Key": "refused-1"})
    assert (status, first["error"]["code"], first["error"]["param"]) == (400, "context_length_exceeded", "input")
    async with Redis.from_url(str(settings.redis_url)) as redis:
        for key in await redis.keys(keys.events("*")):
            await redis.delete(key)
    async with asyncio.timeout(5):
        status, again = await post(base_url, token, body, {"Idempotency-Key": "refused-1"})
    assert (status, again["error"]) == (400, first["error"])


async def test_deep_free_form_json_is_refused_before_it_runs(
    base_url: str,  # noqa: F811
    token: str,
) -> None:
    deep: Any = {}
    for _ in range(200):  # deep enough to be refused, shallow enough to decode
        deep = {"a": deep}
    tools = [{"type": "function", "name": "f", "parameters": deep}]
    status, answer = await post(base_url, token, {"input": "x", "tools": tools})
    assert (status, answer["error"]["param"]) == (400, "tools[0].parameters"), "named as the Responses request has it"
    assert "tools[0].parameters" in answer["error"]["message"]
    text = {"format": {"type": "json_schema", "name": "a", "schema": deep}}
    status, answer = await post(base_url, token, {"input": "x", "text": text})
    assert (status, answer["error"]["param"]) == (400, "text.format")
    status, answer = await post(base_url, token, {"input": "x", "functions": []})
    assert (status, answer["error"]["param"]) == (400, "functions")


async def test_a_resume_starting_after_past_the_last_event_is_a_400(
    sdk: openai.AsyncOpenAI,
    base_url: str,  # noqa: F811
    token: str,
) -> None:
    finished = await sdk.responses.create(model="fake", input="finished")
    events = await raw_events(base_url, token, f"/responses/{finished.id}?stream=true")
    last = events[-1]["sequence_number"]
    assert await raw_events(base_url, token, f"/responses/{finished.id}?stream=true&starting_after={last}") == []
    running = await sdk.responses.create(model="fake?words=300&delay_ms=20", input="running", background=True)
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=auth) as session:
        # a running response's is judged by the events it produced so far
        for response_id, after in ((finished.id, last + 1), (finished.id, 9999), (running.id, 9999)):
            url = f"{base_url}/responses/{response_id}?stream=true&starting_after={after}"
            async with asyncio.timeout(5), session.get(url) as response:
                assert response.status == 400
                error = (await response.json())["error"]
            assert (error["param"], error["type"]) == ("starting_after", "invalid_request_error")
    await sdk.responses.cancel(running.id)
