"""OpenAI's Responses API, background and resumable, over any upstream's Chat Completions.

``POST /v1/responses`` admits a chat as the other create routes do and answers as OpenAI does:
the response object once it ends, at once when ``background``, or its events (``stream``).
``GET /v1/responses/{id}`` reads the object, or with ``stream=true`` replays the events from
``sequence_number`` 0 and goes on live, sending only those above ``starting_after``: a client
that dropped continues exactly where it stopped, on any edge (the openai SDK's
``responses.retrieve(id, stream=True, starting_after=n)`` and ``responses.stream(response_id=id,
starting_after=n)`` both work). The stream carries no ``id:`` lines: the SDK's SSE decoder breaks
on them (openai-python #2722), and ``sequence_number`` is the Responses API's own cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from contextlib import aclosing
from typing import Any, Final

import msgspec
from aiohttp import web
from redis.exceptions import RedisError

from streambridge.api.chats import (
    Idempotency,
    admit,
    creator,
    ended_and_expired,
    json_object,
    model_of,
    owned_chat,
    read_body,
    read_stream,
    request_cancel,
    stream_gone,
    unix,
)
from streambridge.api.completions import HEADERS, idempotency, refused, stalls_dropped
from streambridge.api.context import Context, context
from streambridge.api.credentials import Identity
from streambridge.api.response_stream import Echo, ResponseStream
from streambridge.api.responses_request import parse_responses, renamed, responses_param
from streambridge.api.retold import from_result, so_far
from streambridge.shared import keys, metrics
from streambridge.shared.chats import TERMINAL_STATUSES, ChatRequest, decode_request, decode_result
from streambridge.shared.errors import ApiError, BadRequest, NotFound, StreamExpired, Unavailable
from streambridge.shared.events import (
    Cancelled,
    Complete,
    Failed,
    decode_event,
)

log = logging.getLogger("streambridge.api")

routes = web.RouteTableDef()

RESPONSE_ID: Final = re.compile(r"\Aresp_([0-9a-f]{32})\Z")
#: how long a cancel waits for a running response's worker to stop it, to answer with the outcome
CANCEL_WAIT: Final = 5.0
#: the hash field that keeps what a response object repeats of its request
ECHO_FIELD: Final = "responses"

_echo_decoder: Final = msgspec.json.Decoder(Echo)


@routes.post("/v1/responses")
async def create_response(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    identity = await creator(request, ctx)
    body = await read_body(request, ctx)
    asked, chat, echo = parse_responses(json_object(body))
    assert ctx.slots is not None, "served by edges, which have slots"
    slot = None
    if asked.stream or not asked.background:
        # a slot first, for a wait as for a stream: a 429 must come before a response nobody reads
        slot = await ctx.slots.acquire(identity, request.remote or "unknown")
    handed = False
    try:
        chat_id, created_at = await admit_response(request, ctx, identity, chat, idempotency(request, ctx, body))
        if created_at is not None:  # a first request, not the SDK's retry of one
            await ctx.streams.hset(keys.chat(chat_id), mapping={ECHO_FIELD: msgspec.json.encode(echo)})  # type: ignore[misc]
        else:
            echo = await read_echo(ctx, chat_id) or echo
        story = ResponseStream(chat_id, echo, unix(created_at or await created_of(ctx, chat_id)), model_of(ctx, chat))
        gone = created_at is None and await ended_and_expired(ctx, chat_id)  # a retry, long after
        if gone and (asked.stream or not await ctx.streams.exists(keys.chat(chat_id))):
            message = f"the response ended and its events expired; GET /v1/responses/resp_{chat_id} has it"
            raise StreamExpired(message)
        if gone or (created_at is None and asked.background and not asked.stream):
            # a retry of a create that was answered: the response as it is now, or as it ended
            return await answered(ctx, story, await chat_of(ctx, chat_id), wait=not asked.background)
        if asked.background and not asked.stream:
            story.begin()
            return json(story.snapshot())
        if not asked.stream:
            return await told_whole(ctx, story)
        handed = True
    finally:
        if slot is not None and not handed:
            await asyncio.shield(ctx.slots.release(slot))
    assert slot is not None
    return await stream_events(request, ctx, slot, story, None)


async def admit_response(
    request: web.Request, ctx: Context, identity: Identity, chat: ChatRequest, idempotency: Idempotency
) -> tuple[str, str | None]:
    """``admit``, its refusals naming the fields as the Responses request has them."""
    try:
        return await admit(request, ctx, identity, chat, idempotency)
    except ApiError as exc:
        raise renamed(exc) from None


@routes.get("/v1/responses/{id}")
async def read_response(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    stream, after = stream_query(request)
    identity, chat_id, chat = await owned_response(request, ctx)
    story = story_of(ctx, chat_id, chat)
    if not stream:
        return json(await object_of(ctx, story, chat))
    if await stream_gone(ctx, chat_id):
        raise StreamExpired(f"the response's events have expired; GET /v1/responses/resp_{chat_id} has it")
    assert ctx.slots is not None, "served by edges, which have slots"
    # the slot first: the check below reads the whole stream, which a caller's stream limit must bound
    slot = await ctx.slots.acquire(identity, request.remote or "unknown")
    if after is not None:
        try:
            await check_reached(ctx, story_of(ctx, chat_id, chat), after)
        except BaseException:
            await asyncio.shield(ctx.slots.release(slot))
            raise
    return await stream_events(request, ctx, slot, story, after)


@routes.post("/v1/responses/{id}/cancel")
async def cancel_response(request: web.Request) -> web.Response:
    """Idempotent; a response that already ended otherwise is a 400, as OpenAI answers it."""
    ctx = context(request)
    identity, chat_id, chat = await owned_response(request, ctx)
    status = chat.get(b"status", b"").decode()
    if status in {"complete", "failed"}:
        state = "completed" if status == "complete" else "failed"
        raise BadRequest(f"cannot cancel a response that has {state}", code="invalid_request")
    if status != "cancelled":
        status = await request_cancel(ctx, chat_id, identity.user)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT):
                while status not in TERMINAL_STATUSES:  # the worker stops it at its next event
                    await asyncio.sleep(0.05)
                    status = (await ctx.streams.hget(keys.chat(chat_id), "status") or b"").decode()  # type: ignore[misc]
    fresh: dict[bytes, bytes] = await ctx.streams.hgetall(keys.chat(chat_id))  # type: ignore[misc]
    return json(await object_of(ctx, story_of(ctx, chat_id, fresh or chat), fresh or chat))


async def check_reached(ctx: Context, story: ResponseStream, after: int) -> None:
    """A ``starting_after`` above the last event the response has produced so far (all of them,
    once it ended) is a 400: else a finished response would answer an empty 200 and a running one
    hold a silent stream until its end. The events are numbered by replaying the stream, as the
    stream itself will (``story`` is used up)."""
    story.begin()
    for entry in await read_stream(ctx, story.chat_id):
        story.feed(decode_event(entry.data))
    if after > story.seq:
        message = f"`starting_after` {after} is past the response's last event so far ({story.seq})"
        raise BadRequest(message, code="invalid_request", param="starting_after")


def stream_query(request: web.Request) -> tuple[bool, int | None]:
    """``stream`` and ``starting_after``; the SDK's ``include`` and ``include_obfuscation`` are taken."""
    unknown = sorted(set(request.query) - {"stream", "starting_after", "include", "include[]", "include_obfuscation"})
    if unknown:  # a typo would otherwise replay everything, silently
        raise BadRequest(f"unknown query parameter `{unknown[0]}`", code="invalid_request", param=unknown[0])
    stream = query_one(request, "stream", {"true", "false"}) == "true"
    query_one(request, "include_obfuscation", {"true", "false"})
    after = query_one(request, "starting_after", None)
    if after is not None and not (after.isascii() and after.isdigit() and len(after) <= 18):
        raise BadRequest(
            "`starting_after` must be an event's sequence_number", code="invalid_request", param="starting_after"
        )
    if after is not None and not stream:
        raise BadRequest("`starting_after` needs `stream=true`", code="invalid_request", param="starting_after")
    return stream, int(after) if after is not None else None


def query_one(request: web.Request, name: str, allowed: set[str] | None) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1 or (values and allowed is not None and values[0] not in allowed):
        expected = " or ".join(sorted(allowed or ())) or "one value"
        raise BadRequest(f"`{name}` must be {expected}", code="invalid_request", param=name)
    return values[0] if values else None


async def owned_response(request: web.Request, ctx: Context) -> tuple[Any, str, dict[bytes, bytes]]:
    found = RESPONSE_ID.match(request.match_info["id"])
    if found is None:
        raise NotFound(f"no response {request.match_info['id'][:64]!r}")
    return await owned_chat(request, ctx, found.group(1))


def story_of(ctx: Context, chat_id: str, chat: dict[bytes, bytes]) -> ResponseStream:
    echo = _echo_decoder.decode(chat[ECHO_FIELD.encode()]) if ECHO_FIELD.encode() in chat else Echo()
    asked = decode_request(chat[b"request"]) if b"request" in chat else None
    model = echo.model or model_of(ctx, asked)
    return ResponseStream(chat_id, echo, unix(chat.get(b"created_at", b"").decode()), model)


async def read_echo(ctx: Context, chat_id: str) -> Echo | None:
    data = await ctx.streams.hget(keys.chat(chat_id), ECHO_FIELD)  # type: ignore[misc]
    return _echo_decoder.decode(data) if data else None


async def created_of(ctx: Context, chat_id: str) -> str:
    return (await ctx.streams.hget(keys.chat(chat_id), "created_at") or b"").decode()  # type: ignore[misc]


def json(value: dict[str, Any]) -> web.Response:
    return web.Response(body=msgspec.json.encode(value), content_type="application/json")


async def object_of(ctx: Context, story: ResponseStream, chat: dict[bytes, bytes]) -> dict[str, Any]:
    """The response object, as the chat says it now: its result once it ended (it outlives the
    stream), else its latest attempt so far; never an earlier attempt's words, as a stream may
    have to keep them (``api.telling``)."""
    story.begin()
    if b"result" in chat:
        events = from_result(story.model, decode_result(chat[b"result"]))
    else:
        events = so_far([decode_event(entry.data) for entry in await read_stream(ctx, story.chat_id)])
    for event in events:
        story.feed(event)
    if story.status == "queued" and chat.get(b"status") == b"running":
        story.status = "in_progress"  # its `started` is trimmed away, or not yet appended
    return story.snapshot()


async def answered(ctx: Context, story: ResponseStream, chat: dict[bytes, bytes], *, wait: bool) -> web.Response:
    """The object; for a create that waited, a failure answers as it did the first time."""
    if wait and b"result" in chat:
        end = from_result(story.model, decode_result(chat[b"result"]))[-1]
        if isinstance(end, Failed):
            return refused(end, responses_param)
    return json(await object_of(ctx, story, chat))


async def chat_of(ctx: Context, chat_id: str) -> dict[bytes, bytes]:
    return await ctx.streams.hgetall(keys.chat(chat_id))  # type: ignore[no-any-return,misc]


async def told_whole(ctx: Context, story: ResponseStream) -> web.Response:
    """Waits for the response to end, and answers with its object; an upstream's refusal of the
    request, or a failure of every attempt, as the chunk route answers them."""
    assert ctx.hub is not None, "served by edges, which have a hub"
    end = None
    tail = ctx.hub.tail(story.chat_id, None, idle=ctx.settings.heartbeat_interval)
    async with aclosing(tail):
        async for batch in tail:
            end = batch[-1] if batch else end
    ended = decode_event(end.data) if end is not None else None
    if isinstance(ended, Failed):
        return refused(ended, responses_param)
    if not isinstance(ended, Complete | Cancelled):
        raise Unavailable("the edge is stopping; GET /v1/responses/{id} reads the response", code="unavailable")
    return json(await object_of(ctx, story, await chat_of(ctx, story.chat_id)))


def sse(event: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event["type"].encode(), msgspec.json.encode(event))


async def stream_events(
    request: web.Request, ctx: Context, slot: str, story: ResponseStream, after: int | None
) -> web.StreamResponse:
    """The response's events numbered above ``after`` (all without it), in the slot given, which it gives back."""
    assert ctx.hub is not None, "served by edges, which have a hub"
    assert ctx.slots is not None
    skip = -1 if after is None else after
    response = web.StreamResponse(headers=HEADERS)
    writes = stalls_dropped(request, ctx, response, story.chat_id)
    metrics.OPEN_STREAMS.inc()
    try:
        await response.prepare(request)
        out = b"".join(sse(e) for e in story.begin() if e["sequence_number"] > skip)
        if out:
            await writes.write(out)
        # from the start, always: the events are a function of the whole stream, so a resume
        # regenerates them and sends those numbered after the client's last
        tail = ctx.hub.tail(story.chat_id, None, idle=ctx.settings.heartbeat_interval)
        async with aclosing(tail):
            async for batch in tail:
                if not batch:
                    await writes.write(sse(story.keepalive()))
                    continue
                events = [e for entry in batch for e in story.feed(decode_event(entry.data))]
                out = b"".join(sse(e) for e in events if e["sequence_number"] > skip)
                if out:
                    await writes.write(out)
                if story.ended:
                    break
        if not story.ended:  # the edge is stopping: say so, or the SDK takes the cut for the end
            await writes.write(sse(story.interrupted()))
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away; the response goes on, and its stream can be resumed
    except (RedisError, StreamExpired) as exc:
        # a stream trimmed past its start cannot be told again (the events are a function of all of it)
        expired = isinstance(exc, StreamExpired)
        (metrics.EXPIRED_IN_STREAM if expired else metrics.REDIS_ERRORS_STREAM).inc()
        log.warning("chat %s: ending a response stream (%s)", story.chat_id, exc)
        with contextlib.suppress(ConnectionResetError):
            await writes.write(sse(story.expired() if expired else story.interrupted()))
        response.force_close()
    finally:
        writes.stop()
        metrics.OPEN_STREAMS.dec()
        await asyncio.shield(ctx.slots.release(slot))
    return response
