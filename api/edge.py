"""The SSE edge: ``GET /v1/chats/{id}/events``, history first, then live, resumable by id."""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import Any, Final, NamedTuple

import msgspec
from aiohttp import HttpVersion11, web
from redis.exceptions import NoScriptError, RedisError, ResponseError

from streambridge.api.auth import bearer_token, load_secret, verify_stream_token
from streambridge.api.chats import chat_id_of
from streambridge.api.context import Context, context
from streambridge.api.credentials import Credential, Identity, check, genuine, identity_of, remember
from streambridge.api.credentials import credential_id as credential_id_of
from streambridge.api.slots import SlotRequest
from streambridge.api.sse import HEADERS, PING, encode_entry
from streambridge.shared import keys, logs, metrics, trace
from streambridge.shared.chats import TERMINAL_STATUSES
from streambridge.shared.errors import BadRequest, NotFound, StreamExpired, Unauthorized
from streambridge.shared.events import TERMINAL_TYPES
from streambridge.shared.streams import Entry, id_key, is_entry_id, trimmed

log = logging.getLogger("streambridge.edge")

routes = web.RouteTableDef()


@routes.get("/v1/chats/{id}/events")
async def chat_events(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    assert ctx.slots is not None, "the edge's hub and slots start with the app"
    chat_id = chat_id_of(request)
    last_event_id, slot = await admit(request, ctx, chat_id)
    metrics.OPEN_STREAMS.inc()
    try:
        return await stream(request, ctx, chat_id, last_event_id)
    finally:
        metrics.OPEN_STREAMS.dec()
        await asyncio.shield(ctx.slots.release(slot))


async def admit(request: web.Request, ctx: Context, chat_id: str) -> tuple[str | None, str]:
    """Checks the request and takes a stream slot; what it read is let go before the stream starts
    (an open stream's frame holds only what it needs: 10,000 of them add up).

    A credential this edge has seen before, presented genuinely (a signed stream token, or the
    bearer's secret checked against the remembered record), takes its slot in the same round trip
    as the reads: a credential never changes, and whether it still exists is read each time. A
    check that then fails gives the slot back at once.
    """
    assert ctx.slots is not None
    ip = request.remote or "unknown"
    credential_id = await credential_of(request, ctx, chat_id)
    known = ctx.credentials.get(credential_id)
    bearer = bearer_token(request)
    if known is not None and bearer is not None and not genuine(bearer, known.credential):
        known = None  # only the secret's holder may spend its user's streams
    ask = ctx.slots.ask(known.identity, ip) if known is not None else None
    slot = ask.slot if ask is not None else None  # held from here: given back on any failure
    try:
        state, refused = await chat_state(ctx, chat_id, credential_id, ask)
        credential, identity = authorize(request, ctx, chat_id, state)
        span = trace.decode(state.trace)
        logs.bind(chat_id=chat_id, user=identity.user, trace_id=span.trace_id if span is not None else None)
        last_event_id = parse_last_event_id(request)
        check_retained(chat_id, state, last_event_id)
        if ask is not None and known is not None and identity == known.identity and isinstance(refused, int):
            ctx.slots.settle(ask, refused)  # 429 if refused
        else:
            if slot is not None:
                held, slot = slot, None
                await ctx.slots.release(held)
            slot = await ctx.slots.acquire(identity, ip)
    except BaseException:
        if slot is not None:
            await asyncio.shield(ctx.slots.release(slot))
        raise
    assert slot is not None
    remember(ctx.credentials, credential, identity)
    return last_event_id, slot


class ChatState(NamedTuple):
    """What opening a stream needs to know, read in one round trip."""

    credential: bytes | None
    owner: bytes | None
    status: bytes | None
    stream: dict[str, Any] | None  # XINFO STREAM, None when the stream does not exist
    trace: bytes | None = None  # the chat's trace context (``shared.trace``), for the stream's log lines


async def chat_state(
    ctx: Context, chat_id: str, credential_id: str, ask: SlotRequest | None = None
) -> tuple[ChatState, Any]:
    """The chat's state, and the answer to ``ask`` (a stream slot) if given, in one round trip."""
    assert ctx.slots is not None
    async with ctx.redis.pipeline(transaction=False) as pipe:
        pipe.get(keys.credential(credential_id))
        if ask is not None:
            ctx.slots.add_to(pipe, ask)
        if ctx.streams is ctx.redis:  # one Redis: one round trip
            _read_chat(pipe, chat_id)
            record, *refused, (owner, status, trace_context), info = await pipe.execute(raise_on_error=False)
        else:  # the chat's own keys are on the streams Redis: both round trips at once
            async with ctx.streams.pipeline(transaction=False) as chat:
                _read_chat(chat, chat_id)
                (record, *refused), chat_answers = await asyncio.gather(
                    pipe.execute(raise_on_error=False), chat.execute(raise_on_error=False)
                )
            (owner, status, trace_context), info = chat_answers
    if isinstance(record, Exception):
        raise record
    if isinstance(info, ResponseError) and "no such key" in str(info).lower():
        info = None
    elif isinstance(info, Exception):
        raise info
    if refused and isinstance(refused[0], Exception) and not isinstance(refused[0], NoScriptError):
        raise refused[0]
    return ChatState(record, owner, status, info, trace_context), (refused[0] if refused else None)


def _read_chat(pipe: Any, chat_id: str) -> None:
    pipe.hmget(keys.chat(chat_id), ["owner", "status", "trace"])
    pipe.xinfo_stream(keys.events(chat_id))


async def stream(request: web.Request, ctx: Context, chat_id: str, last_event_id: str | None) -> web.StreamResponse:
    assert ctx.hub is not None
    settings = ctx.settings
    response = web.StreamResponse(headers=HEADERS)
    if request.version >= HttpVersion11:
        response.enable_chunked_encoding()  # what aiohttp would choose; said here, so writes.deliver knows
    await response.prepare(request)
    # From here on the status line is sent: trouble ends the response, and the client resumes.
    # So does a stream open too long, or too long without an event: a client holds a stream
    # only while it is of use, and picks it up again with Last-Event-ID at no loss.
    # The lifetime is checked at each write or heartbeat rather than by a timer of its own.
    end_of_life = asyncio.get_running_loop().time() + settings.stream_max_lifetime
    writes = ClientWrites(request, response, settings.stream_write_timeout, chat_id, end_of_life)
    tail = ctx.hub.tail(chat_id, last_event_id, idle=settings.heartbeat_interval, deliver=writes.deliver)
    opened, why = writes.now(), "client gone"
    if last_event_id is None:
        log.info("chat %s: stream opened", chat_id, extra={"event": "stream.opened"})
    else:
        extra = {"event": "stream.resumed", "last_event_id": last_event_id}
        log.info("chat %s: stream resumed after %s", chat_id, last_event_id, extra=extra)
    try:
        async with aclosing(tail):
            try:
                async for batch in tail:
                    if not batch:
                        writes.quiet += settings.heartbeat_interval
                        if writes.quiet >= settings.stream_idle_timeout:
                            why = "idle"
                            await writes.write(b": idle; reconnect with Last-Event-ID\n\n")
                            return response
                        await writes.write(PING)
                    else:
                        writes.quiet = 0.0
                        await writes.write(b"".join(map(encode_entry, batch)))
                    if writes.now() >= end_of_life and not (batch and batch[-1].type in TERMINAL_TYPES):
                        why = "lifetime"
                        await writes.write(b": lifetime; reconnect with Last-Event-ID\n\n")
                        return response
            except StreamExpired as exc:  # the client fell a whole stream's length behind
                why = "trimmed"
                metrics.EXPIRED_IN_STREAM.inc()
                log.info("chat %s: %s; ending the stream, its resume gets 410", chat_id, exc)
                await writes.write(b": trimmed; reconnect with Last-Event-ID\n\n")
                return response
        why = "ended"
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away
    except RedisError as exc:
        why = "redis error"
        metrics.REDIS_ERRORS_STREAM.inc()
        log.warning("chat %s: ending a stream on a Redis error (%s); the client will resume", chat_id, exc)
        response.force_close()
    finally:
        writes.stop()
        closed = {"event": "stream.closed", "reason": why, "duration_ms": round((writes.now() - opened) * 1000)}
        log.info("chat %s: stream closed (%s)", chat_id, why, extra=closed)
    return response


#: bytes a client's socket may hold unsent before live entries wait for its reader task instead
DIRECT_BUFFER: Final = 64 * 1024


class ClientWrites:
    """One stream's writes: awaited ones from its task, and live entries written at once by
    :meth:`deliver`, from the hub's reader.

    Aborts a stream whose client stopped reading: a write still waiting after ``timeout`` s.
    Its socket and buffers would otherwise be held until the stream's lifetime ran out. One timer
    per stream, re-armed every ``timeout / 2`` s, costs less than a timer around every write.
    """

    __slots__ = (
        "_chat_id",
        "_chunked",
        "_end",
        "_loop",
        "_request",
        "_response",
        "_sent",
        "_since",
        "_timeout",
        "_timer",
        "_transport",
        "quiet",
    )

    def __init__(
        self, request: web.Request, response: web.StreamResponse, timeout: float, chat_id: str, end_of_life: float
    ) -> None:
        self._request, self._response, self._timeout, self._chat_id = request, response, timeout, chat_id
        self._transport = request.transport  # None if the client already left
        self._chunked, self._end = response.chunked, end_of_life
        self._loop = asyncio.get_running_loop()
        self._since: float | None = None
        self._sent = False  # the response's headers are out, whether aiohttp sent them at once or with a write
        self._timer = self._loop.call_later(timeout / 2, self._check)
        self.quiet = 0.0  # seconds without an event, counted in heartbeats

    def deliver(self, entries: list[Entry], now: float) -> bool:
        """Writes live entries now, in one write, if the socket takes them without waiting, for a
        stream not past its lifetime; otherwise the stream's task gets them, and waits, stalls or
        ends as it must.

        Bypasses aiohttp's writer, whose coroutine would need the stream's task: the frame is the
        one aiohttp writes (a chunk, if the response is chunked), and only once a write through
        aiohttp has sent the headers, should aiohttp have held them back.
        """
        transport = self._transport
        if not self._sent or transport is None or transport.is_closing():
            return False
        if transport.get_write_buffer_size() > DIRECT_BUFFER or now >= self._end:
            return False
        transport.write(_frame(entries, self._chunked))
        self.quiet = 0.0
        return True

    async def write(self, data: bytes) -> None:
        self._since = self._loop.time()
        await self._response.write(data)
        self._since, self._sent = None, True

    def stop(self) -> None:
        self._timer.cancel()

    def now(self) -> float:
        return self._loop.time()

    def _check(self) -> None:
        if self._since is not None and self._loop.time() - self._since >= self._timeout:
            why = "a client stopped reading its stream; dropping it (it can resume)"
            log.info("chat %s: %s", self._chat_id, why, extra={"event": "stream.dropped"})
            if self._request.transport is not None:
                self._request.transport.abort()
            return
        self._timer = self._loop.call_later(self._timeout / 2, self._check)


#: the last batch framed, both ways: the hub hands one list to each reader of a chat in turn
_framed: tuple[list[Entry] | None, bool, bytes] = (None, False, b"")


def _frame(entries: list[Entry], chunked: bool) -> bytes:
    """The bytes that write ``entries``: SSE, in an HTTP/1.1 chunk if the response is chunked."""
    global _framed
    batch, was_chunked, frame = _framed
    if batch is not entries or was_chunked is not chunked:
        frame = encode_entry(entries[0]) if len(entries) == 1 else b"".join(map(encode_entry, entries))
        if chunked:
            frame = b"%x\r\n%b\r\n" % (len(frame), frame)
        _framed = (entries, chunked, frame)
    return frame


async def credential_of(request: web.Request, ctx: Context, chat_id: str) -> str:
    """The credential the request names: the stream URL's chat-scoped token's, or the bearer's.
    A stream token is checked here (it is signed); a bearer token once its record is read."""
    token = request.query.get("token")
    bearer = bearer_token(request)
    if token is not None and bearer is None:
        credential_id = verify_stream_token(ctx.secret, chat_id, token) or await verify_with_fresh_secret(
            ctx, chat_id, token
        )
        if credential_id is None:
            raise Unauthorized("the stream token is invalid or expired; GET /v1/chats/{id} gives a fresh stream_url")
        return credential_id
    if bearer is None:
        raise Unauthorized("send Authorization: Bearer <token>, or use the stream_url's token")
    return credential_id_of(bearer) or "-"


def authorize(request: web.Request, ctx: Context, chat_id: str, state: ChatState) -> tuple[Credential, Identity]:
    """The credential behind the request and its identity, if it stands and owns the chat; others get 404."""
    bearer = bearer_token(request)
    if request.query.get("token") is not None and bearer is None:
        if state.credential is None:
            raise Unauthorized("the stream token's credential was revoked or has expired")
        credential = msgspec.json.decode(state.credential, type=Credential)
    else:
        assert bearer is not None, "credential_of() refused a request with neither"
        credential = check(bearer, state.credential)
    identity = identity_of(ctx.settings, credential)
    if state.owner is None or state.owner.decode() != identity.user:
        raise NotFound(f"no chat {chat_id!r}")
    return credential, identity


async def verify_with_fresh_secret(ctx: Context, chat_id: str, token: str) -> str | None:
    """A token another process signed after the key changed (Redis lost it): re-read the key once."""
    if ctx.settings.secret:
        return None
    fresh = await load_secret(ctx.redis, None, ctx.secret)
    if fresh == ctx.secret:
        return None
    ctx.secret = fresh
    return verify_stream_token(fresh, chat_id, token)


def parse_last_event_id(request: web.Request) -> str | None:
    """The header's position, else the query's; either, if sent, must be a stream id (a malformed
    one is refused even where the other wins: it is a client's mistake worth hearing of)."""
    header, query = request.headers.get("Last-Event-ID"), request.query.get("last_event_id")
    for value in (header, query):
        if value and not is_entry_id(value.strip()):
            raise BadRequest(
                f"Last-Event-ID {value!r} is not a stream id like 1732400000000-0", code="bad_last_event_id"
            )
    value = header or query
    return value.strip() if value else None


def check_retained(chat_id: str, state: ChatState, last_event_id: str | None) -> None:
    """410 rather than a silent gap: the stream expired, or events after the client's position
    were trimmed; 400 for a position the stream never reached (it would wait forever)."""
    status, info = state.status, state.stream
    if info is None:
        if status is not None and status.decode() in TERMINAL_STATUSES:
            raise StreamExpired(f"chat {chat_id}'s event stream has expired; GET /v1/chats/{chat_id} has its result")
        if last_event_id is not None and last_event_id != "0-0":
            raise BadRequest(f"Last-Event-ID {last_event_id} is not an event of this chat", code="bad_last_event_id")
        return
    if last_event_id is not None and id_key(last_event_id) > id_key(info["last-generated-id"].decode()):
        raise BadRequest(f"Last-Event-ID {last_event_id} is ahead of this chat's stream", code="bad_last_event_id")
    if trimmed(info, last_event_id or "0-0"):
        raise StreamExpired(
            f"events after {last_event_id or 'the start'} were trimmed from chat {chat_id}'s stream; "
            f"GET /v1/chats/{chat_id} has the text so far"
        )
