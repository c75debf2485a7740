"""``POST /v1/chats`` with an ``Idempotency-Key``: a client that retries after a lost answer (the
openai SDK does, by itself) gets the chat it already made, never a second one."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from streambridge.shared import keys
from tests.integration.conftest import bearer, json_of

Client = TestClient  # type: ignore[type-arg]


async def post(
    client: Client, token: str, key: str, message: str = "hi"
) -> tuple[int, dict[str, object], dict[str, str]]:
    response = await client.post(
        "/v1/chats", json={"message": message}, headers={**bearer(token), "Idempotency-Key": key}
    )
    return response.status, json_of(await response.read()), dict(response.headers)


async def visitor(client: Client) -> str:
    return str((await (await client.post("/v1/auth/visitor")).json())["token"])


async def test_the_same_key_twice_returns_the_first_chat_and_queues_one_job(
    client: Client, token: str, real_redis: Redis
) -> None:
    status, first, headers = await post(client, token, "order-42")
    assert status == 202
    assert "Idempotent-Replayed" not in headers
    status, again, headers = await post(client, token, "order-42")
    assert status == 202
    # the same chat; its stream_url carries a stream token signed afresh (its expiry may be a second on)
    assert {**again, "stream_url": ""} == {**first, "stream_url": ""}
    assert str(again["stream_url"]).split("?token=")[0] == str(first["stream_url"]).split("?token=")[0]
    assert headers["Idempotent-Replayed"] == "true"
    assert await real_redis.zrange(keys.queue(), 0, -1) == [str(first["id"]).encode()], "one chat, one job"


async def test_the_same_key_for_a_different_request_is_refused(client: Client, token: str) -> None:
    assert (await post(client, token, "order-43", "first question"))[0] == 202
    status, body, _ = await post(client, token, "order-43", "another question")
    assert status == 422
    assert body["error"]["code"] == "idempotency_key_reused"  # type: ignore[index]


async def test_keys_are_per_user(client: Client, token: str) -> None:
    _, mine, _ = await post(client, token, "shared-key")
    _, theirs, headers = await post(client, await visitor(client), "shared-key")
    assert mine["id"] != theirs["id"]
    assert "Idempotent-Replayed" not in headers


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "caf\u00e9"])
async def test_a_malformed_key_is_a_400(client: Client, token: str, key: str) -> None:
    response = await client.post(
        "/v1/chats",
        json={"message": "hi"},
        headers={**bearer(token), "Idempotency-Key": key.encode().decode("latin-1")},
    )
    assert response.status == 400
    assert json_of(await response.read())["error"]["code"] == "bad_idempotency_key"  # type: ignore[index]
