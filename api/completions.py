"""OpenAI's Chat Completions, served from streambridge's chats: the openai SDK works unchanged.

``POST /v1/chat/completions`` admits a chat like ``POST /v1/chats`` and answers from its stream:
``chat.completion.chunk`` SSE (``stream: true``), or one ``chat.completion`` once it ends. Each
chunk names its chat and its cursor (the stream entry it came from) in a ``streambridge`` field,
and ``GET /v1/chat/completions/{id}/stream?after=CURSOR`` continues the same chunks after it, on
any edge, exactly once. The chunk stream carries no ``id:`` lines and heartbeats are a bare
``: ping`` line: the SDK's SSE decoder breaks on either otherwise (openai-python #2722, #3833).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from collections.abc import Callable
from contextlib import aclosing
from typing import Any, Final

import msgspec
from aiohttp import web
from redis.exceptions import RedisError

from streambridge.api.chats import (
    Idempotency,
    admit,
    completion_request,
    creator,
    ended_and_expired,
    idempotency_key_of,
    json_object,
    model_of,
    owned_chat,
    read_body,
    stream_gone,
    unix,
)
from streambridge.api.context import Context, context
from streambridge.api.edge import ClientWrites
from streambridge.api.errors import error_body
from streambridge.api.retold import from_result
from streambridge.api.telling import Begun, Called, Diverged, Said, Telling
from streambridge.shared import keys, metrics
from streambridge.shared.chats import decode_request, decode_result
from streambridge.shared.errors import BadRequest, StreamExpired
from streambridge.shared.events import (
    Cancelled,
    Complete,
    Content,
    Failed,
    Started,
    ToolCallFragment,
    Usage,
    assemble_reasoning,
    assemble_tool_calls,
    decode_event,
)
from streambridge.shared.streams import Entry, id_key, is_entry_id, stream_info

log = logging.getLogger("streambridge.api")

routes = web.RouteTableDef()

HEADERS: Final = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
PING: Final = b": ping\n"  # no blank line after it: the SDK would take the block for an event
DONE: Final = b"data: [DONE]\n\n"

#: how long past a chat's deadline an SDK retry (``x-stainless-retry-count``) of an identical
#: request still finds its first chat
RETRY_WINDOW: Final = 600


#: a cursor's mark for the finish chunk, where a usage chunk of the same entry follows it
FINISHED: Final = ":finish"


@routes.post("/v1/chat/completions")
async def create_completion(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    identity = await creator(request, ctx)
    body = await read_body(request, ctx)
    control, chat = completion_request(json_object(body))
    include_usage = control.stream_options is not None and bool(control.stream_options.include_usage)
    assert ctx.slots is not None, "served by edges, which have slots"
    # A slot first, for a wait as for a stream (both hold a connection and a feed for as long as
    # the chat runs): a 429 for too many must come before a chat that nobody reads.
    slot = await ctx.slots.acquire(identity, request.remote or "unknown")
    handed = False
    try:
        chat_id, created_at = await admit(request, ctx, identity, chat, idempotency(request, ctx, body))
        gone = created_at is None and await ended_and_expired(ctx, chat_id)  # a retry, long after
        if gone and (control.stream or not await ctx.streams.exists(keys.chat(chat_id))):
            raise StreamExpired(f"chat {chat_id} ended and its stream expired; GET /v1/chats/{chat_id} has its result")
        if not control.stream:
            return await completion(ctx, chat_id, gone)
        handed = True
    finally:
        if not handed:
            await asyncio.shield(ctx.slots.release(slot))
    return await stream_chunks(request, ctx, slot, chat_id, None, include_usage)


@routes.get("/v1/chat/completions/{id}/stream")
async def resume_completion(request: web.Request) -> web.StreamResponse:
    """The chunk stream again, after ``after`` (a chunk's ``streambridge.cursor``): exactly what followed it."""
    ctx = context(request)
    identity, chat_id, _ = await owned_chat(request, ctx)
    unknown = sorted(set(request.query) - {"after", "include_usage"})
    if unknown:  # a typo (`starting_after`, say) would otherwise replay everything, silently
        raise BadRequest(f"unknown query parameter `{unknown[0]}`", code="invalid_request", param=unknown[0])
    after = request.query.get("after") or None
    if after is not None and not is_entry_id(after.removesuffix(FINISHED)):
        raise BadRequest(f"`after` must be a chunk's cursor, not {after!r}", code="bad_cursor", param="after")
    include_usage = request.query.get("include_usage", "false")
    if include_usage not in {"true", "false"}:
        raise BadRequest("`include_usage` must be true or false", code="invalid_request", param="include_usage")
    if await stream_gone(ctx, chat_id):
        raise StreamExpired(f"the chat's stream has expired; GET /v1/chats/{chat_id} has its result")
    if after is not None:
        await check_reached(ctx, chat_id, after)
    assert ctx.slots is not None, "served by edges, which have slots"
    slot = await ctx.slots.acquire(identity, request.remote or "unknown")
    return await stream_chunks(request, ctx, slot, chat_id, after, include_usage == "true")


async def check_reached(ctx: Context, chat_id: str, after: str) -> None:
    """A cursor the stream never reached (another chat's, made up, mistyped) is a 400, as a native
    ``Last-Event-ID`` is: else a finished chat would answer an empty 200 and a running one hold a
    silent stream until its end. A running chat's is judged against what it has produced so far."""
    info = await stream_info(ctx.streams, keys.events(chat_id))
    last = info["last-generated-id"].decode() if info is not None else "0-0"
    entry = after.removesuffix(FINISHED)
    if id_key(entry) > id_key(last):
        message = f"`after` {after} is past the end of chat {chat_id}'s stream (its last cursor so far is {last})"
        raise BadRequest(message, code="bad_cursor", param="after")
    if entry != after and entry != last:  # only the end's finish chunk has such a cursor
        message = f"`after` {after} names no finish chunk: only the chat's last entry ({last}) has one"
        raise BadRequest(message, code="bad_cursor", param="after")


def idempotency(request: web.Request, ctx: Context, body: bytes) -> Idempotency:
    """The caller's ``Idempotency-Key``; else the body itself, so that the openai SDK's own retry of
    a request whose answer it lost (it says so in ``x-stainless-retry-count``) finds the chat the
    first try made, while the same question asked afresh is a new chat."""
    key = idempotency_key_of(request)
    if key is not None:
        return Idempotency(key)
    retry = request.headers.get("x-stainless-retry-count", "0")
    digest = hashlib.sha256(body).hexdigest()
    # as long as a chat may run, and then some: the SDK's own timeout (600 s) may come first
    window = int(ctx.settings.chat_deadline) + RETRY_WINDOW
    return Idempotency(f"sdk-retry:{digest}", replay=retry not in {"", "0"}, ttl=window)


async def stream_chunks(
    request: web.Request, ctx: Context, slot: str, chat_id: str, after: str | None, include_usage: bool
) -> web.StreamResponse:
    """The chunks after ``after`` (all without it), in the slot given, which it gives back."""
    assert ctx.hub is not None, "served by edges, which have a hub"
    assert ctx.slots is not None
    response = web.StreamResponse(headers=HEADERS)
    chunks = Chunks(chat_id, include_usage)
    writes = stalls_dropped(request, ctx, response, chat_id)
    metrics.OPEN_STREAMS.inc()
    try:
        await response.prepare(request)
        skip = id_key(after.removesuffix(FINISHED)) if after is not None else None
        # after the finish chunk of the chat's last entry: what that entry said after it, the usage
        finished = after.removesuffix(FINISHED) if after is not None and after.endswith(FINISHED) else None
        # From the start, always: the chunks are a function of the whole stream (a retried attempt
        # is matched against what was shown), so a resume regenerates them and sends what follows.
        tail = ctx.hub.tail(chat_id, None, idle=ctx.settings.heartbeat_interval)
        async with aclosing(tail):
            async for batch in tail:
                if not batch:
                    await writes.write(PING)
                    continue
                out = []
                for entry in batch:
                    data = chunks.feed(entry)
                    if skip is None or id_key(entry.id) > skip:
                        out.append(data)
                    elif entry.id == finished and chunks.ended:
                        out.append(chunks.after_finish)
                    elif data.endswith(DONE):  # resumed after the last chunk: the end is still said
                        out.append(DONE)
                if out:
                    await writes.write(b"".join(out))
                if chunks.ended:
                    break
        if not chunks.ended:  # the edge is stopping: say so, or the SDK takes the cut for the end
            await writes.write(chunks.interrupted())
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away; the chat goes on, and its stream can be resumed
    except (RedisError, StreamExpired) as exc:
        # a stream trimmed past its start cannot be told again (the chunks are a function of all of it)
        expired = isinstance(exc, StreamExpired)
        (metrics.EXPIRED_IN_STREAM if expired else metrics.REDIS_ERRORS_STREAM).inc()
        log.warning("chat %s: ending a chunk stream (%s)", chat_id, exc)
        with contextlib.suppress(ConnectionResetError):
            await writes.write(chunks.expired() if expired else chunks.interrupted())
        response.force_close()
    finally:
        writes.stop()
        metrics.OPEN_STREAMS.dec()
        await asyncio.shield(ctx.slots.release(slot))
    return response


def stalls_dropped(request: web.Request, ctx: Context, response: web.StreamResponse, chat_id: str) -> ClientWrites:
    """The stream's writes, its client dropped once it stops reading (as the native stream does);
    no lifetime of their own: a chat's deadline ends its stream."""
    return ClientWrites(request, response, ctx.settings.stream_write_timeout, chat_id, math.inf)


async def completion(ctx: Context, chat_id: str, gone: bool = False) -> web.Response:
    """The ``chat.completion`` once the chat ends: from its stream, or from its result if the stream is ``gone``."""
    assert ctx.hub is not None, "served by edges, which have a hub"
    if gone:
        chat = await ctx.streams.hgetall(keys.chat(chat_id))  # type: ignore[misc]
        asked = decode_request(chat[b"request"]) if b"request" in chat else None
        events = from_result(model_of(ctx, asked), decode_result(chat[b"result"]))
        first = unix(chat.get(b"created_at", b"").decode())
    else:
        entries: list[Entry] = []
        tail = ctx.hub.tail(chat_id, None, idle=ctx.settings.heartbeat_interval)
        async with aclosing(tail):
            async for batch in tail:
                entries += batch
        events = [decode_event(e.data) for e in entries]
        first = created(entries[0].id) if entries else 0
    end = events[-1] if events else None
    if isinstance(end, Failed):
        return refused(end)
    if isinstance(end, Cancelled):
        return error(409, "cancelled", "the chat was cancelled", retry=False)
    if not isinstance(end, Complete):
        return error(503, "unavailable", "the edge is shutting down; send the request again")
    started = next(e for e in reversed(events) if isinstance(e, Started))
    text = "".join(e.content for e in events if isinstance(e, Content) and e.attempt == end.attempt)
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    tool_calls = assemble_tool_calls(events)
    if tool_calls:
        message.update(content=text or None, tool_calls=msgspec.to_builtins(tool_calls))
    reasoning = assemble_reasoning(events)
    if reasoning:
        message["reasoning_content"] = reasoning
    body = {
        "id": f"chatcmpl-{chat_id}",
        "object": "chat.completion",
        "created": first,
        "model": started.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": end.finish_reason or "stop",
                "logprobs": None,
            }
        ],
        "usage": usage_of(end.usage),
        "streambridge": {"chat_id": chat_id},
    }
    return web.Response(body=msgspec.json.encode(body), content_type="application/json")


def created(entry_id: str) -> int:
    """Unix seconds of a stream entry id: the chat's first entry stands for when it was created."""
    return int(entry_id.partition("-")[0]) // 1000


def error(status: int, code: str, message: str, param: str | None = None, *, retry: bool = True) -> web.Response:
    body = error_body(status, code, message, param)
    # the SDK retries 409 and 5xx by itself, unless told not to; a chat that ended has its answer
    headers = {} if retry else {"x-should-retry": "false"}
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


#: an upstream's refusal of the request itself, passed on as it said it (OpenAI answers 422 as 400)
PASSED_ON: Final = {400: 400, 404: 404, 413: 413, 422: 400}


def refused(end: Failed, name: Callable[[str], str] | None = None) -> web.Response:
    """A failed chat's answer: the upstream's own refusal of the request (a bad field, an unknown
    model, a prompt too long) as it gave it, its ``param`` as the route names it (``name``); 502
    for anything else (the worker already retried)."""
    param = name(end.param) if name is not None and end.param else end.param
    status = PASSED_ON.get(end.upstream_status or 0)
    if status is None:
        return error(502, end.code or "upstream_failed", end.message, param, retry=False)
    return error(status, end.code or "upstream_rejected", end.message, param, retry=False)


def usage_of(usage: Usage | None) -> dict[str, Any] | None:
    """OpenAI's usage object, with the upstream's breakdowns where it sent them."""
    if usage is None:
        return None
    return {k: v for k, v in msgspec.to_builtins(usage).items() if v is not None}


class Chunks:
    """A chat's events as ``chat.completion.chunk`` SSE, one entry at a time.

    A pure function of the stream (see :mod:`streambridge.api.telling` for what a retried attempt
    shows), so a resume that feeds the same entries gets the same chunks.
    """

    def __init__(self, chat_id: str, include_usage: bool) -> None:
        self.chat_id, self.include_usage = chat_id, include_usage
        self.telling = Telling()
        self.created = 0
        self.cursor = ""  # the last entry fed
        self.ended = False
        self.after_finish = DONE  # what the last entry says after its finish chunk

    @property
    def model(self) -> str:
        return self.telling.model

    def feed(self, entry: Entry) -> bytes:
        if self.ended:
            return b""
        self.cursor = entry.id
        self.created = self.created or created(entry.id)
        told = self.telling.feed(decode_event(entry.data))
        if isinstance(told, Begun):
            return self._chunk(entry.id, {"role": "assistant", "content": ""})
        if isinstance(told, Said):
            field = "content" if told.kind == "content" else "reasoning_content"
            return self._chunk(entry.id, {field: told.text})
        if isinstance(told, Called):
            return self._chunk(entry.id, {"tool_calls": [tool_call_delta(told.fragment, told.first)]})
        if isinstance(told, Complete):
            return self._complete(entry.id, told)
        if isinstance(told, Diverged):
            return self._diverged(entry.id)
        if isinstance(told, Failed):
            return self._error(entry.id, told.code or "upstream_failed", told.message, told.param)
        if isinstance(told, Cancelled):
            return self._error(entry.id, "cancelled", "the chat was cancelled")
        return b""

    def _complete(self, cursor: str, event: Complete) -> bytes:
        self.ended = True
        if not self.include_usage:
            return self._chunk(cursor, {}, event.finish_reason or "stop") + DONE
        # two chunks of one entry: the first's cursor says the second is still to come
        finish = self._chunk(cursor + FINISHED, {}, event.finish_reason or "stop")
        self.after_finish = self._data(cursor, [], usage_of(event.usage)) + DONE
        return finish + self.after_finish

    def _chunk(self, cursor: str, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return self._data(cursor, [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}])

    def _data(self, cursor: str, choices: list[Any], usage: dict[str, Any] | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": f"chatcmpl-{self.chat_id}",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "streambridge": {"chat_id": self.chat_id, "cursor": cursor},
        }
        if usage is not None or not choices:
            chunk["usage"] = usage
        return b"data: %s\n\n" % msgspec.json.encode(chunk)

    def interrupted(self) -> bytes:
        """An error for a stream cut short, naming the cursor to resume after."""
        message = (
            f"the stream was interrupted; resume at /v1/chat/completions/{self.chat_id}/stream?after={self.cursor}"
        )
        return self._error(self.cursor, "stream_interrupted", message)

    def expired(self) -> bytes:
        message = f"the stream was trimmed and cannot be resumed; GET /v1/chats/{self.chat_id} has the result"
        return self._error(self.cursor, "stream_expired", message)

    def _diverged(self, cursor: str) -> bytes:
        message = "the upstream failed mid-answer and its retry answered differently; ask again"
        return self._error(cursor, "retry_diverged", message)

    def _error(self, cursor: str, code: str, message: str, param: str | None = None) -> bytes:
        self.ended = True
        error = msgspec.json.decode(error_body(502, code, message, param))
        error["streambridge"] = {"chat_id": self.chat_id, "cursor": cursor}
        return b"data: %s\n\n" % msgspec.json.encode(error)


def tool_call_delta(event: ToolCallFragment, first: bool) -> dict[str, Any]:
    """A fragment as OpenAI streams it: ``id``, ``type`` and the name with a call's first fragment
    only (the SDK joins whatever repeats), an id made up where the upstream sent none."""
    function: dict[str, Any] = {"arguments": event.arguments}
    delta: dict[str, Any] = {"index": event.index, "function": function}
    if first:
        delta.update(id=event.id or f"call_{event.index}", type="function")
        function["name"] = event.name or ""
    return delta
