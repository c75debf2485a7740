"""The official openai SDK, unchanged, against real processes: its retries make one chat, and a
chunk stream dropped mid-answer resumes on the other edge from its cursor, exactly."""

from __future__ import annotations

import asyncio

import aiohttp
import msgspec
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from streambridge.fake_llm import expected_reasoning, expected_text, expected_tool_call
from tests.e2e.conftest import System, login
from tests.numbering import sequence_numbers

pytestmark = pytest.mark.e2e

WORDS = 40
SLOW = f"fake?words={WORDS}&delay_ms=30"  # about 1.2 s


async def llm_requests(session: aiohttp.ClientSession, system: System) -> int:
    async with session.get(system.llm_url.removesuffix("/v1") + "/_stats") as response:
        return int((await response.json())["paths"].get("/v1/chat/completions", 0))


async def test_the_sdks_retries_after_timeouts_make_one_chat_and_one_upstream_call(system: System) -> None:
    async with aiohttp.ClientSession() as session:
        auth = await login(session, system.api.url)
        before = await llm_requests(session, system)
        # Each try gives up after 0.5 s, before the chat (1.2 s) ends: the SDK retries by itself.
        sdk = openai.AsyncOpenAI(
            base_url=f"{system.edges[0].url}/v1",
            api_key=auth["Authorization"].removeprefix("Bearer "),
            max_retries=4,
            timeout=0.5,
        )
        completion = await sdk.chat.completions.create(model=SLOW, messages=[{"role": "user", "content": "retry"}])
        await sdk.close()
        assert completion.choices[0].message.content == expected_text("retry", WORDS)
        assert await llm_requests(session, system) - before == 1, "one chat, asked upstream once"


async def test_a_dropped_chunk_stream_resumes_on_the_other_edge_exactly(system: System) -> None:
    async with aiohttp.ClientSession() as session:
        auth = await login(session, system.api.url)
        sdk = openai.AsyncOpenAI(
            base_url=f"{system.edges[0].url}/v1", api_key=auth["Authorization"].removeprefix("Bearer ")
        )
        stream = await sdk.chat.completions.create(
            model=SLOW, messages=[{"role": "user", "content": "two edges"}], stream=True
        )
        seen: list[str] = []
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
            if len(seen) == 10:
                where = (chunk.model_extra or {})["streambridge"]
                break
        await stream.close()  # the connection drops mid-answer
        await sdk.close()
        url = f"{system.edges[1].url}/v1/chat/completions/{where['chat_id']}/stream?after={where['cursor']}"
        rest: list[str] = []
        async with session.get(url, headers=auth) as response:
            assert response.status == 200
            lines = (await response.read()).decode().splitlines()
        for line in lines:
            if line.startswith("data: {"):
                rest += [c["delta"].get("content") or "" for c in msgspec.json.decode(line[6:])["choices"]]
        assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
        assert "".join(seen + rest) == expected_text("two edges", WORDS)


async def test_a_dropped_background_response_resumes_on_the_other_edge_by_both_sdk_calls(system: System) -> None:
    async with aiohttp.ClientSession() as session:
        key = (await login(session, system.api.url))["Authorization"].removeprefix("Bearer ")
    first, second = (openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key=key) for edge in system.edges)
    stream = await first.responses.create(model=SLOW, input="background", background=True, stream=True)
    seen = []
    async for event in stream:
        seen.append(event)
        if event.type == "response.output_text.delta" and len(seen) > 10:
            break
    await stream.close()  # the connection drops mid-answer
    response_id, last = seen[0].response.id, seen[-1].sequence_number
    said = "".join(e.delta for e in seen if e.type == "response.output_text.delta")
    rest = [e async for e in await second.responses.retrieve(response_id, stream=True, starting_after=last)]
    numbers = sequence_numbers(rest)
    assert numbers == list(range(last + 1, last + 1 + len(numbers)))
    deltas = "".join(e.delta for e in rest if e.type == "response.output_text.delta")
    assert said + deltas == expected_text("background", WORDS)
    async with second.responses.stream(response_id=response_id, starting_after=last) as helper:
        again = [e async for e in helper]
        final = await helper.get_final_response()
    assert sequence_numbers(again) == sequence_numbers(rest)
    assert final.output_text == expected_text("background", WORDS)
    assert (await first.responses.retrieve(response_id)).output_text == final.output_text
    await first.close()
    await second.close()


def resume_as_the_readme_does(client: openai.OpenAI, last_chunk: ChatCompletionChunk) -> str:
    """README, "The OpenAI front door", Resume: the SDK alone, its own client and stream class."""
    where = (last_chunk.model_extra or {})["streambridge"]
    rest = client.get(
        f"/chat/completions/{where['chat_id']}/stream",
        options={"params": {"after": where["cursor"]}},
        cast_to=ChatCompletionChunk,
        stream=True,
        stream_cls=openai.Stream[ChatCompletionChunk],
    )
    return "".join(chunk.choices[0].delta.content or "" for chunk in rest if chunk.choices)


async def test_the_readmes_sdk_only_resume_continues_on_the_other_edge_exactly(system: System) -> None:
    async with aiohttp.ClientSession() as session:
        key = (await login(session, system.api.url))["Authorization"].removeprefix("Bearer ")
    first = openai.AsyncOpenAI(base_url=f"{system.edges[0].url}/v1", api_key=key)
    stream = await first.chat.completions.create(
        model=SLOW, messages=[{"role": "user", "content": "sdk only"}], stream=True
    )
    seen: list[str] = []
    async for chunk in stream:
        seen.append(chunk.choices[0].delta.content or "")
        if len(seen) == 10:
            break
    await stream.close()  # the connection drops mid-answer
    await first.close()
    with openai.OpenAI(base_url=f"{system.edges[1].url}/v1", api_key=key) as second:
        rest = await asyncio.to_thread(resume_as_the_readme_does, second, chunk)
    assert "".join(seen) + rest == expected_text("sdk only", WORDS)


LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look something up.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}


async def test_the_sdks_other_calls_work_unchanged_against_real_processes(system: System) -> None:
    async with aiohttp.ClientSession() as session:
        key = (await login(session, system.api.url))["Authorization"].removeprefix("Bearer ")
    sdk = openai.AsyncOpenAI(base_url=f"{system.edges[0].url}/v1", api_key=key, max_retries=0)
    try:
        assert [m.id async for m in sdk.models.list()]  # the upstream's list
        ask = [{"role": "user", "content": "e2e tool"}]
        async with sdk.chat.completions.stream(model="fake", messages=ask, tools=[LOOKUP]) as stream:  # type: ignore[arg-type,list-item]
            final = await stream.get_final_completion()
        assert final.choices[0].finish_reason == "tool_calls"
        calls = final.choices[0].message.tool_calls or []
        assert [c.function.arguments for c in calls] == [expected_tool_call("e2e tool", "lookup").function.arguments]

        chunks = await sdk.chat.completions.create(
            model="fake?reasoning=4&words=6",
            messages=[{"role": "user", "content": "e2e think"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        reasoning, text, usage = "", "", None
        async for chunk in chunks:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
                text += choice.delta.content or ""
        assert (reasoning, text) == (expected_reasoning("e2e think", 4), expected_text("e2e think", 6))
        assert usage is not None

        schema = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}
        whole = await sdk.chat.completions.create(
            model="fake?words=3",
            messages=[{"role": "user", "content": "e2e schema"}],
            response_format=schema,  # type: ignore[arg-type]
        )
        assert whole.choices[0].message.content == expected_text("e2e schema", 3)
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.chat.completions.create(model="fake", messages=[{"role": "user", "content": "two"}], n=2)
        assert refused.value.param == "n"

        background = await sdk.responses.create(model=SLOW, input="e2e cancel me", background=True)
        assert (await sdk.responses.cancel(background.id)).status == "cancelled"
        assert (await sdk.responses.cancel(background.id)).status == "cancelled"  # idempotent
        done = await sdk.responses.create(model="fake?words=3", input="e2e done")
        assert (done.status, done.output_text) == ("completed", expected_text("e2e done", 3))
        with pytest.raises(openai.BadRequestError):
            await sdk.responses.cancel(done.id)  # a completed response
    finally:
        await sdk.close()
    stranger = openai.AsyncOpenAI(base_url=f"{system.edges[1].url}/v1", api_key="sbk_nope_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await stranger.models.list()
    await stranger.close()
