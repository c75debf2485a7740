"""The front door's waits count as open streams: a create that waits for its answer holds a
connection and a feed as long as a stream does, so the per-user stream limit covers it."""

from __future__ import annotations

import asyncio

import msgspec
import openai
import pytest
from redis.asyncio import Redis

from streambridge.shared import keys
from streambridge.shared.settings import Settings
from tests.integration.conftest import settings as base_settings  # noqa: F401
from tests.integration.test_completions import base_url, sdk  # noqa: F401  (the fixtures)

SLOW = "fake?words=20&delay_ms=40"  # about 0.8 s


@pytest.fixture
def settings(base_settings: Settings) -> Settings:  # noqa: F811
    return msgspec.structs.replace(base_settings, visitor_max_open_streams=1)


@pytest.mark.parametrize("api", ["chat.completions", "responses"])
async def test_a_waiting_create_holds_a_stream_slot_until_it_answers(
    sdk: openai.AsyncOpenAI,  # noqa: F811
    redis_url: str,
    api: str,
) -> None:
    async def ask(prompt: str) -> object:
        if api == "responses":
            return await sdk.responses.create(model=SLOW, input=prompt)
        return await sdk.chat.completions.create(model=SLOW, messages=[{"role": "user", "content": prompt}])

    first = asyncio.create_task(ask("first"))
    async with Redis.from_url(redis_url) as redis, asyncio.timeout(10):
        while not await redis.keys(keys.user_streams("*")):  # the first is waiting for its answer
            await asyncio.sleep(0.01)
    with pytest.raises(openai.RateLimitError, match="stream"):
        await ask("second")
    await first
    await ask("third")  # the first gave its slot back
