"""Bad input gets the contract's JSON error with the right status: never HTML, never a traceback."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient

from streambridge.shared import keys
from streambridge.shared.events import Content, Event, Started, encode_event, event_type
from streambridge.sse import SSEMessage, SSEParser
from tests.integration.conftest import RunWorker, bearer, json_of

CHAT_ROUTES = [("GET", "/v1/chats/{id}"), ("POST", "/v1/chats/{id}/cancel"), ("GET", "/v1/chats/{id}/events")]


async def error_of(response: object, status: int, code: str) -> str:
    from aiohttp import ClientResponse

    assert isinstance(response, ClientResponse)
    raw = await response.read()
    assert response.status == status, raw
    assert response.content_type == "application/json"
    body = json_of(raw)
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"code", "message", "type", "param"}
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    return error["message"]


async def new_chat(client: TestClient, token: str) -> str:  # type: ignore[type-arg]
    response = await client.post("/v1/chats", json={"message": "hi"}, headers=bearer(token))
    return str((await response.json())["id"])


async def test_health_is_ok(client: TestClient) -> None:  # type: ignore[type-arg]
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_unknown_route_is_a_json_404(client: TestClient) -> None:  # type: ignore[type-arg]
    await error_of(await client.get("/v1/nothing/here"), 404, "not_found")


async def test_wrong_method_is_a_json_405_with_allow(client: TestClient) -> None:  # type: ignore[type-arg]
    response = await client.delete("/v1/chats")
    assert "POST" in response.headers["Allow"]
    await error_of(response, 405, "method_not_allowed")


@pytest.mark.parametrize(
    "body",
    [b"{", b"not json", b"\xff\xfe", b""],
    ids=["truncated", "text", "binary", "empty"],
)
async def test_malformed_json_is_400(client: TestClient, token: str, body: bytes) -> None:  # type: ignore[type-arg]
    await error_of(await client.post("/v1/chats", data=body, headers=bearer(token)), 400, "malformed_json")


@pytest.mark.parametrize(
    "body",
    [
        [],
        {},
        {"message": ""},
        {"message": 5},
        {"messages": []},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user"}]},
        {"message": "x", "messages": [{"role": "user", "content": "x"}]},
        {"message": "x", "temperature": 3},
        {"message": "x", "max_tokens": 0},
        {"message": "x", "not a field name": 1},  # any other name is a vendor's field, for the upstream
        {"message": "x", "n": 2},
        {"message": "x", "stream": "yes"},
        {"message": "x", "stream_options": {"include_usage": 1}},
    ],
)
async def test_valid_json_of_the_wrong_shape_is_422(client: TestClient, token: str, body: object) -> None:  # type: ignore[type-arg]
    await error_of(await client.post("/v1/chats", json=body, headers=bearer(token)), 422, "invalid_request")


async def test_a_body_over_the_limit_is_413(client: TestClient, token: str) -> None:  # type: ignore[type-arg]
    body = {"message": "x" * (70 * 1024)}
    await error_of(await client.post("/v1/chats", json=body, headers=bearer(token)), 413, "payload_too_large")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}])
async def test_every_route_needs_a_valid_token(client: TestClient, token: str, headers: dict[str, str]) -> None:  # type: ignore[type-arg]
    chat_id = await new_chat(client, token)
    await error_of(await client.post("/v1/chats", json={"message": "x"}, headers=headers), 401, "unauthorized")
    for method, route in CHAT_ROUTES:
        response = await client.request(method, route.format(id=chat_id), headers=headers)
        await error_of(response, 401, "unauthorized")


async def test_another_users_chat_is_404_on_every_route(client: TestClient, token: str) -> None:  # type: ignore[type-arg]
    chat_id = await new_chat(client, token)
    other = (await (await client.post("/v1/auth/visitor")).json())["token"]
    for method, route in CHAT_ROUTES:
        await error_of(await client.request(method, route.format(id=chat_id), headers=bearer(other)), 404, "not_found")
    for method, route in CHAT_ROUTES:
        missing = route.format(id="0" * 32)
        await error_of(await client.request(method, missing, headers=bearer(token)), 404, "not_found")


async def test_a_stream_token_opens_only_its_own_chat(client: TestClient, token: str) -> None:  # type: ignore[type-arg]
    first = await (await client.post("/v1/chats", json={"message": "a"}, headers=bearer(token))).json()
    second = await new_chat(client, token)
    stream_token = first["stream_url"].split("token=", 1)[1]
    response = await client.get(f"/v1/chats/{second}/events", params={"token": stream_token})
    await error_of(response, 401, "unauthorized")
    forged = stream_token[:-2] + ("AA" if not stream_token.endswith("AA") else "BB")
    await error_of(await client.get(f"/v1/chats/{first['id']}/events", params={"token": forged}), 401, "unauthorized")


@pytest.mark.parametrize("value", ["bogus", "1-", "-1", "1-2-3", "12 3", "1732400000000-0x"])
async def test_a_bad_last_event_id_is_400(client: TestClient, token: str, value: str) -> None:  # type: ignore[type-arg]
    chat_id = await new_chat(client, token)
    path = f"/v1/chats/{chat_id}/events"
    await error_of(await client.get(path, headers={**bearer(token), "Last-Event-ID": value}), 400, "bad_last_event_id")
    await error_of(
        await client.get(path, params={"last_event_id": value}, headers=bearer(token)), 400, "bad_last_event_id"
    )


async def test_an_expired_stream_is_410_and_the_result_stays_readable(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
) -> None:
    chat_id = await new_chat(client, token)
    await run_worker()
    redis = client.server.app  # the app's own Redis connection
    from streambridge.api.context import CONTEXT

    await redis[CONTEXT].redis.delete(keys.events(chat_id))  # what the stream's expiry does
    message = await error_of(
        await client.get(f"/v1/chats/{chat_id}/events", headers=bearer(token)), 410, "stream_expired"
    )
    assert f"/v1/chats/{chat_id}" in message
    result = await (await client.get(f"/v1/chats/{chat_id}", headers=bearer(token))).json()
    assert result["status"] == "complete"
    assert result["content"]


async def test_the_stream_expires_after_the_chat_ends(client: TestClient, token: str, run_worker: RunWorker) -> None:  # type: ignore[type-arg]
    chat_id = await new_chat(client, token)
    await run_worker()
    from streambridge.api.context import CONTEXT

    redis = client.server.app[CONTEXT].redis
    settings = client.server.app[CONTEXT].settings
    assert 0 < await redis.ttl(keys.events(chat_id)) <= settings.stream_ttl
    assert settings.stream_ttl < await redis.ttl(keys.chat(chat_id)) <= settings.result_ttl
    assert not await redis.exists(keys.lease(chat_id))


async def test_a_position_older_than_the_stream_holds_is_410_never_a_silent_gap(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
) -> None:
    chat_id = await new_chat(client, token)
    await run_worker()
    from streambridge.api.context import CONTEXT

    redis = client.server.app[CONTEXT].redis
    entries = await redis.xrange(keys.events(chat_id))
    await redis.xtrim(keys.events(chat_id), maxlen=3, approximate=False)  # what the length cap does
    path = f"/v1/chats/{chat_id}/events"
    old = entries[2][0].decode()
    message = await error_of(
        await client.get(path, headers={**bearer(token), "Last-Event-ID": old}), 410, "stream_expired"
    )
    assert "trimmed" in message
    await error_of(await client.get(path, headers=bearer(token)), 410, "stream_expired")
    still_held = entries[-3][0].decode()
    response = await client.get(path, headers={**bearer(token), "Last-Event-ID": still_held})
    assert response.status == 200
    assert (await response.read()).count(b"\nevent: ") == 2


@pytest.mark.parametrize(
    "value",
    ["99999999999999999999-99999999999999999999", "18446744073709551616-0", "１-0", "١-0"],
    ids=["beyond-u64", "u64-plus-one", "fullwidth-digit", "arabic-digit"],
)
async def test_ids_redis_cannot_hold_are_400_before_the_stream_starts(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    value: str,
) -> None:
    chat_id = await new_chat(client, token)
    path = f"/v1/chats/{chat_id}/events"
    await error_of(
        await client.get(path, params={"last_event_id": value}, headers=bearer(token)), 400, "bad_last_event_id"
    )


async def test_a_position_the_stream_never_reached_is_400_not_an_endless_wait(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
) -> None:
    queued = await new_chat(client, token)
    ahead = {**bearer(token), "Last-Event-ID": "99999999999999-0"}
    await error_of(await client.get(f"/v1/chats/{queued}/events", headers=ahead), 400, "bad_last_event_id")
    await run_worker()
    await error_of(await client.get(f"/v1/chats/{queued}/events", headers=ahead), 400, "bad_last_event_id")


async def test_a_body_that_is_not_utf8_is_400(client: TestClient, token: str) -> None:  # type: ignore[type-arg]
    body = b'{"message": "\xff\xfe"}'
    await error_of(await client.post("/v1/chats", data=body, headers=bearer(token)), 400, "malformed_json")


async def test_a_token_of_odd_bytes_is_401_not_500(client: TestClient, token: str) -> None:  # type: ignore[type-arg]
    chat_id = await new_chat(client, token)
    for odd in ["Bearer \udcff\udcfe", "Bearer é"]:
        response = await client.get(
            f"/v1/chats/{chat_id}", headers={"Authorization": odd.encode("utf-8", "surrogateescape").decode("latin-1")}
        )
        await error_of(response, 401, "unauthorized")
    for forged in ["².x", "99999999999.é", "9" * 5000 + ".x", "1.", ".", "x" * 10]:
        response = await client.get(f"/v1/chats/{chat_id}/events", params={"token": forged})
        await error_of(response, 401, "unauthorized")


@pytest.mark.parametrize("chat_id", ["abc:events", "0" * 31 + ":", "../secret", "A" * 32])
async def test_a_path_id_not_shaped_like_a_chat_id_is_404(client: TestClient, token: str, chat_id: str) -> None:  # type: ignore[type-arg]
    for method, route in CHAT_ROUTES:
        await error_of(await client.request(method, route.format(id=chat_id), headers=bearer(token)), 404, "not_found")


async def test_after_redis_loses_the_signing_key_processes_converge_on_one(client: TestClient, token: str) -> None:  # type: ignore[type-arg]
    from streambridge.api.auth import load_secret, sign_stream_token
    from streambridge.api.context import CONTEXT

    ctx = client.server.app[CONTEXT]
    chat_id = await new_chat(client, token)
    # Redis lost its data and a newer process put its own key there; it signs the next stream_url
    await ctx.redis.set(keys.secret(), b"a-key-from-a-process-started-after-the-loss")
    credential = token.split("_")[1]
    newer = sign_stream_token(b"a-key-from-a-process-started-after-the-loss", chat_id, credential, ttl=60)
    response = await client.get(f"/v1/chats/{chat_id}/events", params={"token": newer})
    assert response.status == 200  # this edge re-read the key instead of refusing a valid token
    response.close()
    # when Redis has no key at all, a process offers the one it uses instead of minting another
    await ctx.redis.delete(keys.secret())
    assert await load_secret(ctx.redis, None, ctx.secret) == ctx.secret
    assert await ctx.redis.get(keys.secret()) == ctx.secret


async def test_a_live_reader_whose_next_event_was_trimmed_is_told_and_its_resume_is_410(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
) -> None:
    from streambridge.api.context import CONTEXT

    chat_id = await new_chat(client, token)
    redis = client.server.app[CONTEXT].redis
    stream = keys.events(chat_id)

    async def add(event: Event) -> None:  # appended, but never announced: as during a feed outage
        await redis.xadd(stream, {"type": event_type(event), "data": encode_event(event)})

    await add(Started(attempt=1, model="m"))
    await add(Content(content="a", index=1, attempt=1))
    path = f"/v1/chats/{chat_id}/events"
    response = await client.get(path, headers=bearer(token))
    parser, received = SSEParser(), list[SSEMessage]()
    async with asyncio.timeout(10):
        while len(received) < 2:
            received += parser.feed(await response.content.readany())
        for n in range(2, 12):
            await add(Content(content="b", index=n, attempt=1))
        await redis.xtrim(stream, maxlen=3, approximate=False)  # the length cap, while the feed is down
        db = str(redis.connection_pool.connection_kwargs["db"])
        (feed,) = [c["id"] for c in await redis.client_list() if "P" in c["flags"] and c["db"] == db]  # the hub's
        await redis.client_kill_filter(_id=feed)  # its reconnect makes every reader re-read the stream
        rest = await response.content.read()
    assert rest.endswith(b": trimmed; reconnect with Last-Event-ID\n\n")
    assert parser.feed(rest) == [], "no event after the gap"
    headers = {**bearer(token), "Last-Event-ID": received[-1].id}
    assert "trimmed" in await error_of(await client.get(path, headers=headers), 410, "stream_expired")


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/v1/batches?limit=6&limit=500", "limit"),
        ("/v1/files?after=a&order=asc&after=b", "after"),
        ("/v1/chats/0123456789abcdef0123456789abcdef/events?last_event_id=1-0&last_event_id=2-0", "last_event_id"),
    ],
)
async def test_a_query_parameter_given_twice_is_400_naming_it(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    path: str,
    name: str,
) -> None:
    response = await client.get(path, headers={"Authorization": f"Bearer {token}"})
    assert response.status == 400
    error = (await response.json())["error"]
    assert (error["code"], error["param"]) == ("invalid_request", name)
    assert f"`{name}` given more than once" in error["message"]


async def test_an_array_query_parameter_may_repeat(client: TestClient, token: str) -> None:  # type: ignore[type-arg]
    path = "/v1/responses/resp_0123456789abcdef0123456789abcdef?include=a&include=b"
    response = await client.get(path, headers={"Authorization": f"Bearer {token}"})
    assert response.status != 400 or (await response.json())["error"]["param"] != "include"
