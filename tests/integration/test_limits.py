"""Abuse limits: an oversized prompt or max_tokens is refused (422); too many chats a minute get
429 with Retry-After, counted in Redis so every API process shares the count."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from api.app import make_app
from api.limits import count_chat
from shared.errors import RateLimited
from shared.settings import Settings
from tests.integration.conftest import bearer, json_of


@pytest.fixture
async def strict(settings: Settings) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    limits = msgspec.structs.replace(
        settings, max_messages=3, max_prompt_chars=100, max_tokens_cap=50, chats_per_minute=2
    )
    async with TestClient(TestServer(make_app(limits))) as client:
        yield client


async def visitor(client: TestClient) -> str:  # type: ignore[type-arg]
    return str((await (await client.post("/v1/auth/visitor")).json())["token"])


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"messages": [{"role": "user", "content": "x"}] * 4}, "at most 3 messages"),
        ({"message": "x" * 101}, "at most 100 characters"),
        ({"message": "hi", "max_tokens": 51}, "max_tokens may be at most 50"),
    ],
)
async def test_an_oversized_chat_is_refused(strict: TestClient, body: object, words: str) -> None:  # type: ignore[type-arg]
    response = await strict.post("/v1/chats", json=body, headers=bearer(await visitor(strict)))
    assert response.status == 422
    assert words in json_of(await response.read())["error"]["message"]  # type: ignore[index]


async def test_too_many_chats_a_minute_get_429_with_retry_after(strict: TestClient) -> None:  # type: ignore[type-arg]
    token = await visitor(strict)
    for _ in range(2):
        assert (await strict.post("/v1/chats", json={"message": "hi"}, headers=bearer(token))).status == 202
    response = await strict.post("/v1/chats", json={"message": "hi"}, headers=bearer(token))
    assert response.status == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert json_of(await response.read())["error"]["code"] == "rate_limited"  # type: ignore[index]
    other = await visitor(strict)
    assert (await strict.post("/v1/chats", json={"message": "hi"}, headers=bearer(other))).status == 202


async def test_the_count_is_shared_and_resets_with_the_minute(real_redis: Redis, settings: Settings) -> None:
    limited = msgspec.structs.replace(settings, chats_per_minute=1)
    await count_chat(real_redis, "u", limited, now=600.0)  # one API process
    with pytest.raises(RateLimited) as caught:
        await count_chat(real_redis, "u", limited, now=630.5)  # another, later in the same minute
    assert caught.value.retry_after == 30
    await count_chat(real_redis, "u", limited, now=660.0)  # the next minute
