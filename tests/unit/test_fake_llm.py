"""The simulated LLM, driven over real HTTP by the real openai SDK."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from openai.types.chat import ChatCompletionChunk

from streambridge.fake_llm import (
    DEFAULT_CONFIG,
    FakeLLMConfig,
    config_from_model,
    expected_reasoning,
    expected_text,
    expected_tool_call,
    make_app,
    split_text,
)
from streambridge.shared.events import FunctionCall, ToolCall

MakeServer = Callable[..., Awaitable[TestServer]]
MakeClient = Callable[[TestServer], Awaitable[TestClient[web.Request, web.Application]]]
FAST = FakeLLMConfig(ttft_ms=0, delay_ms=0)


@pytest.fixture
async def server(aiohttp_server: MakeServer) -> TestServer:
    return await aiohttp_server(make_app(FAST))


@pytest.fixture
async def llm(server: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
async def http(server: TestServer, aiohttp_client: MakeClient) -> TestClient[web.Request, web.Application]:
    return await aiohttp_client(server)


def user(prompt: str) -> list[Any]:
    return [{"role": "user", "content": prompt}]


async def drain(stream: openai.AsyncStream[ChatCompletionChunk], into: list[ChatCompletionChunk]) -> None:
    async for chunk in stream:
        into.append(chunk)


def test_expected_text_is_deterministic_words_with_awkward_text() -> None:
    text = expected_text("hello", 40)
    assert text == expected_text("hello", 40)
    assert text != expected_text("hello!", 40)
    assert expected_text("hello", 5) == "token naïve😀 north token Ωmega"  # pinned: must not change across runs
    assert text.split(" ") == text.split()
    assert len(text.split()) == 40
    for awkward in ("é", "ß", "e\u0301", "東京", "👩\u200d💻", "🇯🇵", "👍🏽"):
        assert awkward in text
    assert expected_text("hello", 0) == ""


def test_chunks_split_mid_word_and_mid_grapheme() -> None:
    chunks = [chunk for prompt in ("a", "b", "c", "d") for chunk in split_text(expected_text(prompt, 40))]
    assert {len(chunk) for chunk in chunks} == {1, 2, 3, 4, 5, 6}
    assert any(chunk.startswith("\u200d") or chunk.endswith("\u200d") for chunk in chunks)  # inside 👩‍💻
    assert any(unicodedata.combining(chunk[0]) for chunk in chunks)  # e | U+0301


def test_config_from_model_overrides_and_rejects() -> None:
    assert config_from_model(DEFAULT_CONFIG, "fake") is DEFAULT_CONFIG
    assert config_from_model(DEFAULT_CONFIG, None) is DEFAULT_CONFIG
    config = config_from_model(DEFAULT_CONFIG, "fake?words=5&fail=drop:3&fail_times=1&ttft_ms=0&delay_ms=1")
    assert config == FakeLLMConfig(words=5, fail="drop:3", fail_times=1, ttft_ms=0, delay_ms=1)
    config = config_from_model(DEFAULT_CONFIG, "fake?reasoning=6&tool=get_weather")
    assert (config.reasoning, config.tool) == (6, "get_weather")
    bad_ones = ("fake?nope=1", "fake?words=many", "fake?fail=boom", "fake?delay_ms=-1", "fake?split=utf8")
    for bad in (*bad_ones, "fake?reasoning=-1", "fake?tool=not%20a%20name"):
        with pytest.raises(ValueError, match=r"fake model option|fail must|split must|tool must|not negative"):
            config_from_model(DEFAULT_CONFIG, bad)


async def test_stream_joins_to_expected_text_in_openai_chunk_shapes(llm: openai.AsyncOpenAI) -> None:
    stream = await llm.chat.completions.create(
        model="fake?words=12",
        messages=[{"role": "system", "content": "be brief"}, *user("hello there")],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    role, *content, finish, usage = chunks
    assert role.object == "chat.completion.chunk"
    assert role.model == "fake?words=12"
    assert len({chunk.id for chunk in chunks}) == 1
    assert role.choices[0].delta.role == "assistant"
    assert role.choices[0].delta.content == ""
    assert "".join(chunk.choices[0].delta.content or "" for chunk in content) == expected_text("hello there", 12)
    assert all(chunk.choices[0].finish_reason is None for chunk in content)
    assert finish.choices[0].finish_reason == "stop"
    assert finish.choices[0].delta.content is None
    assert usage.choices == []
    assert usage.usage is not None
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (4, len(content))
    assert usage.usage.total_tokens == 4 + len(content)


async def test_stream_wire_format_is_data_lines_ending_in_done(http: TestClient[web.Request, web.Application]) -> None:
    body = {"model": "fake?words=3", "messages": user("hi"), "stream": True}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = (await response.text()).split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: {") for event in events[:-2])
    assert [json.loads(e[6:])["choices"][0]["delta"] for e in events[-3:-2]] == [{}]


async def test_utf16_split_sends_lone_surrogates_as_escapes(
    llm: openai.AsyncOpenAI, http: TestClient[web.Request, web.Application]
) -> None:
    model, prompt = "fake?words=8&split=utf16", "emoji"  # chosen so that 👩 straddles two chunks
    stream = await llm.chat.completions.create(model=model, messages=user(prompt), stream=True)
    parts = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert any("\ud800" <= part[-1:] <= "\udbff" for part in parts)  # a chunk ends in a lone high surrogate
    joined = "".join(parts).encode("utf-16", "surrogatepass").decode("utf-16")
    assert joined == expected_text(prompt, 8)
    raw = await (
        await http.post("/v1/chat/completions", json={"model": model, "messages": user(prompt), "stream": True})
    ).text()
    assert "\\ud83" in raw
    assert raw.isascii()


async def test_non_stream_answers_whole_text_with_usage(llm: openai.AsyncOpenAI) -> None:
    completion = await llm.chat.completions.create(model="fake?words=7", messages=user("one two three"))
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == expected_text("one two three", 7)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 3
    assert completion.usage.completion_tokens == len(split_text(expected_text("one two three", 7)))


async def test_models_lists_fake(llm: openai.AsyncOpenAI) -> None:
    assert [model.id async for model in llm.models.list()] == ["fake"]


async def test_500_and_429_raise_the_sdk_errors(llm: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        await llm.chat.completions.create(model="fake?fail=500", messages=user("x"), stream=True)
    with pytest.raises(openai.RateLimitError) as caught:
        await llm.chat.completions.create(model="fake?fail=429&retry_after=2", messages=user("x"), stream=True)
    assert caught.value.response.headers["Retry-After"] == "2"
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "rate_limit_error"


async def test_drop_raises_after_exactly_k_content_chunks(llm: openai.AsyncOpenAI) -> None:
    stream = await llm.chat.completions.create(model="fake?fail=drop:3", messages=user("x"), stream=True)
    chunks: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APIConnectionError):
        await drain(stream, chunks)
    contents = [chunk.choices[0].delta.content for chunk in chunks]
    assert contents[1:] == split_text(expected_text("x", 40))[:3]


async def test_fail_times_fails_the_first_request_then_succeeds(llm: openai.AsyncOpenAI) -> None:
    model = "fake?fail=500&fail_times=1&words=4"
    with pytest.raises(openai.InternalServerError):
        await llm.chat.completions.create(model=model, messages=user("again"))
    completion = await llm.chat.completions.create(model=model, messages=user("again"))
    assert completion.choices[0].message.content == expected_text("again", 4)
    with pytest.raises(openai.InternalServerError):  # another prompt counts on its own
        await llm.chat.completions.create(model=model, messages=user("other"))


@contextlib.asynccontextmanager
async def serve(app: web.Application, *, handler_cancellation: bool) -> AsyncIterator[str]:
    """The app on a free port; TestServer always turns handler_cancellation on, the CLI may not."""
    runner = web.AppRunner(app, handler_cancellation=handler_cancellation)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_stall_times_out_and_the_server_lets_go(handler_cancellation: bool) -> None:
    async with (
        serve(make_app(FAST), handler_cancellation=handler_cancellation) as url,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as llm,
    ):
        stream = await llm.chat.completions.create(model="fake?fail=stall", messages=user("x"), stream=True)
        assert (await anext(stream)).choices[0].delta.role == "assistant"
        assert (await stats(llm))["streams_open"] == 1
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(stream), 0.3)
        await stream.close()
        for _ in range(40):
            if (await stats(llm))["streams_open"] == 0:
                break
            await asyncio.sleep(0.05)
        assert (await stats(llm))["streams_open"] == 0


async def stats(llm: openai.AsyncOpenAI) -> dict[str, Any]:
    result: dict[str, Any] = await llm.get(str(llm.base_url).removesuffix("/v1/") + "/_stats", cast_to=dict)
    return result


async def test_max_tokens_stops_with_length(llm: openai.AsyncOpenAI) -> None:
    stream = await llm.chat.completions.create(model="fake", messages=user("x"), stream=True, max_tokens=2)
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(split_text(expected_text("x", 40))[:2])
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_bad_requests_are_400_with_openai_error_bodies(
    llm: openai.AsyncOpenAI, http: TestClient[web.Request, web.Application]
) -> None:
    with pytest.raises(openai.BadRequestError):
        await llm.chat.completions.create(model="fake?words=lots", messages=user("x"))
    for body in (b"{not json", b'{"model": "fake"}', b'{"messages": []}'):
        response = await http.post("/v1/chat/completions", data=body)
        assert response.status == 400
        error = (await response.json())["error"]
        assert error["type"] == "invalid_request_error"
        assert error["code"] is None
        assert error["message"]


async def test_stats_counts_requests(llm: openai.AsyncOpenAI) -> None:
    await llm.chat.completions.create(model="fake?words=1", messages=user("x"))
    assert await stats(llm) == {"requests": 1, "streams_open": 0, "paths": {"/v1/chat/completions": 1}}


def test_expected_reasoning_and_tool_call_are_deterministic() -> None:
    reasoning = expected_reasoning("hello", 6)
    assert reasoning == expected_reasoning("hello", 6)
    assert len(reasoning.split()) == 6
    assert reasoning != expected_text("hello", 6)
    assert expected_reasoning("hello", 0) == ""
    call = expected_tool_call("weather in Paris?", "get_weather")
    assert call == expected_tool_call("weather in Paris?", "get_weather")
    assert call.id.startswith("call_")
    assert call.id != expected_tool_call("weather in Paris?", "search").id
    assert call.function == FunctionCall(name="get_weather", arguments='{"query":"weather in Paris?"}')
    assert json.loads(call.function.arguments) == {"query": "weather in Paris?"}


async def test_reasoning_streams_as_reasoning_content_before_the_answer(llm: openai.AsyncOpenAI) -> None:
    stream = await llm.chat.completions.create(model="fake?reasoning=5&words=4", messages=user("why"), stream=True)
    deltas = [chunk.choices[0].delta async for chunk in stream]
    reasoning = [(d.model_extra or {}).get("reasoning_content") for d in deltas]
    content = [d.content for d in deltas]
    first_content = next(i for i, c in enumerate(content) if c)
    assert "".join(r for r in reasoning[:first_content] if r) == expected_reasoning("why", 5)
    assert not any(reasoning[first_content:])
    assert "".join(c or "" for c in content) == expected_text("why", 4)
    completion = await llm.chat.completions.create(model="fake?reasoning=5&words=4", messages=user("why"))
    message = completion.choices[0].message
    assert (message.model_extra or {})["reasoning_content"] == expected_reasoning("why", 5)
    assert message.content == expected_text("why", 4)


WEATHER_TOOL: Any = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}},
}


async def test_a_request_with_tools_gets_one_tool_call_in_fragments_assembled_by_the_sdk(
    llm: openai.AsyncOpenAI,
) -> None:
    prompt = "what is the weather in Paris, 東京 and 👩\u200d💻 land?"
    expected = expected_tool_call(prompt, "get_weather")
    async with llm.chat.completions.stream(model="fake", messages=user(prompt), tools=[WEATHER_TOOL]) as stream:
        chunks = [event.chunk async for event in stream if event.type == "chunk"]
        final = await stream.get_final_completion()
    fragments = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(fragments) > 3  # the arguments come in pieces, as real servers send them
    assert fragments[0][0].id == expected.id
    assert all(f[0].id is None for f in fragments[1:])
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.choices[0].message.content is None
    (call,) = final.choices[0].message.tool_calls or []
    assert ToolCall(id=call.id, function=FunctionCall(call.function.name, call.function.arguments)) == expected


async def test_the_tool_option_calls_a_tool_the_request_did_not_offer_and_tool_choice_none_calls_none(
    llm: openai.AsyncOpenAI,
) -> None:
    completion = await llm.chat.completions.create(model="fake?tool=search&reasoning=2", messages=user("rivers"))
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls"
    assert (message.model_extra or {})["reasoning_content"] == expected_reasoning("rivers", 2)
    (call,) = message.tool_calls or []
    assert (call.id, call.function.name) == (expected_tool_call("rivers", "search").id, "search")
    plain = await llm.chat.completions.create(
        model="fake?words=3", messages=user("rivers"), tools=[WEATHER_TOOL], tool_choice="none"
    )
    assert plain.choices[0].message.content == expected_text("rivers", 3)
    assert plain.choices[0].message.tool_calls is None


async def test_echo_answers_with_the_prompt_verbatim(llm: openai.AsyncOpenAI) -> None:
    prompt = '<script>alert(1)</script> <img src=x onerror="alert(2)"> café 👩\u200d💻'
    stream = await llm.chat.completions.create(model="fake?echo=1", messages=user(prompt), stream=True)
    assert "".join([chunk.choices[0].delta.content or "" async for chunk in stream]) == prompt


async def test_request_bodies_are_kept_only_when_a_test_asks(aiohttp_client: Any) -> None:
    # the CLI's fake (which ``up`` embeds) must not keep users' prompts for anyone on the host to read
    plain = await aiohttp_client(make_app(FAST))
    assert (await plain.get("/_requests")).status == 404
    recording = await aiohttp_client(make_app(FAST, record=True))
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "top_k": 3}
    assert (await recording.post("/v1/chat/completions", json=body)).status == 200
    assert await (await recording.get("/_requests")).json() == [body]


async def test_stamped_chunks_say_when_the_upstream_wrote_them(llm: openai.AsyncOpenAI) -> None:
    before = time.time()
    stream = await llm.chat.completions.create(
        model="fake?stamp=1&words=3&ttft_ms=0&delay_ms=0", messages=[{"role": "user", "content": "x"}], stream=True
    )
    texts = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    assert texts
    assert all(before <= float(t.removeprefix("@")) <= time.time() for t in texts), texts
