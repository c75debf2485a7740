"""Abuse limits: prompt caps (422); chats a minute, chats queued or running and open streams per
user and per address (429 with Retry-After); a queue too deep (503 with Retry-After). Every count
lives in Redis, so every API and edge process shares it; a refused request counts for nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from streambridge.api.app import make_app
from streambridge.api.credentials import Credential, Identity, Limits, issue, quota
from streambridge.api.limits import admit_chat
from streambridge.api.slots import StreamSlots
from streambridge.shared import keys
from streambridge.shared.chats import decode_request
from streambridge.shared.errors import Overloaded, RateLimited
from streambridge.shared.settings import Settings
from streambridge.workers.worker import make_worker
from tests.integration.conftest import RunWorker, bearer, json_of

Client = TestClient  # type: ignore[type-arg]


@pytest.fixture
def strict_settings(settings: Settings) -> Settings:
    return msgspec.structs.replace(
        settings,
        max_messages=3,
        max_prompt_chars=100,
        max_tokens_cap=50,
        visitor_chats_per_minute=100,
        visitor_max_running_chats=2,
        visitor_max_open_streams=2,
        max_open_streams_per_ip=3,
        heartbeat_interval=5.0,
    )


@pytest.fixture
async def strict(strict_settings: Settings) -> AsyncIterator[Client]:
    async with TestClient(TestServer(make_app(strict_settings))) as client:
        yield client


async def visitor(client: Client) -> str:
    return str((await (await client.post("/v1/auth/visitor")).json())["token"])


async def create(client: Client, token: str) -> tuple[int, dict[str, object], dict[str, str]]:
    response = await client.post("/v1/chats", json={"message": "hi"}, headers=bearer(token))
    return response.status, json_of(await response.read()), dict(response.headers)


def error_code(body: dict[str, object]) -> object:
    error = body["error"]
    assert isinstance(error, dict)
    return error["code"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"messages": [{"role": "user", "content": "x"}] * 4}, "at most 3 messages"),
        ({"message": "x" * 101}, "at most 100 characters"),
        ({"message": "hi", "max_tokens": 51}, "max_tokens may be at most 50"),
    ],
)
async def test_an_oversized_chat_is_refused(strict: Client, body: object, words: str) -> None:
    response = await strict.post("/v1/chats", json=body, headers=bearer(await visitor(strict)))
    assert response.status == 422
    assert words in json_of(await response.read())["error"]["message"]  # type: ignore[index]


async def test_too_many_running_chats_get_429_until_one_ends(strict: Client, run_worker: RunWorker) -> None:
    token = await visitor(strict)
    first = [await create(strict, token) for _ in range(2)]
    assert [status for status, _, _ in first] == [202, 202]
    status, body, headers = await create(strict, token)
    assert (status, error_code(body)) == (429, "too_many_chats")
    assert int(headers["Retry-After"]) >= 1
    other = await visitor(strict)
    assert (await create(strict, other))[0] == 202, "one user's limit is not another's"
    # Cancelling a queued chat frees its place at once.
    cancel = await strict.post(f"/v1/chats/{first[0][1]['id']}/cancel", headers=bearer(token))
    assert cancel.status == 202
    assert (await create(strict, token))[0] == 202


async def test_a_finished_chat_stops_counting_as_running(
    strict: Client, strict_settings: Settings, llm_url: str, real_redis: Redis
) -> None:
    login = await (await strict.post("/v1/auth/visitor")).json()
    assert (await create(strict, login["token"]))[0] == 202
    assert await real_redis.zcard(keys.active(login["user"])) == 1
    worker = make_worker(strict_settings, llm_url, burst=True, poll_delay=0)
    try:
        await worker.main()
    finally:
        await worker.close()
    assert await real_redis.zcard(keys.active(login["user"])) == 0


async def test_too_many_chats_a_minute_get_429_with_retry_after(strict_settings: Settings) -> None:
    two_a_minute = msgspec.structs.replace(strict_settings, visitor_chats_per_minute=2, visitor_max_running_chats=10)
    async with TestClient(TestServer(make_app(two_a_minute))) as client:
        token = await visitor(client)
        for _ in range(2):
            assert (await create(client, token))[0] == 202
        status, body, headers = await create(client, token)
        assert (status, error_code(body)) == (429, "rate_limited")
        assert 1 <= int(headers["Retry-After"]) <= 60
        assert (await create(client, await visitor(client)))[0] == 202, "each user has a minute of their own"


async def test_the_minute_count_is_shared_and_resets_with_the_minute(real_redis: Redis, settings: Settings) -> None:
    identity = Identity("u", "0" * 16, quota(settings, _key(Limits(chats_per_minute=1))))
    await real_redis.set(keys.credential(identity.credential), b"{}")  # admission checks it still exists
    await admit_chat(real_redis, real_redis, settings, identity, "a" * 32, created_at="t", request=b"{}")
    # Another API process, half a minute later by Redis's clock (whatever the hosts' clocks say):
    await real_redis.pexpire(keys.rate("u"), 29_500)
    with pytest.raises(RateLimited) as caught:
        await admit_chat(real_redis, real_redis, settings, identity, "b" * 32, created_at="t", request=b"{}")
    assert caught.value.retry_after == 30
    assert not await real_redis.exists(keys.chat("b" * 32)), "a refused chat leaves nothing behind"
    await real_redis.delete(keys.rate("u"))  # the minute is over
    await admit_chat(real_redis, real_redis, settings, identity, "c" * 32, created_at="t", request=b"{}")


async def test_a_deep_queue_turns_new_chats_away_at_once(real_redis: Redis, settings: Settings) -> None:
    shallow = msgspec.structs.replace(settings, max_queue_depth=2)
    await real_redis.zadd(keys.QUEUE_NAME, {"job-1": 1, "job-2": 2})
    identity = Identity("u", "0" * 16, quota(shallow, _key(Limits())))
    await real_redis.set(keys.credential(identity.credential), b"{}")
    with pytest.raises(Overloaded) as caught:
        await admit_chat(real_redis, real_redis, shallow, identity, "a" * 32, created_at="t", request=b"{}")
    assert (caught.value.status, caught.value.code, caught.value.retry_after) == (503, "overloaded", 2)
    await real_redis.zrem(keys.queue(), "job-1")  # a chat that starts leaves the queue
    await admit_chat(real_redis, real_redis, shallow, identity, "a" * 32, created_at="t", request=b"{}")


async def test_an_api_key_carries_its_own_limits(strict: Client, real_redis: Redis) -> None:
    roomy, _ = await issue(real_redis, "acme", "key", limits=Limits(max_running_chats=5, max_prompt_chars=1000))
    for _ in range(5):
        assert (await create(strict, roomy))[0] == 202
    assert (await create(strict, roomy))[0] == 429
    long = await strict.post("/v1/chats", json={"message": "x" * 500}, headers=bearer(roomy))
    assert long.status == 429, "the prompt fits the key's cap; only the running limit refuses it"


async def test_too_many_open_streams_get_429_and_a_closed_one_frees_its_place(strict: Client) -> None:
    token = await visitor(strict)
    urls = [str(body["stream_url"]) for _, body, _ in [await create(strict, token) for _ in range(2)]]
    opened = [await strict.get(url.removeprefix(str(strict.make_url("")))) for url in urls]
    assert [r.status for r in opened] == [200, 200]
    refused = await strict.get(urls[0].removeprefix(str(strict.make_url(""))))
    assert refused.status == 429
    assert error_code(json_of(await refused.read())) == "too_many_streams"
    assert "Retry-After" in refused.headers
    opened[0].close()
    for _ in range(100):  # the handler sees the disconnect and releases the slot
        again = await strict.get(urls[0].removeprefix(str(strict.make_url(""))))
        if again.status == 200:
            again.close()
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the closed stream's place was never freed")
    opened[1].close()


async def test_one_address_may_hold_only_so_many_streams(strict: Client) -> None:
    users = [await visitor(strict) for _ in range(2)]
    chats = [str((await create(strict, token))[1]["stream_url"]) for token in users for _ in range(2)]
    paths = [url.removeprefix(str(strict.make_url(""))) for url in chats]
    opened = [await strict.get(path) for path in paths[:3]]
    assert [r.status for r in opened] == [200, 200, 200]
    refused = await strict.get(paths[3])  # the second user's own limit allows it; the address's does not
    assert refused.status == 429
    assert "from one address" in json_of(await refused.read())["error"]["message"]  # type: ignore[index]
    for response in opened:
        response.close()


def _key(limits: Limits) -> Credential:
    return Credential("0" * 16, "u", "key", "", "t", limits)


async def test_one_address_may_make_only_so_many_visitors_a_minute(settings: Settings) -> None:
    three = msgspec.structs.replace(settings, visitor_logins_per_minute=3)
    async with TestClient(TestServer(make_app(three))) as client:
        assert [(await client.post("/v1/auth/visitor")).status for _ in range(3)] == [201] * 3
        response = await client.post("/v1/auth/visitor")
        assert response.status == 429
        assert 1 <= int(response.headers["Retry-After"]) <= 60


async def test_limits_hold_across_api_and_edge_processes(strict_settings: Settings) -> None:
    """Two apps on one Redis, as two processes would be: each counts what the other admitted."""
    async with (
        TestClient(TestServer(make_app(strict_settings))) as first,
        TestClient(TestServer(make_app(strict_settings))) as second,
    ):
        token = await visitor(first)
        created = [await create(first, token), await create(second, token)]
        assert [status for status, _, _ in created] == [202, 202]
        status, body, _ = await create(first, token)  # the third chat, on either process
        assert (status, error_code(body)) == (429, "too_many_chats")
        paths = [str(body["stream_url"])[str(body["stream_url"]).index("/v1/") :] for _, body, _ in created]
        streams = [await first.get(paths[0]), await second.get(paths[1])]
        assert [r.status for r in streams] == [200, 200]
        refused = await second.get(paths[0])  # a third stream, on the edge that holds only one
        assert refused.status == 429
        assert error_code(json_of(await refused.read())) == "too_many_streams"
        for response in streams:
            response.close()


async def test_a_keys_max_tokens_bounds_chats_that_name_none(strict: Client, real_redis: Redis) -> None:
    key, _ = await issue(real_redis, "acme", "key", limits=Limits(max_tokens=40))
    visitor_token = await visitor(strict)
    requests = {}
    for name, token in [("key", key), ("visitor", visitor_token)]:
        _, body, _ = await create(strict, token)
        requests[name] = decode_request(await real_redis.hget(keys.chat(str(body["id"])), "request"))
    assert requests["key"].max_tokens == 40
    assert requests["visitor"].max_tokens is None, "the deployment's cap never fills in (small models refuse it)"


async def test_refused_visitor_logins_do_not_count(settings: Settings, real_redis: Redis) -> None:
    two = msgspec.structs.replace(settings, visitor_logins_per_minute=2)
    async with TestClient(TestServer(make_app(two))) as client:
        statuses = [(await client.post("/v1/auth/visitor")).status for _ in range(5)]
    assert statuses == [201, 201, 429, 429, 429]
    (counter,) = await real_redis.keys(keys.visitor_logins("*"))
    assert await real_redis.get(counter) == b"2"
    assert 0 < await real_redis.pttl(counter) <= 60_000  # the minute, by Redis's clock


async def test_a_stream_slot_whose_answer_was_lost_is_given_back(real_redis: Redis, settings: Settings) -> None:
    # Redis took the slot but the edge never heard (a dropped connection, a client gone mid-call):
    # the slot must not stay taken until it lapses.
    slots = StreamSlots(real_redis, per_ip=10)
    identity = Identity("alice", "c1", quota(settings, _key(Limits())))
    opened = slots._open

    async def answer_lost(**kwargs: object) -> object:
        await opened(**kwargs)  # type: ignore[arg-type]
        raise ConnectionError("the answer was lost")

    slots._open = answer_lost  # type: ignore[assignment,method-assign]
    with pytest.raises(ConnectionError):
        await slots.acquire(identity, "192.0.2.1")
    assert await real_redis.zcard(keys.user_streams("alice")) == 0
    assert await real_redis.zcard(keys.ip_streams("192.0.2.1")) == 0


async def test_open_stream_slots_are_renewed_and_given_back_ones_stay_gone(
    real_redis: Redis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("streambridge.api.slots.RENEW_PER_CALL", 2)  # several calls, and a key split across them
    slots = StreamSlots(real_redis, per_ip=10)
    alice = Identity("alice", "c1", quota(settings, _key(Limits(max_open_streams=10))))
    bob = Identity("bob", "c2", quota(settings, _key(Limits(max_open_streams=10))))
    held = [await slots.acquire(alice, "192.0.2.1") for _ in range(3)] + [await slots.acquire(bob, "192.0.2.2")]
    await slots.release(held[0])
    touched = [keys.user_streams("alice"), keys.ip_streams("192.0.2.1"), keys.user_streams("bob")]
    touched.append(keys.ip_streams("192.0.2.2"))
    for key in touched:  # as if the slots were about to lapse
        await real_redis.zadd(key, dict.fromkeys(await real_redis.zrange(key, 0, -1), 1), xx=True)
        await real_redis.pexpire(key, 500)
    await real_redis.zrem(keys.user_streams("alice"), held[1])  # a release under way as renewal starts

    await slots.renew()

    soon = (await real_redis.time())[0] * 1000 + 20_000
    for key in touched:
        assert all(score > soon for _, score in await real_redis.zrange(key, 0, -1, withscores=True))
        assert await real_redis.pttl(key) > 20_000
    assert await real_redis.zrange(keys.user_streams("alice"), 0, -1) == [held[2].encode()]
    assert await real_redis.zrange(keys.ip_streams("192.0.2.2"), 0, -1) == [held[3].encode()]


async def test_slots_given_back_together_go_in_one_round_trip_and_all_of_them_go(
    real_redis: Redis, settings: Settings
) -> None:
    # A chat that thousands watch ends: its streams all close at once, and give their slots back.
    slots = StreamSlots(real_redis, per_ip=1000)
    alice = Identity("alice", "c1", quota(settings, _key(Limits(max_open_streams=1000))))
    bob = Identity("bob", "c2", quota(settings, _key(Limits(max_open_streams=1000))))
    held = [await slots.acquire(alice, "192.0.2.1") for _ in range(150)]
    held += [await slots.acquire(bob, "192.0.2.2") for _ in range(50)]
    round_trips = 0
    pipeline = real_redis.pipeline

    def counted(*args: object, **kwargs: object) -> object:
        nonlocal round_trips
        round_trips += 1
        return pipeline(*args, **kwargs)  # type: ignore[arg-type]

    real_redis.pipeline = counted  # type: ignore[assignment,method-assign]
    await asyncio.gather(*(slots.release(slot) for slot in held), slots.release(held[0]))
    assert round_trips <= 2  # the first alone, perhaps, then every one that came meanwhile
    for key in (keys.user_streams("alice"), keys.ip_streams("192.0.2.1"), keys.user_streams("bob")):
        assert await real_redis.zcard(key) == 0
    assert await real_redis.zcard(keys.ip_streams("192.0.2.2")) == 0
