"""The OpenAI front door, driven by the real openai SDK over HTTP: the API and edge in-process, a
long-running worker, the simulated LLM on a real port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from unittest import mock

import aiohttp
import msgspec
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from streambridge.api import completions, models
from streambridge.api.app import make_app
from streambridge.api.context import CONTEXT
from streambridge.api.errors import error_type
from streambridge.fake_llm import expected_reasoning, expected_text, expected_tool_call
from streambridge.shared import keys
from streambridge.shared.errors import RequestTimeout
from streambridge.shared.settings import Settings
from streambridge.workers.worker import make_worker, stop_worker
from tests.integration.conftest import FAST_LLM

Client = TestClient  # type: ignore[type-arg]
WORDS = FAST_LLM.words


@pytest.fixture
async def base_url(settings: Settings, llm_url: str) -> AsyncIterator[str]:
    """API and edge on one port with a worker running: what ``streambridge up`` serves."""
    server = TestServer(make_app(msgspec.structs.replace(settings, llm_base_url=llm_url)))
    await server.start_server()
    worker = make_worker(settings, llm_url)
    main = asyncio.create_task(worker.main())
    yield str(server.make_url("/v1"))
    await stop_worker(worker, main, grace=1)
    await server.close()


@pytest.fixture
async def sdk(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base_url}/auth/visitor") as response:
            token = (await response.json())["token"]
    client = openai.AsyncOpenAI(base_url=base_url, api_key=token, max_retries=0)
    yield client
    await client.close()


def ask(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def test_a_completion_comes_back_whole(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(model="fake", messages=ask("whole"))  # type: ignore[arg-type]
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == expected_text("whole", WORDS)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.model_extra is not None
    assert len(completion.model_extra["streambridge"]["chat_id"]) == 32


async def test_a_streamed_completion_is_the_answer_and_ends_with_usage(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="fake",
        messages=ask("streamed"),  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text("streamed", WORDS)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert len({c.id for c in chunks}) == 1


async def test_a_dropped_chunk_stream_resumes_from_its_cursor_exactly(
    sdk: openai.AsyncOpenAI, base_url: str, settings: Settings
) -> None:
    stream = await sdk.chat.completions.create(model="fake", messages=ask("resume me"), stream=True)  # type: ignore[arg-type]
    seen: list[str] = []
    async for chunk in stream:
        seen.append(chunk.choices[0].delta.content or "")
        if len(seen) == 4:
            cursor = chunk.model_extra["streambridge"]  # type: ignore[index]
            break
    await stream.close()
    url = f"{base_url}/chat/completions/{cursor['chat_id']}/stream?after={cursor['cursor']}"
    rest: list[str] = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {sdk.api_key}"}) as session:
        async with session.get(url) as response:
            assert response.status == 200
            for line in (await response.read()).decode().splitlines():
                if line.startswith("data: {"):
                    chunk = msgspec.json.decode(line[6:])
                    rest += [c["delta"].get("content") or "" for c in chunk["choices"]]
                elif line.startswith("data: "):
                    assert line == "data: [DONE]"
    assert "".join(seen + rest) == expected_text("resume me", WORDS)


async def test_a_resume_between_the_finish_chunk_and_the_usage_chunk_gets_the_usage_alone(
    sdk: openai.AsyncOpenAI, base_url: str
) -> None:
    # both come from the chat's last entry: had they one cursor, a client that got the finish chunk
    # and lost the usage chunk could not ask for the second alone
    stream = await sdk.chat.completions.create(
        model="fake",
        messages=ask("usage after finish"),  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    finish, usage = chunks[-2], chunks[-1]
    assert finish.choices[0].finish_reason == "stop"
    where = finish.model_extra["streambridge"]  # type: ignore[index]
    assert where["cursor"].endswith(":finish")
    assert usage.model_extra["streambridge"]["cursor"] == where["cursor"].removesuffix(":finish")  # type: ignore[index]

    async def after(cursor: str) -> list[str]:
        url = f"{base_url}/chat/completions/{where['chat_id']}/stream?after={cursor}&include_usage=true"
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {sdk.api_key}"}) as session:
            async with session.get(url) as response:
                assert response.status == 200
                return [line for line in (await response.read()).decode().splitlines() if line.startswith("data:")]

    rest = await after(where["cursor"])
    assert len(rest) == 2
    assert msgspec.json.decode(rest[0][6:])["usage"] == usage.usage.model_dump(exclude_none=True)  # type: ignore[union-attr]
    assert rest[1] == "data: [DONE]"
    assert await after(where["cursor"].removesuffix(":finish")) == ["data: [DONE]"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"n": 2}, "n"),
        ({"messages": []}, "messages"),
        ({"logprobs": True}, "logprobs"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"logit_bias": {"50256": 101}}, "logit_bias[...]"),
    ],
)
async def test_a_malformed_request_is_the_sdks_bad_request_naming_its_field(
    sdk: openai.AsyncOpenAI, extra: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model="fake", **{"messages": ask("x"), **extra})  # type: ignore[call-overload]
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"


async def test_an_upstreams_refusal_is_passed_on_with_its_code_and_param(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model="fake?fail=400", messages=ask("too long"))  # type: ignore[arg-type]
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "messages")
    assert caught.value.response.headers["x-should-retry"] == "false"
    stream = await sdk.chat.completions.create(
        model="fake?fail=400",
        messages=ask("too long, streamed"),  # type: ignore[arg-type]
        stream=True,
    )
    with pytest.raises(openai.APIError, match="fail=400") as raised:
        async for _ in stream:
            pass
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "context_length_exceeded"


async def test_an_upstream_that_failed_every_attempt_is_a_502_the_sdk_does_not_retry(base_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base_url}/auth/visitor") as response:
            token = (await response.json())["token"]
    retrying = openai.AsyncOpenAI(base_url=base_url, api_key=token, max_retries=2)
    with pytest.raises(openai.InternalServerError) as caught:
        await retrying.chat.completions.create(model="fake?fail=500", messages=ask("broken"))  # type: ignore[arg-type]
    await retrying.close()
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_failed"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert caught.value.response.request.headers.get("x-stainless-retry-count") == "0", "the SDK did not retry"


async def test_a_chat_cancelled_while_its_completion_waits_is_the_sdks_conflict_error(
    sdk: openai.AsyncOpenAI, base_url: str, settings: Settings
) -> None:
    waiting = asyncio.create_task(
        sdk.chat.completions.create(model="fake?words=300&delay_ms=20", messages=ask("cancel me"))  # type: ignore[arg-type]
    )
    async with Redis.from_url(str(settings.redis_url)) as redis, asyncio.timeout(10):
        while not (running := [c for k in await redis.keys(keys.worker_chats("*")) for c in await redis.hkeys(k)]):  # type: ignore[misc]
            await asyncio.sleep(0.02)
    chat_id = running[0].decode()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {sdk.api_key}"}) as session:
        async with session.post(f"{base_url}/chats/{chat_id}/cancel") as response:
            assert response.status == 202
    with pytest.raises(openai.ConflictError) as caught:
        await waiting
    assert caught.value.code == "cancelled"
    assert caught.value.response.headers["x-should-retry"] == "false"


async def test_a_bad_key_is_the_sdks_authentication_error(base_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sbk_nope_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="fake", messages=ask("x"))  # type: ignore[arg-type]
    await client.close()


async def upstream_asked(llm_url: str, prompt: str) -> dict[str, Any]:
    """The last body the simulated LLM was sent whose last message says ``prompt``."""
    async with aiohttp.ClientSession() as session:
        async with session.get(llm_url.removesuffix("/v1") + "/_requests") as response:
            bodies = await response.json()
    asked = [body for body in bodies if body and body["messages"][-1]["content"] == prompt]
    assert asked, f"the upstream was never asked {prompt!r}"
    return asked[-1]  # type: ignore[no-any-return]


async def test_vendor_fields_reach_the_upstream(sdk: openai.AsyncOpenAI, llm_url: str) -> None:
    completion = await sdk.chat.completions.create(
        model="fake",
        messages=ask("extras"),  # type: ignore[arg-type]
        extra_body={"top_k": 5, "repetition_penalty": 1.1, "chat_template_kwargs": {"enable_thinking": False}},
        response_format={"type": "json_object"},
        seed=7,
        stop=["END", "STOP"],
        top_p=0.5,
        presence_penalty=0.25,
        max_completion_tokens=100,
        reasoning_effort="low",
        user="u-1",
        metadata={"k": "v"},
    )
    assert completion.choices[0].message.content == expected_text("extras", WORDS)
    asked = await upstream_asked(llm_url, "extras")
    sent = {
        "top_k": 5,
        "repetition_penalty": 1.1,
        "chat_template_kwargs": {"enable_thinking": False},
        "response_format": {"type": "json_object"},
        "seed": 7,
        "stop": ["END", "STOP"],
        "top_p": 0.5,
        "presence_penalty": 0.25,
        "max_completion_tokens": 100,
        "reasoning_effort": "low",
        "user": "u-1",
        "metadata": {"k": "v"},
    }
    assert {k: asked.get(k) for k in sent} == sent
    assert "extra" not in asked, "a vendor's fields go at the top level, as the SDK's extra_body puts them"


async def test_tools_and_content_parts_reach_the_upstream(sdk: openai.AsyncOpenAI, llm_url: str) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}
    content = [{"type": "text", "text": "look"}, image]
    tool_choice = {"type": "function", "function": {"name": "lookup"}}
    await sdk.chat.completions.create(
        model="fake",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": content}],  # type: ignore[list-item]
        tools=[LOOKUP],  # type: ignore[list-item]
        tool_choice=tool_choice,  # type: ignore[arg-type]
        parallel_tool_calls=False,
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(llm_url.removesuffix("/v1") + "/_requests") as response:
            asked = (await response.json())[-1]
    assert asked["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]
    assert (asked["tools"], asked["tool_choice"], asked["parallel_tool_calls"]) == ([LOOKUP], tool_choice, False)


async def test_an_sdk_retry_finds_the_first_chat_and_a_fresh_request_makes_a_new_one(
    sdk: openai.AsyncOpenAI, base_url: str
) -> None:
    body = {"model": "fake", "messages": ask("once")}
    headers = {"Authorization": f"Bearer {sdk.api_key}"}
    ids = []
    async with aiohttp.ClientSession(headers=headers) as session:
        for retry in ("0", "1", "2", "0"):
            url = f"{base_url}/chat/completions"
            async with session.post(url, json=body, headers={"x-stainless-retry-count": retry}) as response:
                assert response.status == 200
                ids.append((await response.json())["streambridge"]["chat_id"])
    assert ids[0] == ids[1] == ids[2], "the SDK's retries are the first request"
    assert ids[3] != ids[0], "asked afresh, it is a new chat"


async def test_models_are_the_upstreams(sdk: openai.AsyncOpenAI) -> None:
    assert [m.id async for m in sdk.models.list()] == ["fake"]
    assert (await sdk.models.retrieve("fake")).id == "fake"
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.models.retrieve("org/unknown")
    assert caught.value.code == "model_not_found"


async def test_models_fall_back_to_the_configured_one_without_an_upstream_list(settings: Settings) -> None:
    unreachable = msgspec.structs.replace(settings, llm_base_url="http://127.0.0.1:9/v1", llm_model="my-model")
    async with TestClient(TestServer(make_app(unreachable))) as client:
        token = (await (await client.post("/v1/auth/visitor")).json())["token"]
        response = await client.get("/v1/models", headers={"Authorization": f"Bearer {token}"})
        assert response.status == 200
        assert [m["id"] for m in (await response.json())["data"]] == ["my-model"]


LOOKUP = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}},
}


async def test_a_streamed_tool_call_is_assembled_by_the_sdks_stream_helper(sdk: openai.AsyncOpenAI) -> None:
    async with sdk.chat.completions.stream(model="fake", messages=ask("use a tool"), tools=[LOOKUP]) as stream:  # type: ignore[arg-type,list-item]
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = expected_tool_call("use a tool", "lookup")
    assert choice.message.tool_calls is not None
    assert [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        (call.id, "lookup", call.function.arguments)
    ]


async def test_a_tool_call_comes_back_whole_without_streaming(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(model="fake", messages=ask("whole tool"), tools=[LOOKUP])  # type: ignore[arg-type,list-item]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.choices[0].message.content is None
    calls = completion.choices[0].message.tool_calls
    assert calls is not None
    assert calls[0].function.arguments == expected_tool_call("whole tool", "lookup").function.arguments


async def test_reasoning_streams_apart_from_the_answer(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(model="fake?reasoning=6", messages=ask("think"), stream=True)  # type: ignore[arg-type]
    reasoning, text = "", ""
    async for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            text += delta.content or ""
    assert reasoning == expected_reasoning("think", 6)
    assert text == expected_text("think", WORDS)


async def test_a_json_schema_response_format_is_taken(sdk: openai.AsyncOpenAI, llm_url: str) -> None:
    schema = {
        "name": "answer",
        "strict": True,
        "schema": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
    }
    completion = await sdk.chat.completions.create(
        model="fake",
        messages=ask("json"),  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": schema},  # type: ignore[typeddict-item]
    )
    assert completion.choices[0].message.content == expected_text("json", WORDS)
    asked = await upstream_asked(llm_url, "json")
    assert asked["response_format"] == {"type": "json_schema", "json_schema": schema}


async def test_the_tool_loop_sends_the_reply_back_and_goes_on(sdk: openai.AsyncOpenAI) -> None:
    messages: list[object] = [*ask("loop")]
    first = await sdk.chat.completions.create(model="fake", messages=messages, tools=[LOOKUP])  # type: ignore[arg-type,list-item]
    reply = first.choices[0].message
    assert reply.tool_calls is not None
    messages += [reply, {"role": "tool", "tool_call_id": reply.tool_calls[0].id, "content": "42"}]
    second = await sdk.chat.completions.create(model="fake?reasoning=2", messages=messages)  # type: ignore[arg-type]
    messages.append(second.choices[0].message)  # with its reasoning_content, which goes no further
    messages.append({"role": "user", "content": "and?"})
    third = await sdk.chat.completions.create(model="fake", messages=messages)  # type: ignore[arg-type]
    assert third.choices[0].message.content


async def test_an_edge_stopping_mid_stream_is_an_error_for_the_sdk_not_an_end(
    sdk: openai.AsyncOpenAI, settings: Settings, llm_url: str
) -> None:
    server = TestServer(make_app(settings))
    await server.start_server()
    worker = make_worker(settings, llm_url)
    main = asyncio.create_task(worker.main())
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=sdk.api_key, max_retries=0)
    try:
        stream = await client.chat.completions.create(model="fake?delay_ms=50", messages=ask("cut"), stream=True)  # type: ignore[arg-type]

        async def read_while_the_edge_stops() -> None:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    server.app[CONTEXT].hub.close_all()  # type: ignore[union-attr]

        with pytest.raises(openai.APIError, match="interrupted"):
            await read_while_the_edge_stops()
    finally:
        await client.close()
        await stop_worker(worker, main, grace=1)
        await server.close()


async def test_a_vendor_field_must_be_named_like_one(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model="fake", messages=ask("x"), extra_body={"not a name!": 1})  # type: ignore[arg-type]
    assert caught.value.param == "not a name!"


async def test_what_the_sdk_may_send_is_taken(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="fake",
        messages=ask("options"),  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
        reasoning_effort="xhigh",  # type: ignore[arg-type]
        n=None,
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == expected_text("options", WORDS)


async def test_a_resume_past_the_end_is_a_400_naming_after(sdk: openai.AsyncOpenAI, base_url: str) -> None:
    finished = await sdk.chat.completions.create(model="fake", messages=ask("finished"))  # type: ignore[arg-type]
    chat_id = finished.id.removeprefix("chatcmpl-")
    slow = "fake?words=300&delay_ms=20"
    running = await sdk.chat.completions.create(model=slow, messages=ask("running"), stream=True)  # type: ignore[arg-type]
    running_id = (await anext(aiter(running))).model_extra["streambridge"]["chat_id"]  # type: ignore[index]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {sdk.api_key}"}) as session:
        async with session.get(f"{base_url}/chat/completions/{chat_id}/stream") as response:
            lines = (await response.read()).decode().splitlines()
        last = msgspec.json.decode([line for line in lines if line.startswith("data: {")][-1][6:])
        url = f"{base_url}/chat/completions/{chat_id}/stream?after={last['streambridge']['cursor']}"
        async with session.get(url) as response:
            assert (response.status, (await response.read()).decode()) == (200, "data: [DONE]\n\n"), "the end is said"
        for resumed in (chat_id, running_id):  # a running chat's is judged by what it produced so far
            url = f"{base_url}/chat/completions/{resumed}/stream?after=99999999999999-0"
            async with asyncio.timeout(5), session.get(url) as response:
                assert response.status == 400
                error = (await response.json())["error"]
            assert (error["code"], error["param"], error["type"]) == ("bad_cursor", "after", "invalid_request_error")
    await running.close()


async def test_every_error_status_is_the_sdks_own_exception_class(
    settings: Settings, llm_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the SDK raises is picked by the status alone; the error body's code reaches it as well."""
    tight = msgspec.structs.replace(settings, llm_base_url=llm_url, max_body_bytes=4096, max_queue_depth=2)
    server = TestServer(make_app(tight))
    await server.start_server()
    worker = make_worker(tight, llm_url)
    main = asyncio.create_task(worker.main())
    async with aiohttp.ClientSession() as session:
        async with session.post(server.make_url("/v1/auth/visitor")) as response:
            token = (await response.json())["token"]
    sdk = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=token, max_retries=0)
    ctx = server.app[CONTEXT]

    async def raised(model: str = "fake", prompt: str = "x", **extra: Any) -> openai.APIStatusError:
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.chat.completions.create(model=model, messages=ask(prompt), **extra)
        return caught.value

    try:
        cases: list[tuple[openai.APIStatusError, type[openai.APIStatusError], int, str]] = []
        cases.append((await raised(prompt="x" * 5000), openai.APIStatusError, 413, "payload_too_large"))
        cases.append((await raised("fake?fail=404", "unknown"), openai.NotFoundError, 404, "model_not_found"))
        expire = {"extra_headers": {"Idempotency-Key": "k-410"}}
        first = await sdk.chat.completions.create(model="fake", messages=ask("expire"), **expire)  # type: ignore[call-overload]
        await ctx.streams.delete(keys.events(first.id.removeprefix("chatcmpl-")))  # as STREAM_TTL would
        expired = await raised(prompt="expire", stream=True, **expire)
        cases.append((expired, openai.APIStatusError, 410, "stream_expired"))
        await stop_worker(worker, main, grace=1)  # nothing takes the queued chats now
        await ctx.redis.zadd(keys.queue(), {"job-1": 1, "job-2": 2})
        cases.append((await raised(), openai.InternalServerError, 503, "overloaded"))
        await ctx.redis.zrem(keys.queue(), "job-1", "job-2")
        with monkeypatch.context() as patched:
            too_slow = RequestTimeout("the request body did not arrive within 10 s")
            patched.setattr(completions, "read_body", mock.AsyncMock(side_effect=too_slow))
            cases.append((await raised(), openai.APIStatusError, 408, "request_timeout"))
        with monkeypatch.context() as patched:
            unreachable = Redis.from_url("redis://127.0.0.1:9/0")
            patched.setattr(ctx, "redis", unreachable)
            cases.append((await raised(), openai.InternalServerError, 503, "redis_unavailable"))
            await unreachable.aclose()
        for exc, cls, status, code in cases:
            assert (type(exc), exc.status_code, exc.code) == (cls, status, code)
            assert exc.type == error_type(status)
    finally:
        await sdk.close()
        if not main.done():
            await stop_worker(worker, main, grace=1)
        await server.close()


async def test_the_native_create_takes_a_whole_chat_completions_body_and_passes_it_on(
    sdk: openai.AsyncOpenAI, base_url: str, llm_url: str
) -> None:
    content = [
        {"type": "text", "text": "native"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    response_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
    body = {
        "model": "fake",
        "messages": [{"role": "user", "content": content}],
        "tools": [LOOKUP],
        "tool_choice": "auto",
        "response_format": response_format,
        "stop": "END",
        "seed": 3,
        "top_k": 5,  # a vendor's field
        "stream": True,  # the native answer is always a stream: taken
        "stream_options": {"include_usage": True},
        "n": 1,
    }
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {sdk.api_key}"}) as session:
        async with session.post(f"{base_url}/chats", json=body) as response:
            assert response.status == 202, await response.text()
            chat_id = (await response.json())["id"]
        async with asyncio.timeout(10):
            while (chat := await (await session.get(f"{base_url}/chats/{chat_id}")).json())["status"] != "complete":
                await asyncio.sleep(0.05)
        assert chat["finish_reason"] == "tool_calls", "the upstream was offered the tool"
        async with session.get(llm_url.removesuffix("/v1") + "/_requests") as response:
            asked = (await response.json())[-1]
        sent = {
            k: asked.get(k) for k in ("messages", "tools", "tool_choice", "response_format", "stop", "seed", "top_k")
        }
        assert sent == {
            "messages": [{"role": "user", "content": content}],
            "tools": [LOOKUP],
            "tool_choice": "auto",
            "response_format": response_format,
            "stop": "END",
            "seed": 3,
            "top_k": 5,
        }
        for refused, param in (({"stream": False}, "stream"), ({"n": 2}, "n")):
            async with session.post(f"{base_url}/chats", json={"message": "x", **refused}) as response:
                assert response.status == 422
                assert (await response.json())["error"]["param"] == param


async def test_the_model_list_is_fetched_once_within_the_cache_window(
    sdk: openai.AsyncOpenAI, llm_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fetched() -> int:
        async with aiohttp.ClientSession() as session:
            async with session.get(llm_url.removesuffix("/v1") + "/_stats") as response:
                return int((await response.json())["paths"].get("/v1/models", 0))

    monkeypatch.setattr(models, "CACHE_FOR", 0.5)
    await asyncio.gather(sdk.models.list(), sdk.models.list(), sdk.models.retrieve("fake"))
    assert [m.id async for m in sdk.models.list()] == ["fake"]
    assert await fetched() == 1, "one fetch however many ask, within the window"
    await asyncio.sleep(0.6)
    await sdk.models.list()
    assert await fetched() == 2, "asked again once the window passed"


async def test_a_finish_cursor_on_an_entry_that_is_not_the_end_is_a_400(sdk: openai.AsyncOpenAI, base_url: str) -> None:
    stream = await sdk.chat.completions.create(model="fake", messages=ask("no finish here"), stream=True)  # type: ignore[arg-type]
    chunks = [chunk async for chunk in stream]
    where = chunks[1].model_extra["streambridge"]  # type: ignore[index]
    url = f"{base_url}/chat/completions/{where['chat_id']}/stream?after={where['cursor']}:finish"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {sdk.api_key}"}) as session:
        async with session.get(url) as response:
            assert response.status == 400
            assert (await response.json())["error"]["param"] == "after"
