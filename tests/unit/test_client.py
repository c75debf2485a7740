"""The client against a small scripted server that speaks just enough of the contract."""

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from streambridge import chat_cli
from streambridge import client as client_module
from streambridge.client import CancelAccepted, ChatCreated, ChatStream, ClientError, Received, StreambridgeClient
from streambridge.shared.events import (
    Complete,
    Content,
    Error,
    Event,
    Failed,
    FunctionCall,
    Progress,
    Reasoning,
    Started,
    Status,
    ToolCall,
    ToolCallFragment,
    encode_event,
    event_type,
)
from streambridge.shared.streams import id_key

VISITOR = "visitor-token"


@dataclass
class Script:
    """What the server streams, and what each successive connection to the events route does.

    A plan step is ``"drop:N"`` (write N events, then cut the connection), ``"hang:N"`` (write N
    events, then go silent), or an HTTP status; connections past the plan get the whole stream.
    """

    entries: list[tuple[str, str, bytes]] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    honour_last_event_id: bool = True
    stream_tokens: set[str] = field(default_factory=lambda: {"good"})
    stream_url: str = "/v1/chats/c1/events?token=good"
    fresh_stream_url: str | None = None
    tokens: list[str | None] = field(default_factory=list)
    last_event_ids: list[str | None] = field(default_factory=list)
    bodies: list[object] = field(default_factory=list)


SCRIPT = web.AppKey("script", Script)


def entries(*events: Event | tuple[str, bytes]) -> list[tuple[str, str, bytes]]:
    """Stream entries with ids ``1732400000000-<i>``; a ``(type, data)`` pair is sent as it is."""
    raw = [event if isinstance(event, tuple) else (event_type(event), encode_event(event)) for event in events]
    return [(f"1732400000000-{i}", kind, data) for i, (kind, data) in enumerate(raw)]


def error(status: int, code: str, **headers: str) -> web.Response:
    body = {"error": {"code": code, "message": f"{code} happened"}}
    return web.json_response(body, status=status, headers=headers)


def authorized(request: web.Request) -> bool:
    return request.headers.get("Authorization") == f"Bearer {VISITOR}"


async def visitor(request: web.Request) -> web.Response:
    return web.json_response({"token": VISITOR, "user": "u1"}, status=201)


async def create_chat(request: web.Request) -> web.Response:
    if not authorized(request):
        return error(401, "unauthorized")
    script = request.app[SCRIPT]
    script.bodies.append(await request.json())
    body = {"id": "c1", "status": "queued", "stream_url": script.stream_url, "created_at": "2024-11-23T22:13:20Z"}
    return web.json_response(body, status=202)


async def get_chat(request: web.Request) -> web.Response:
    if not authorized(request):
        return error(401, "unauthorized")
    if request.match_info["id"] != "c1":
        return error(404, "not_found")
    body = {"id": "c1", "status": "running", "content": "", "finish_reason": None, "usage": None, "attempts": 1}
    return web.json_response({**body, "error": None, "stream_url": request.app[SCRIPT].fresh_stream_url})


async def cancel_chat(request: web.Request) -> web.Response:
    return web.json_response({"id": request.match_info["id"], "status": "cancelled"}, status=202)


async def events(request: web.Request) -> web.StreamResponse:
    script = request.app[SCRIPT]
    script.tokens.append(request.query.get("token"))
    if not authorized(request) and request.query.get("token") not in script.stream_tokens:
        return error(401, "unauthorized")
    if request.match_info["id"] != "c1":
        return error(404, "not_found")
    last = request.headers.get("Last-Event-ID")
    script.last_event_ids.append(last)
    step = script.plan[len(script.last_event_ids) - 1] if len(script.last_event_ids) <= len(script.plan) else ""
    if step.isdigit():
        return error(int(step), "unavailable", **{"Retry-After": "0"})
    pending = [e for e in script.entries if not (last and script.honour_last_event_id) or id_key(e[0]) > id_key(last)]
    action, _, count = step.partition(":")
    if action:
        pending = pending[: int(count)]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for entry_id, kind, data in pending:
        await response.write(b"id: %s\nevent: %s\ndata: %s\n\n" % (entry_id.encode(), kind.encode(), data))
    if action == "drop":
        assert request.transport is not None
        request.transport.close()
    elif action == "hang":
        await asyncio.sleep(1)
    return response


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "BACKOFF_START", 0.001)


@pytest.fixture
async def client(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]], script: Script
) -> AsyncIterator[StreambridgeClient]:
    app = web.Application()
    app[SCRIPT] = script
    app.router.add_post("/v1/auth/visitor", visitor)
    app.router.add_post("/v1/chats", create_chat)
    app.router.add_get("/v1/chats/{id}", get_chat)
    app.router.add_post("/v1/chats/{id}/cancel", cancel_chat)
    app.router.add_get("/v1/chats/{id}/events", events)
    server: TestServer = await aiohttp_server(app)
    async with StreambridgeClient(str(server.make_url("/")), max_reconnects=3) as client:
        yield client


def created(script: Script) -> ChatCreated:
    return ChatCreated("c1", "queued", script.stream_url)


async def drain(stream: ChatStream, into: list[Received]) -> None:
    async with stream:
        async for item in stream:
            into.append(item)


ATTEMPTS: list[Event] = [
    Started(1, "m"),
    Content("Half an ", 1, 1),
    Content("answer", 2, 1),
    Error("upstream broke", True, 1),
    Status("retrying: attempt 2 of 3", 1),
    Started(2, "m"),
    Content("The ", 1, 2),
    Progress(1, 4, 10, 2),
    Content("answer", 2, 2),
    Complete(2, 2, 10, 20, "stop"),
]


async def test_a_dropped_stream_resumes_from_the_last_event_id(client: StreambridgeClient, script: Script) -> None:
    script.entries = entries(*ATTEMPTS)
    script.plan = ["drop:2"]
    async with client.stream(created(script)) as stream:
        received = [item async for item in stream]
    assert received == [Received(f"1732400000000-{i}", event) for i, event in enumerate(ATTEMPTS)]
    assert script.last_event_ids == [None, "1732400000000-1"]
    assert stream.text == "The answer"
    assert stream.terminal == ATTEMPTS[-1]
    assert stream.reconnects == 1
    assert stream.last_event_id == "1732400000000-9"


async def test_events_the_server_repeats_are_yielded_once(client: StreambridgeClient, script: Script) -> None:
    script.entries = entries(*ATTEMPTS)
    script.plan = ["drop:4", "drop:6"]
    script.honour_last_event_id = False
    await client.login_visitor()
    async with client.stream("c1") as stream:
        received = [item.event async for item in stream]
    assert received == ATTEMPTS
    assert script.last_event_ids == [None, "1732400000000-3", "1732400000000-5"]


async def test_chat_returns_only_the_completed_attempts_text_and_calls_back(
    client: StreambridgeClient, script: Script
) -> None:
    script.entries = entries(*ATTEMPTS)
    script.plan = ["drop:3"]
    pieces: list[str] = []
    seen: list[Event] = []

    async def on_progress(event: Progress) -> None:
        seen.append(event)

    outcome = await client.chat(
        "hi",
        model="m",
        on_content=lambda piece, event: pieces.append(piece),
        on_progress=on_progress,
        on_status=seen.append,
        on_error=seen.append,
        on_complete=seen.append,
    )
    assert outcome.chat_id == "c1"
    assert outcome.text == "The answer"
    assert outcome.terminal == ATTEMPTS[-1]
    assert outcome.reconnects == 1
    assert client.token == VISITOR
    assert script.bodies == [{"message": "hi", "model": "m"}]
    assert pieces == ["Half an ", "answer", "The ", "answer"]
    assert seen == [ATTEMPTS[3], ATTEMPTS[4], ATTEMPTS[7], ATTEMPTS[9]]


async def test_reasoning_and_tool_calls_come_apart_from_the_text_and_resume_like_it(
    client: StreambridgeClient, script: Script
) -> None:
    script.entries = entries(
        Started(1, "m"),
        Reasoning("lost ", 1, 1),
        Error("upstream broke", True, 1),
        Started(2, "m"),
        Reasoning("Look it ", 1, 2),
        Reasoning("up.", 2, 2),
        ToolCallFragment(0, "call_a", "get_weather", "", 2),
        ToolCallFragment(0, None, None, '{"city":', 2),
        ToolCallFragment(0, None, None, '"Paris"}', 2),
        Complete(2, 0, 0, 20, "tool_calls"),
    )
    script.plan = ["drop:7"]  # cut between two fragments of the call
    thoughts: list[str] = []
    fragments: list[ToolCallFragment] = []
    outcome = await client.chat(
        "weather?", on_reasoning=lambda piece, event: thoughts.append(piece), on_tool_call=fragments.append
    )
    assert outcome.reconnects == 1
    assert outcome.text == ""
    assert outcome.reasoning == "Look it up."
    call = ToolCall(id="call_a", function=FunctionCall(name="get_weather", arguments='{"city":"Paris"}'))
    assert outcome.tool_calls == (call,)
    assert thoughts == ["lost ", "Look it ", "up."]
    assert [f.arguments for f in fragments] == ["", '{"city":', '"Paris"}']


TOOL_CALL_CHAT = entries(
    Started(1, "m"),
    Reasoning("Look it ", 1, 1),
    Reasoning("up.", 2, 1),
    ToolCallFragment(0, "call_a", "get_weather", "", 1),
    ToolCallFragment(0, None, None, '{"city":"Paris"}', 1),
    Complete(1, 0, 0, 20, "tool_calls"),
)


@pytest.mark.parametrize("live", [True, False], ids=["terminal", "pipe"])
async def test_the_cli_shows_reasoning_on_stderr_and_tool_calls_as_such(
    client: StreambridgeClient, script: Script, capsys: pytest.CaptureFixture[str], live: bool
) -> None:
    script.entries = TOOL_CALL_CHAT
    assert await chat_cli._stream("weather?", client.base_url, None, live=live) == 0
    out, err = capsys.readouterr()
    assert out == 'tool call: get_weather({"city":"Paris"})\n'
    assert err == "reasoning: Look it up.\n"


async def test_the_cli_streams_reasoning_apart_from_the_answer_on_a_terminal(
    client: StreambridgeClient, script: Script, capsys: pytest.CaptureFixture[str]
) -> None:
    script.entries = entries(Started(1, "m"), Reasoning("Hm", 1, 1), Content("Hi", 1, 1), Complete(1, 1, 2, 5, "stop"))
    assert await chat_cli._stream("hi", client.base_url, None, live=True) == 0
    assert capsys.readouterr() == ("Hi\n", "reasoning: Hm\n")


async def test_a_failed_chat_has_no_text(client: StreambridgeClient, script: Script) -> None:
    script.entries = entries(*ATTEMPTS[:5], Failed("upstream broke", 1))
    outcome = await client.chat("hi")
    assert outcome.terminal == Failed("upstream broke", 1)
    assert outcome.text == "Half an answer"


async def test_unknown_event_types_are_skipped_but_resume_after_them(
    client: StreambridgeClient, script: Script
) -> None:
    script.entries = entries(
        Started(1, "m"), Content("a", 1, 1), ("future", b'{"type":"future"}'), Complete(1, 1, 1, 1)
    )
    script.plan = ["drop:3"]
    async with client.stream(created(script)) as stream:
        received = [item async for item in stream]
    assert [item.id for item in received] == ["1732400000000-0", "1732400000000-1", "1732400000000-3"]
    assert script.last_event_ids == [None, "1732400000000-2"]


async def test_a_known_event_that_does_not_decode_raises(client: StreambridgeClient, script: Script) -> None:
    script.entries = [("1-0", "content", b'{"type":"content","content":7}')]
    with pytest.raises(msgspec.ValidationError):
        async with client.stream(created(script)) as stream:
            await anext(stream)


async def test_an_unknown_chat_raises_not_found_without_retrying(client: StreambridgeClient, script: Script) -> None:
    await client.login_visitor()
    with pytest.raises(ClientError) as caught:
        await client.get_chat("nope")
    assert (caught.value.status, caught.value.code) == (404, "not_found")
    with pytest.raises(ClientError) as caught:
        async with client.stream("nope") as stream:
            await anext(stream)
    assert caught.value.code == "not_found"
    assert stream.reconnects == 0


async def test_a_stream_that_keeps_dropping_gives_up_after_max_reconnects(
    client: StreambridgeClient, script: Script
) -> None:
    script.entries = entries(*ATTEMPTS)
    script.plan = ["drop:2"] + ["drop:0"] * 10
    stream = client.stream(created(script))
    received: list[Received] = []
    with pytest.raises(ClientError) as caught:
        await drain(stream, into=received)
    assert caught.value.code == "stream_lost"
    assert len(received) == 2
    assert script.last_event_ids == [None] + ["1732400000000-1"] * 3
    assert stream.reconnects == 3


async def test_429_and_503_are_retried(client: StreambridgeClient, script: Script) -> None:
    script.entries = entries(*ATTEMPTS)
    script.plan = ["503", "429", "drop:1", "503"]
    async with client.stream(created(script)) as stream:
        received = [item.event async for item in stream]
    assert received == ATTEMPTS
    assert script.last_event_ids == [None, None, None, "1732400000000-0", "1732400000000-0"]


async def test_an_expired_stream_token_is_renewed_through_the_api(client: StreambridgeClient, script: Script) -> None:
    script.entries = entries(*ATTEMPTS)
    script.stream_url = "/v1/chats/c1/events?token=expired"
    async with client.stream(created(script)) as stream:
        with pytest.raises(ClientError) as caught:
            await anext(stream)
    assert caught.value.code == "unauthorized"  # no bearer token to renew it with

    await client.login_visitor()
    script.fresh_stream_url = client.base_url + "/v1/chats/c1/events?token=fresh"  # absolute, this time
    script.stream_tokens.add("fresh")
    async with client.stream(created(script)) as stream:
        received = [item.event async for item in stream]
    assert received == ATTEMPTS
    assert script.tokens == ["expired", "expired", "fresh"]


async def test_without_a_fresh_stream_url_the_bearer_route_is_used(client: StreambridgeClient, script: Script) -> None:
    script.entries = entries(*ATTEMPTS)
    script.stream_url = "/v1/chats/c1/events?token=expired"
    await client.login_visitor()
    async with client.stream(created(script)) as stream:
        received = [item.event async for item in stream]
    assert received == ATTEMPTS
    assert script.tokens == ["expired", None]


async def test_a_silent_connection_is_resumed_after_the_read_timeout(
    client: StreambridgeClient, script: Script, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "STREAM_READ_TIMEOUT", 0.2)
    script.entries = entries(*ATTEMPTS)
    script.plan = ["hang:5"]
    async with client.stream(created(script)) as stream:
        received = [item.event async for item in stream]
    assert received == ATTEMPTS
    assert script.last_event_ids == [None, "1732400000000-4"]


async def test_stopping_early_closes_the_stream(client: StreambridgeClient, script: Script) -> None:
    script.entries = entries(*ATTEMPTS)
    async with client.stream(created(script)) as stream:
        async for item in stream:
            if isinstance(item.event, Content):
                break
    assert stream.text == "Half an "
    assert stream.terminal is None


async def test_create_and_cancel(client: StreambridgeClient, script: Script) -> None:
    await client.login_visitor()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    chat = await client.create_chat(messages=messages, temperature=0.5, max_tokens=10)
    assert chat == ChatCreated("c1", "queued", script.stream_url, "2024-11-23T22:13:20Z")
    assert script.bodies == [{"messages": messages, "temperature": 0.5, "max_tokens": 10}]
    assert await client.cancel_chat("c1") == CancelAccepted("c1", "cancelled")


async def test_bad_arguments_raise_value_error(client: StreambridgeClient) -> None:
    with pytest.raises(ValueError, match="either message or messages"):
        await client.create_chat()
    with pytest.raises(ValueError, match="not a stream entry id"):
        client.stream("c1", last_event_id="latest")


async def test_ids_compare_as_numbers_not_strings(client: StreambridgeClient, script: Script) -> None:
    events: list[Event] = [Started(1, "m"), Content("a", 1, 1), Content("b", 2, 1), Complete(1, 2, 2, 1)]
    script.entries = [
        (entry_id, event_type(event), encode_event(event))
        for entry_id, event in zip(["9-0", "10-0", "10-9", "10-10"], events, strict=True)
    ]
    script.plan = ["drop:3"]
    script.honour_last_event_id = False
    async with client.stream(created(script)) as stream:
        received = [item async for item in stream]
    assert [item.id for item in received] == ["9-0", "10-0", "10-9", "10-10"]
    assert stream.text == "ab"


def test_retry_after_is_read_as_seconds_or_as_a_date() -> None:
    assert client_module._retry_after("3") == 3.0
    assert client_module._retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert client_module._retry_after("soon") is None
    assert client_module._retry_after(None) is None


async def test_an_unreachable_server_is_retried_then_given_up() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with StreambridgeClient(f"http://127.0.0.1:{port}", token="t", max_reconnects=2) as client:
        stream = client.stream("c1")
        with pytest.raises(ClientError) as caught:
            await drain(stream, into=[])
    assert caught.value.code == "stream_lost"
    assert isinstance(caught.value.__cause__, aiohttp.ClientConnectionError)
    assert stream.reconnects == 2
