"""Slow and idle clients hold nothing for long: a request's headers and body each have a deadline,
and an SSE response ends after its lifetime or a spell without events (the client resumes)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import msgspec
import pytest
from aiohttp import ClientSession
from redis.asyncio import Redis

from streambridge.api.app import make_app
from streambridge.serve import start_site
from streambridge.shared import keys
from streambridge.shared.settings import Settings

FAST = {"header_timeout": 0.5, "body_timeout": 0.5, "heartbeat_interval": 0.2}


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, **FAST)  # type: ignore[arg-type]


async def serve(settings: Settings) -> AsyncIterator[str]:
    runner, port = await start_site(
        make_app(settings), "127.0.0.1", 0, header_timeout=settings.header_timeout, body_timeout=settings.body_timeout
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[str]:
    async for address in serve(settings):
        yield address


async def read_until_closed(reader: asyncio.StreamReader) -> tuple[bytes, float]:
    began = time.monotonic()
    data = await asyncio.wait_for(reader.read(), 10)
    return data, time.monotonic() - began


async def test_a_client_trickling_its_headers_is_cut_off_at_the_header_timeout(server: str) -> None:
    host, port = server.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")

    async def trickle() -> None:  # a header line now and then keeps a naive idle timer from firing
        while True:
            await asyncio.sleep(0.1)
            writer.write(b"X-Slow: 1\r\n")

    trickling = asyncio.create_task(trickle())
    data, waited = await read_until_closed(reader)
    trickling.cancel()
    writer.close()
    await writer.wait_closed()
    assert data == b"", "closed without an answer"
    assert 0.4 < waited < 3


async def test_a_silent_connection_is_closed_at_the_header_timeout(server: str) -> None:
    host, port = server.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data, waited = await read_until_closed(reader)
    writer.close()
    await writer.wait_closed()
    assert data == b""
    assert waited < 3


async def test_a_body_that_does_not_arrive_in_time_gets_408(server: str) -> None:
    async with ClientSession(f"http://{server}") as http:
        token = (await (await http.post("/v1/auth/visitor")).json())["token"]
    host, port = server.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"POST /v1/chats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 1000\r\n\r\n"
    writer.write(head.encode() + b'{"message": "')
    data, waited = await read_until_closed(reader)
    writer.close()
    await writer.wait_closed()
    assert data.startswith(b"HTTP/1.1 408"), data[:100]
    assert b'"code":"request_timeout"' in data
    assert waited < 3


@pytest.mark.parametrize(
    ("changes", "comment"),
    [({"stream_idle_timeout": 0.6}, b": idle;"), ({"stream_max_lifetime": 0.6}, b": lifetime;")],
)
async def test_a_stream_ends_after_its_idle_timeout_or_lifetime(
    settings: Settings, changes: dict[str, float], comment: bytes
) -> None:
    async for server in serve(msgspec.structs.replace(settings, **changes)):
        async with ClientSession(f"http://{server}") as http:
            token = (await (await http.post("/v1/auth/visitor")).json())["token"]
            created = await (
                await http.post("/v1/chats", json={"message": "hi"}, headers={"Authorization": f"Bearer {token}"})
            ).json()
            began = time.monotonic()
            async with http.get(created["stream_url"]) as response:  # no worker runs: the chat stays queued
                assert response.status == 200
                body = await asyncio.wait_for(response.read(), 10)
            assert 0.5 < time.monotonic() - began < 3
            assert body.rstrip().endswith(comment + b" reconnect with Last-Event-ID")


@pytest.mark.parametrize(
    "route",
    ["events", "chat/completions", "responses"],
    ids=["native events", "a chunk stream", "a Responses stream"],
)
async def test_a_client_that_stops_reading_is_dropped_and_frees_its_slot(
    settings: Settings, redis_url: str, route: str
) -> None:
    quick = msgspec.structs.replace(settings, stream_write_timeout=0.5)
    async for server in serve(quick):
        async with ClientSession(f"http://{server}") as http:
            login = await (await http.post("/v1/auth/visitor")).json()
            auth = {"Authorization": f"Bearer {login['token']}"}
            created = await (await http.post("/v1/chats", json={"message": "hi"}, headers=auth)).json()
        redis = Redis.from_url(redis_url)
        big = b'{"type":"content","content":"' + b"x" * 10_000 + b'","index":1,"attempt":1}'
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(2000):  # 20 MB of history: more than any socket buffers hold
                pipe.xadd(keys.events(created["id"]), {"type": "content", "data": big})
            await pipe.execute()
        host, port = server.split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        path = {
            "events": created["stream_url"].split(server, 1)[1],
            "chat/completions": f"/v1/chat/completions/{created['id']}/stream",
            "responses": f"/v1/responses/resp_{created['id']}?stream=true",
        }[route]
        bearer = f"Authorization: Bearer {login['token']}\r\n"
        sock.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n{bearer}\r\n".encode())
        began = time.monotonic()
        while await redis.zcard(keys.user_streams(login["user"])) == 0:  # the stream opened
            assert time.monotonic() - began < 10, "the stream never opened"
            await asyncio.sleep(0.02)
        while await redis.zcard(keys.user_streams(login["user"])) == 1:  # ... and never read
            assert time.monotonic() - began < 10, "a client that reads nothing still holds its stream"
            await asyncio.sleep(0.05)
        sock.close()
        await redis.aclose()
