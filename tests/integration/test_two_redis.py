"""``STREAMBRIDGE_STREAMS_REDIS_URL``: each chat's own keys on one Redis (a plain one, or a real 6-node
cluster), the queue, credentials and limits on the control Redis; the API, the edge and a worker
wired to both, and neither holding the other's keys."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import msgspec
import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from streambridge.api.app import make_app
from streambridge.embedded import free_port
from streambridge.fake_llm import expected_text
from streambridge.shared import keys
from streambridge.shared.events import Complete, assemble_text
from streambridge.shared.settings import Settings
from streambridge.workers.worker import make_worker
from tests.cluster import RedisCluster
from tests.conftest import OwnRedis, _a_database
from tests.integration.conftest import FAST_LLM, bearer, events_of, read_sse


@pytest.fixture(params=["redis", "cluster"])
def streams_url(request: pytest.FixtureRequest, own_redis: OwnRedis) -> Iterator[str]:
    if request.param == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        yield cluster.url
        for node in cluster.primaries():
            node.client.flushdb()
    else:
        yield from _a_database(own_redis)


@pytest.fixture
def two_redis(settings: Settings, streams_url: str) -> Settings:
    return msgspec.structs.replace(settings, streams_redis_url=streams_url)


@pytest.fixture
async def client(two_redis: Settings) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    async with TestClient(TestServer(make_app(two_redis))) as client:
        yield client


def chat_keys(url: str, chat_id: str) -> set[str]:
    """Which of the chat's own keys ``url``'s Redis (or cluster) holds."""
    own = {keys.chat(chat_id), keys.events(chat_id)}
    if url.startswith("redis-cluster://"):
        host, port = url.removeprefix("redis-cluster://").split(",")[0].split(":")
        with redis.RedisCluster(host=host, port=int(port)) as cluster:
            return {k for k in own if cluster.exists(k)}
    with redis.Redis.from_url(url) as plain:
        return {k for k in own if plain.exists(k)}


async def test_a_chat_runs_with_its_own_keys_on_the_streams_redis_and_nothing_of_them_on_the_control_one(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    two_redis: Settings,
    llm_url: str,
) -> None:
    response = await client.post("/v1/chats", json={"message": "two redis"}, headers=bearer(token))
    assert response.status == 202
    chat_id = (await response.json())["id"]
    worker = make_worker(two_redis, llm_url, burst=True, poll_delay=0)
    try:
        await worker.main()
    finally:
        await worker.close()
    events = events_of(await read_sse(await client.get(f"/v1/chats/{chat_id}/events", headers=bearer(token))))
    assert isinstance(events[-1], Complete)
    assert assemble_text(events) == expected_text("two redis", FAST_LLM.words)
    assert (await (await client.get(f"/v1/chats/{chat_id}", headers=bearer(token))).json())["status"] == "complete"
    assert two_redis.streams_redis_url is not None
    assert two_redis.redis_url is not None
    assert chat_keys(two_redis.streams_redis_url, chat_id) == {keys.chat(chat_id), keys.events(chat_id)}
    assert chat_keys(two_redis.redis_url, chat_id) == set(), "the control Redis holds none of the chat's own keys"
    with redis.Redis.from_url(two_redis.redis_url) as control:
        assert control.zcard(keys.queue()) == 0
        assert not any(control.hlen(k) for k in control.keys(keys.worker_chats("*"))), "no worker lists it still"


async def test_an_api_whose_streams_redis_is_down_is_not_ready(settings: Settings) -> None:
    down = msgspec.structs.replace(settings, streams_redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with TestClient(TestServer(make_app(down, serve_edge=False))) as client:
        response = await client.get("/readyz")
        assert response.status == 503
        checks = (await response.json())["checks"]
    assert checks["redis"] == "ok"
    assert checks["streams_redis"].startswith("unreachable")
