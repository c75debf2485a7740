"""Who may do what: every route without a token, with a wrong, expired or revoked one, and with
another user's chat; stream tokens forged, expired, revoked or for another chat. The API and edge
run in-process on a real Redis; every refusal must be the documented JSON error, never a 5xx."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from streambridge.api.app import make_app
from streambridge.api.auth import sign_stream_token
from streambridge.api.context import CONTEXT
from streambridge.api.credentials import credential_id, issue, revoke
from streambridge.shared import keys
from streambridge.shared.settings import Settings

Client = TestClient  # type: ignore[type-arg]

CHAT_ROUTES = [
    ("GET", "/v1/chats/{id}"),
    ("POST", "/v1/chats/{id}/cancel"),
    ("GET", "/v1/chats/{id}/events"),
]


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, heartbeat_interval=0.2, max_body_bytes=64 * 1024)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with TestClient(TestServer(make_app(settings))) as client:
        yield client


@pytest.fixture
async def redis(client: Client) -> Redis:
    return client.app[CONTEXT].redis


async def visitor(client: Client) -> str:
    return str((await (await client.post("/v1/auth/visitor")).json())["token"])


async def new_chat(client: Client, token: str) -> dict[str, str]:
    response = await client.post("/v1/chats", json={"message": "hi"}, headers=bearer(token))
    assert response.status == 202
    body: dict[str, str] = await response.json()
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def refused(client: Client, method: str, path: str, status: int, code: str, **kwargs: object) -> None:
    response = await client.request(method, path, **kwargs)  # type: ignore[arg-type]
    assert response.status == status, (method, path, await response.text())
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]


def path_of(stream_url: str) -> str:
    return stream_url[stream_url.index("/v1/") :]


async def test_every_route_without_a_token_is_401(client: Client) -> None:
    chat_id = secrets.token_hex(16)
    await refused(client, "POST", "/v1/chats", 401, "unauthorized", json={"message": "hi"})
    for method, route in CHAT_ROUTES:
        await refused(client, method, route.format(id=chat_id), 401, "unauthorized")


@pytest.mark.parametrize(
    "token",
    [
        "nonsense",
        "sbv_" + "0" * 16 + "_" + "A" * 43,  # well-formed, never issued
        "sbk_" + "0" * 16 + "_" + "A" * 43,
        "sbv_abc",
        "Bearer",
        "sbv_" + "0" * 16 + "_" + "A" * 43 + "\u00e9",
    ],
)
async def test_every_route_with_a_wrong_token_is_401(client: Client, token: str) -> None:
    mine = await new_chat(client, await visitor(client))
    await refused(client, "POST", "/v1/chats", 401, "unauthorized", json={"message": "hi"}, headers=bearer(token))
    for method, route in CHAT_ROUTES:
        await refused(client, method, route.format(id=mine["id"]), 401, "unauthorized", headers=bearer(token))


async def test_a_token_with_a_right_id_but_a_wrong_secret_is_401(client: Client) -> None:
    token = await visitor(client)
    prefix, credential, _ = token[:4], token[4:20], token[21:]
    guessed = f"{prefix}{credential}_{'A' * 43}"
    await refused(client, "POST", "/v1/chats", 401, "unauthorized", json={"message": "hi"}, headers=bearer(guessed))
    as_key = "sbk_" + token[4:]  # the visitor's secret presented as an API key
    await refused(client, "POST", "/v1/chats", 401, "unauthorized", json={"message": "hi"}, headers=bearer(as_key))


async def test_an_expired_visitor_token_is_401_on_every_route(client: Client, redis: Redis) -> None:
    token = await visitor(client)
    chat = await new_chat(client, token)
    await redis.delete(keys.credential(token[4:20]))  # as Redis does when its visitor_token_ttl runs out
    await refused(client, "POST", "/v1/chats", 401, "unauthorized", json={"message": "hi"}, headers=bearer(token))
    for method, route in CHAT_ROUTES:
        await refused(client, method, route.format(id=chat["id"]), 401, "unauthorized", headers=bearer(token))
    await refused(client, "GET", path_of(chat["stream_url"]), 401, "unauthorized")


async def test_a_revoked_key_and_its_stream_urls_stop_working_at_once(client: Client, redis: Redis) -> None:
    key, credential = await issue(redis, "acme", "key")
    chat = await new_chat(client, key)
    response = await client.get(path_of(chat["stream_url"]))
    assert response.status == 200
    response.close()
    assert await revoke(redis, credential.id)
    await refused(client, "POST", "/v1/chats", 401, "unauthorized", json={"message": "hi"}, headers=bearer(key))
    for method, route in CHAT_ROUTES:
        await refused(client, method, route.format(id=chat["id"]), 401, "unauthorized", headers=bearer(key))
    await refused(client, "GET", path_of(chat["stream_url"]), 401, "unauthorized")
    assert not await revoke(redis, credential.id), "revoking twice finds nothing"


async def test_a_remembered_credential_is_not_read_again_yet_its_revocation_holds_at_once(
    client: Client, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, credential = await issue(redis, "acme", "key")
    await new_chat(client, key)  # read once, and remembered
    reads: list[object] = []
    get = redis.get

    def counted_get(name: str) -> object:
        reads.append(name)
        return get(name)

    monkeypatch.setattr(redis, "get", counted_get)
    await new_chat(client, key)
    assert reads == [], "admitted in one round trip: the credential's existence checked inside it"
    await revoke(redis, credential.id)
    await refused(client, "POST", "/v1/chats", 401, "unauthorized", json={"message": "hi"}, headers=bearer(key))
    assert credential.id not in client.app[CONTEXT].credentials, "a revoked credential is forgotten"
    assert await redis.zcard(keys.active("acme")) == 2, "the refused chat counts for nothing"


async def test_a_stream_refused_after_the_edge_took_its_slot_gives_the_slot_back(client: Client, redis: Redis) -> None:
    # A credential the edge has seen takes its stream slot in the same round trip as the checks'
    # reads: every refusal after that must give the slot back, or refusals would use up the limit.
    alice = await visitor(client)
    own = await new_chat(client, alice)
    response = await client.get(path_of(own["stream_url"]))
    assert response.status == 200
    response.close()
    identity = client.app[CONTEXT].credentials[str(credential_id(alice))].identity
    assert await no_open_streams(redis, identity.user)
    someone_elses = await new_chat(client, await visitor(client))
    await refused(client, "GET", f"/v1/chats/{someone_elses['id']}/events", 404, "not_found", headers=bearer(alice))
    ahead = {"Last-Event-ID": "99999999999999-0"}
    await refused(client, "GET", path_of(own["stream_url"]), 400, "bad_last_event_id", headers=ahead)
    assert await no_open_streams(redis, identity.user)
    await revoke(redis, str(credential_id(alice)))
    await refused(client, "GET", path_of(own["stream_url"]), 401, "unauthorized")
    assert await no_open_streams(redis, identity.user)


async def test_a_known_credential_opens_its_stream_after_redis_forgets_the_slot_script(
    client: Client, redis: Redis
) -> None:
    alice = await visitor(client)
    chat = await new_chat(client, alice)
    for forget in (False, True):
        if forget:
            await redis.script_flush()  # as after a Redis restart
        response = await client.get(path_of(chat["stream_url"]))
        assert response.status == 200, await response.text()
        response.close()


async def test_a_forged_bearer_of_a_credential_the_edge_knows_never_takes_a_stream_slot(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The id in a token is public (stream URLs carry it); only the secret's holder may spend the
    # user's open streams, or forged requests could keep the owner at 429.
    alice = await visitor(client)
    chat = await new_chat(client, alice)
    response = await client.get(path_of(chat["stream_url"]))  # the edge now knows alice's credential
    assert response.status == 200
    slots = client.app[CONTEXT].slots
    assert slots is not None
    asked: list[object] = []
    real_ask = slots.ask
    monkeypatch.setattr(slots, "ask", lambda *args: asked.append(args) or real_ask(*args))
    forged = f"sbv_{credential_id(alice)}_{'A' * 43}"
    await refused(client, "GET", f"/v1/chats/{chat['id']}/events", 401, "unauthorized", headers=bearer(forged))
    assert asked == []
    again = await client.get(f"/v1/chats/{chat['id']}/events", headers=bearer(alice))
    assert again.status == 200
    assert len(asked) == 1, "the genuine bearer takes its slot with the reads"
    again.close()
    response.close()


async def no_open_streams(redis: Redis, user: str) -> bool:
    """True once the user holds no stream slot (a closed stream's handler lets go of it soon)."""
    for _ in range(100):
        if await redis.zcard(keys.user_streams(user)) == 0:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_another_users_chat_is_404_on_every_route(client: Client, redis: Redis) -> None:
    alice = await visitor(client)
    bob_key, _ = await issue(redis, "bob", "key")
    for owner, intruder in [(alice, bob_key), (bob_key, alice), (alice, await visitor(client))]:
        chat = await new_chat(client, owner)
        for method, route in CHAT_ROUTES:
            await refused(client, method, route.format(id=chat["id"]), 404, "not_found", headers=bearer(intruder))
        stream = f"/v1/chats/{chat['id']}/events?token={chat['stream_url'].split('token=')[1]}"
        await refused(client, "GET", stream, 404, "not_found", headers=bearer(intruder))  # the bearer is who asks


async def test_an_unknown_chat_is_404_like_another_users(client: Client) -> None:
    token = await visitor(client)
    for method, route in CHAT_ROUTES:
        await refused(client, method, route.format(id=secrets.token_hex(16)), 404, "not_found", headers=bearer(token))


async def test_a_stream_token_opens_only_its_own_chat(client: Client) -> None:
    token = await visitor(client)
    first, second = await new_chat(client, token), await new_chat(client, token)
    first_token = first["stream_url"].split("token=")[1]
    await refused(client, "GET", f"/v1/chats/{second['id']}/events?token={first_token}", 401, "unauthorized")


async def test_forged_and_expired_stream_tokens_are_401(client: Client) -> None:
    token = await visitor(client)
    chat = await new_chat(client, token)
    credential = token[4:20]
    secret = client.app[CONTEXT].secret
    expired = sign_stream_token(secret, chat["id"], credential, ttl=-1)
    other_key = sign_stream_token(b"not the deployment's secret", chat["id"], credential, ttl=60)
    genuine = chat["stream_url"].split("token=")[1]
    expires, _, signature = genuine.split(".")
    for forged in [
        expired,
        other_key,
        f"{int(expires) + 86400}.{credential}.{signature}",  # a longer life
        f"{expires}.{'f' * 16}.{signature}",  # another credential
        "",
        "x" * 5000,
        "1.2.3",
        token,  # the user's own bearer token is not a stream token
    ]:
        await refused(client, "GET", f"/v1/chats/{chat['id']}/events", 401, "unauthorized", params={"token": forged})


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b"{", {"Content-Type": "application/json"}, 400, "malformed_json"),
        (b"\xff\xfe", {}, 400, "malformed_json"),
        (b"[]", {}, 422, "invalid_request"),
        (b'{"message": ""}', {}, 422, "invalid_request"),
        (b'{"message": "hi", "admin": true}', {}, 422, "invalid_request"),
        (b'{"messages": [{"role": "root", "content": "x"}]}', {}, 422, "invalid_request"),
        (b'{"message": "hi", "max_tokens": -1}', {}, 422, "invalid_request"),
        (b'{"message": "' + b"x" * (100 * 1024) + b'"}', {}, 413, "payload_too_large"),  # over max_body_bytes
    ],
)
async def test_malformed_and_oversized_bodies_get_their_4xx(
    client: Client, body: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    token = await visitor(client)
    await refused(client, "POST", "/v1/chats", status, code, data=body, headers={**bearer(token), **headers})


async def test_nothing_secret_is_stored_in_redis(client: Client, redis: Redis) -> None:
    token = await visitor(client)
    key, _ = await issue(redis, "acme", "key")
    await new_chat(client, token)
    dump = b"".join(
        [k + b"=" + repr(await redis.dump(k)).encode() for k in await redis.keys("*")]  # every key and value
    )
    for secret in (token, key):
        # sb?_<id>_<secret>: the secret may hold "_" itself, so it is all after the second one
        assert secret.split("_", 2)[2].encode() not in dump
