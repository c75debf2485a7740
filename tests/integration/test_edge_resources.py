"""A client that disconnects frees its task and its Redis resources at once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from streambridge.api.context import CONTEXT
from tests.conftest import OwnRedis
from tests.integration.conftest import bearer

STREAMS = 500


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A server of this test's own: it counts the server's clients, and other tests' sockets
    (closed, but not yet collected) would count too on a shared one."""
    server = OwnRedis()
    yield server.url()
    server.stop()


async def redis_clients(client: TestClient) -> int:  # type: ignore[type-arg]
    """Connections to this test's database."""
    redis = client.server.app[CONTEXT].redis
    db = str(redis.connection_pool.connection_kwargs["db"])
    return sum(1 for c in await redis.client_list() if c["db"] == db)


async def settle(condition: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def test_500_dropped_streams_leave_no_tasks_subscriptions_or_connections(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
) -> None:
    hub = client.server.app[CONTEXT].hub
    settings = client.server.app[CONTEXT].settings
    assert hub is not None
    chat_ids = [
        (await (await client.post("/v1/chats", json={"message": f"hi {n}"}, headers=bearer(token))).json())["id"]
        for n in range(5)
    ]
    await asyncio.sleep(0.1)
    tasks_before = len(asyncio.all_tasks())
    connections_before = await redis_clients(client)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        responses = await asyncio.gather(
            *(
                session.get(client.make_url(f"/v1/chats/{chat_ids[n % 5]}/events"), headers=bearer(token))
                for n in range(STREAMS)
            )
        )
        assert all(r.status == 200 for r in responses)
        assert len(hub.topics) == 5
        assert sum(len(t.subscribers) for t in hub.topics.values()) == STREAMS
        assert len(asyncio.all_tasks()) >= tasks_before + STREAMS  # one handler task per open stream
        # the process's bounded pool, plus the test fixture's own connection to the database
        assert await redis_clients(client) <= settings.redis_max_connections + 1
        for response in responses:
            response.close()  # the client goes away mid-stream

    await settle(lambda: not hub.topics)
    await settle(lambda: len(asyncio.all_tasks()) <= tasks_before)
    # Nothing per client is left: only the process's bounded, shared pool (and the fixture's socket).
    assert connections_before <= await redis_clients(client) <= settings.redis_max_connections + 1
