"""A chat's W3C trace context, from the POST to the worker's call upstream."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict
from redis.asyncio import Redis

from streambridge.fake_llm import make_app as make_fake_llm
from streambridge.shared import logs, trace
from streambridge.shared.settings import Settings
from streambridge.workers.reaper import whose
from streambridge.workers.worker import make_worker, stop_worker
from tests.integration.conftest import FAST_LLM, bearer

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class Upstream:
    """The simulated LLM, remembering the trace headers of each call it gets."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []
        self.url = ""

    @web.middleware
    async def record(self, request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
        if request.path.endswith("/chat/completions"):
            names = {"traceparent", "tracestate"}
            self.calls.append({k: ",".join(request.headers.getall(k)) for k in request.headers if k.lower() in names})
        return await handler(request)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    seen = Upstream()
    app = make_fake_llm(FAST_LLM)
    app.middlewares.append(seen.record)
    server = TestServer(app)
    await server.start_server()
    seen.url = str(server.make_url("/v1"))
    yield seen
    await server.close()


async def run_chat(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    settings: Settings,
    upstream: Upstream,
    path: str,
    body: object,
    headers: dict[str, str] | list[tuple[str, str]],
) -> dict[str, str]:
    worker = make_worker(settings, upstream.url, poll_delay=0.01)
    running = asyncio.create_task(worker.main())
    try:
        sent = CIMultiDict(bearer(token))
        sent.extend(headers)  # a header may come more than once
        response = await client.post(path, json=body, headers=sent)
        assert response.status in (200, 202), await response.text()
        await response.read()  # the OpenAI routes answer once the chat has ended
        async with asyncio.timeout(10):
            while not upstream.calls:
                await asyncio.sleep(0.01)
    finally:
        await stop_worker(worker, running, 1.0)
    (call,) = upstream.calls
    return call


async def test_a_traceparent_reaches_the_upstream_as_a_child_span(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    settings: Settings,
    upstream: Upstream,
) -> None:
    sent = {"traceparent": PARENT, "tracestate": "vendor=opaque"}
    call = await run_chat(client, token, settings, upstream, "/v1/chats", {"message": "hi"}, sent)
    received = trace.parse(call["traceparent"], call.get("tracestate"))
    assert received is not None
    assert received.trace_id == TRACE_ID
    assert received.span_id != "00f067aa0ba902b7"
    assert received.flags == "01"
    assert call["tracestate"] == "vendor=opaque"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/responses", {"model": "m", "input": "hi"}),
    ],
)
async def test_the_openai_routes_pass_the_trace_on_too(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    settings: Settings,
    upstream: Upstream,
    path: str,
    body: object,
) -> None:
    call = await run_chat(client, token, settings, upstream, path, {**body, "stream": False}, {"traceparent": PARENT})
    received = trace.parse(call["traceparent"])
    assert received is not None
    assert received.trace_id == TRACE_ID


async def test_an_invalid_traceparent_is_not_passed_on_a_new_trace_is(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    settings: Settings,
    upstream: Upstream,
) -> None:
    invalid = f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01"
    sent = {"traceparent": invalid, "tracestate": "vendor=opaque"}
    call = await run_chat(client, token, settings, upstream, "/v1/chats", {"message": "hi"}, sent)
    received = trace.parse(call["traceparent"])
    assert received is not None
    assert received.trace_id != TRACE_ID.lower()
    assert "tracestate" not in call


class Captured:
    """The JSON log lines written meanwhile (``shared.logs``, as a process configures it)."""

    def __init__(self) -> None:
        self.out = io.StringIO()

    def records(self, event: str) -> list[dict[str, Any]]:
        logs.flush()
        found = [msgspec.json.decode(line) for line in self.out.getvalue().splitlines()]
        return [r for r in found if r.get("event") == event]


@pytest.fixture
def captured() -> Iterator[Captured]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    seen = Captured()
    logs.configure(role="up", format="json", stream=seen.out)
    yield seen
    logs.flush()
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_the_logs_name_each_span_and_its_parent(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    settings: Settings,
    upstream: Upstream,
    captured: Captured,
) -> None:
    """streambridge exports no spans: chat.admitted and upstream.request say which is whose parent,
    from the caller's span to the one the LLM receives."""
    call = await run_chat(client, token, settings, upstream, "/v1/chats", {"message": "hi"}, {"traceparent": PARENT})
    received = trace.parse(call["traceparent"])
    assert received is not None
    (admitted,) = captured.records("chat.admitted")
    (request,) = captured.records("upstream.request")
    assert admitted["trace_id"] == request["trace_id"] == TRACE_ID
    assert admitted["parent_span_id"] == "00f067aa0ba902b7"  # the caller's
    assert request["parent_span_id"] == admitted["span_id"]  # the chat's
    assert request["span_id"] == received.span_id  # the span the LLM was sent
    assert request["level"] == "INFO"


async def test_an_idempotent_replay_is_logged_under_the_chats_trace(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    captured: Captured,
) -> None:
    second_trace = "0af7651916cd43dd8448eb211c80319c"
    ids = []
    for traceparent in (PARENT, f"00-{second_trace}-b7ad6b7169203331-01"):
        headers = {**bearer(token), "traceparent": traceparent, "Idempotency-Key": "replay-trace"}
        response = await client.post("/v1/chats", json={"message": "hi"}, headers=headers)
        assert response.status == 202, await response.text()
        ids.append((await response.json())["id"])
    assert ids[0] == ids[1]
    (admitted,) = captured.records("chat.admitted")
    (replayed,) = captured.records("chat.replayed")
    assert admitted["trace_id"] == TRACE_ID
    assert replayed["chat_id"] == ids[0]
    assert replayed["trace_id"] == TRACE_ID  # the chat's trace, which its worker and edge lines carry
    assert replayed["request_trace_id"] == second_trace


async def test_lines_logged_outside_a_chats_task_name_its_user_and_trace(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    redis_url: str,
) -> None:
    """``chat.reaped`` and ``chat.cancelling`` are logged by a worker's reaper and cancel listener,
    which run no chat: they read its owner and trace."""
    headers = {**bearer(token), "traceparent": PARENT}
    response = await client.post("/v1/chats", json={"message": "hi"}, headers=headers)
    chat_id = (await response.json())["id"]
    redis = Redis.from_url(redis_url)
    try:
        fields = await whose(redis, chat_id)
        assert fields["chat_id"] == chat_id
        assert fields["trace_id"] == TRACE_ID
        assert fields["user"].startswith("visitor_")
        assert await whose(redis, "no-such-chat") == {"chat_id": "no-such-chat"}
    finally:
        await redis.aclose()


async def test_several_tracestate_headers_reach_the_upstream_as_one_list(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    settings: Settings,
    upstream: Upstream,
) -> None:
    sent = [("traceparent", PARENT), ("tracestate", "congo=t61rcWkgMzE"), ("tracestate", "rojo=00f067aa0ba902b7")]
    call = await run_chat(client, token, settings, upstream, "/v1/chats", {"message": "hi"}, sent)
    assert call["tracestate"] == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
