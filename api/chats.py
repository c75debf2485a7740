"""The API's routes: visitor login, create / read / cancel a chat, health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Final, NamedTuple, cast

import msgspec
from aiohttp import web
from redis.exceptions import RedisError

from streambridge.api.auth import authenticate, bearer_token, sign_stream_token
from streambridge.api.context import Context, context
from streambridge.api.credentials import Identity, create_visitor, recall
from streambridge.api.limits import IDEMPOTENCY_TTL, admit_chat, bounded, check_prompt, count_visitor_login
from streambridge.shared import keys, logs, machine, metrics, trace
from streambridge.shared.chats import (
    REQUEST_FIELDS,
    TERMINAL_STATUSES,
    VENDOR_FIELD,
    ChatRequest,
    Status,
    decode_result,
)
from streambridge.shared.errors import BadRequest, NotFound, RequestTimeout, Unauthorized, Unavailable, Unprocessable
from streambridge.shared.events import (
    ToolCall,
    Usage,
    assemble_reasoning,
    assemble_text,
    assemble_tool_calls,
    decode_event,
)
from streambridge.shared.streams import Entry, entry_from_fields, stream_info, trimmed

log = logging.getLogger("streambridge.api")

routes = web.RouteTableDef()


class Visitor(msgspec.Struct):
    token: str
    user: str


class Created(msgspec.Struct):
    id: str
    status: Status
    stream_url: str
    created_at: str


QUEUE_POSITION: Final = (
    "Only while `status` is `queued`: the chat's place in the deployment's queue, 1 being the next to "
    "start. It counts every user's chats waiting ahead of this one, so it may jump by more than one."
)


class ChatView(msgspec.Struct, omit_defaults=True):
    id: str
    status: Status
    content: str
    finish_reason: str | None
    usage: Usage | None
    attempts: int
    error: str | None
    created_at: str
    stream_url: str
    reasoning: str | None = None  # left out unless the model sent reasoning
    tool_calls: list[ToolCall] | None = None  # left out unless the model called tools
    # left out unless the chat is queued (see :func:`queue_position`)
    queue_position: Annotated[int, msgspec.Meta(ge=1, description=QUEUE_POSITION)] | None = None


class StatusView(msgspec.Struct):
    id: str
    status: Status


def json_response(value: msgspec.Struct, status: int = 200) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(value), content_type="application/json")


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    try:
        async with asyncio.timeout(2):
            await context(request).redis.ping()
    except Exception as exc:
        log.warning("health check: Redis is unreachable: %s", exc)
        raise Unavailable("Redis is unreachable") from None
    return web.json_response({"status": "ok"})


@routes.post("/v1/auth/visitor")
async def visitor_login(request: web.Request) -> web.Response:
    ctx = context(request)
    await count_visitor_login(ctx.redis, ctx.settings, request.remote or "unknown")
    token, user = await create_visitor(ctx.redis, ctx.settings.visitor_token_ttl)
    return json_response(Visitor(token, user), status=201)


@routes.post("/v1/chats")
async def create_chat(request: web.Request) -> web.Response:
    ctx = context(request)
    identity = await creator(request, ctx)
    chat = parse_create(await read_body(request, ctx))
    chat_id, created_at = await admit(request, ctx, identity, chat, Idempotency(idempotency_key_of(request)))
    status: Status = "queued"
    replayed = created_at is None
    if created_at is None:  # the key's first request made it: answer as that one was answered
        status, created_at = await status_of(ctx, chat_id)
    response = json_response(Created(chat_id, status, stream_url(request, ctx, chat_id, identity), created_at), 202)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


async def creator(request: web.Request, ctx: Context) -> Identity:
    """Who creates a chat. A credential this process has seen is not read again: admission checks,
    in its one round trip, that it still exists (revoked or expired, it does not)."""
    token = bearer_token(request)
    remembered = recall(ctx.credentials, token) if token is not None else None
    return remembered or await authenticate(request, ctx.redis, ctx.settings, ctx.credentials)


class Idempotency(NamedTuple):
    """What makes a create safe to send again: a key, and whether a request under it is taken for
    a repeat of the first (else it only records its chat for a later retry)."""

    key: str | None
    replay: bool = True
    ttl: int = IDEMPOTENCY_TTL


async def admit(
    request: web.Request, ctx: Context, identity: Identity, chat: ChatRequest, idempotency: Idempotency
) -> tuple[str, str | None]:
    """Admits the chat (``api.limits.admit_chat``): its id and creation time, or, when an earlier
    request under the same key made it, that chat's id and None."""
    check_prompt(chat, identity)
    chat = bounded(chat, identity)
    chat_id = uuid.uuid4().hex  # 122 random bits: unguessable, and also the arq job id
    created_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    tracestate = trace.tracestate_of(request.headers.getall("tracestate", []))
    caller = trace.parse(request.headers.get("traceparent"), tracestate)
    span = caller.child() if caller is not None else trace.new_trace()
    logs.bind(user=identity.user, trace_id=span.trace_id)
    try:
        admitted = await admit_chat(
            ctx.redis,
            ctx.streams,
            ctx.settings,
            identity,
            chat_id,
            created_at=created_at,
            request=msgspec.json.encode(chat),
            idempotency_key=idempotency.key,
            idempotency_ttl=idempotency.ttl,
            replay=idempotency.replay,
            trace=trace.encode(span),
        )
    except Unauthorized:
        ctx.credentials.pop(identity.credential, None)
        raise
    if admitted != chat_id:
        await log_replay(request, ctx, admitted, span)
        return admitted, None
    log_admission(request, ctx, admitted, chat, span, caller)
    metrics.CHATS_CREATED.inc()
    return admitted, created_at


def log_admission(
    request: web.Request, ctx: Context, chat_id: str, chat: ChatRequest, span: trace.Trace, caller: trace.Trace | None
) -> None:
    """``chat.admitted``, with the chat's span (``span_id``) and the caller's (``parent_span_id``):
    streambridge exports no spans, so these let a tracing system's user join the LLM's span (whose
    parent is ``span_id``, see ``upstream.request``) to the caller's."""
    logs.bind(chat_id=chat_id)
    fields: dict[str, Any] = {"route": request.path, "model": model_of(ctx, chat), "span_id": span.span_id}
    if caller is not None:
        fields["parent_span_id"] = caller.span_id
    if logs.content_logged():
        fields["prompt"] = [{"role": m.role, "content": m.text()} for m in chat.messages]
    log.info("chat %s: admitted", chat_id, extra={"event": "chat.admitted", **fields})


async def log_replay(request: web.Request, ctx: Context, chat_id: str, span: trace.Trace) -> None:
    """``chat.replayed``: under the trace of the request that made the chat (which it keeps), the
    repeat's own as ``request_trace_id``."""
    stored = None
    with contextlib.suppress(RedisError, OSError):  # the line loses its trace id, the caller not its answer
        stored = trace.decode(await ctx.streams.hget(keys.chat(chat_id), "trace"))  # type: ignore[misc]
    logs.bind(chat_id=chat_id, trace_id=stored.trace_id if stored is not None else None)
    extra = {"event": "chat.replayed", "request_trace_id": span.trace_id}
    log.info("chat %s: the Idempotency-Key's chat, already admitted", chat_id, extra=extra)


async def status_of(ctx: Context, chat_id: str) -> tuple[Status, str]:
    status, created_at = await ctx.streams.hmget(keys.chat(chat_id), ["status", "created_at"])  # type: ignore[misc]
    return cast(Status, (status or b"queued").decode()), (created_at or b"").decode()


def model_of(ctx: Context, chat: ChatRequest | None) -> str:
    return (chat.model if chat is not None else None) or ctx.settings.llm_model


def unix(created_at: str) -> int:
    try:
        return int(datetime.fromisoformat(created_at).timestamp())
    except ValueError:
        return 0


@routes.get("/v1/chats/{id}")
async def read_chat(request: web.Request) -> web.Response:
    ctx = context(request)
    identity, chat_id, chat = await owned_chat(request, ctx)
    status = cast(Status, chat[b"status"].decode())
    view = ChatView(
        id=chat_id,
        status=status,
        content="",
        finish_reason=None,
        usage=None,
        attempts=int(chat.get(b"attempts", b"0")),
        error=None,
        created_at=chat[b"created_at"].decode(),
        stream_url=stream_url(request, ctx, chat_id, identity),
    )
    if b"result" in chat:
        result = decode_result(chat[b"result"])
        view.content, view.finish_reason, view.usage = result.content, result.finish_reason, result.usage
        view.error, view.attempts = result.error, max(result.attempts, view.attempts)
        view.reasoning, view.tool_calls = result.reasoning, result.tool_calls
    elif status not in TERMINAL_STATUSES:
        if status == "queued":
            view.queue_position = await queue_position(ctx, chat_id)
        events = [decode_event(e.data) for e in await read_stream(ctx, chat_id)]
        view.content = assemble_text(events)
        view.reasoning, view.tool_calls = assemble_reasoning(events) or None, assemble_tool_calls(events) or None
    return json_response(view)


async def queue_position(ctx: Context, chat_id: str) -> int | None:
    """Where the chat waits in arq's queue, 1 being the next to start: the number of chats in the
    whole deployment (every user's) queued before it, plus one. The queue is one sorted set scored
    by enqueue time with the chat id as job id, so this is one ZRANK, O(log n); workers take the
    oldest first (``shared.jobs.QueueWorker`` scans from rank 0, the wake list is in enqueue order),
    so it is also the order in which they start. None when the chat is no longer in it: it started
    (or was cancelled) between the read of its status and this."""
    rank = await ctx.redis.zrank(keys.queue(), chat_id)
    return None if rank is None else int(rank) + 1


@routes.post("/v1/chats/{id}/cancel")
async def cancel_chat(request: web.Request) -> web.Response:
    ctx = context(request)
    identity, chat_id, _ = await owned_chat(request, ctx)
    status = await request_cancel(ctx, chat_id, identity.user)
    return json_response(StatusView(chat_id, status), status=202)


#: an ``Idempotency-Key`` is up to this many printable ASCII characters (Stripe's and OpenAI's limit)
IDEMPOTENCY_KEY: Final = re.compile(r"\A[\x21-\x7e]{1,255}\Z")


def idempotency_key_of(request: web.Request) -> str | None:
    """The ``Idempotency-Key`` header: the same key from the same user within 24 h returns the first
    chat, never a second one (the openai SDK, and any careful client, retries a POST it lost)."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if IDEMPOTENCY_KEY.match(key) is None:
        raise BadRequest("Idempotency-Key must be 1 to 255 printable ASCII characters", code="bad_idempotency_key")
    return key


async def read_body(request: web.Request, ctx: Context) -> bytes:
    """The whole body, within ``body_timeout``: a client trickling it in holds nothing for long."""
    try:
        async with asyncio.timeout(ctx.settings.body_timeout):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {ctx.settings.body_timeout:g} s") from None


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # the SDK's; streambridge pads nothing


class Control(msgspec.Struct, forbid_unknown_fields=True):
    """The fields that say how to answer, not what to ask the upstream (null is the default, as
    OpenAI takes it)."""

    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1


CONTROL_FIELDS: Final = frozenset(Control.__struct_fields__)


def completion_request(fields: dict[str, Any]) -> tuple[Control, ChatRequest]:
    """A Chat Completions request, as both ``POST /v1/chat/completions`` and ``POST /v1/chats``
    take it: how to answer, and the chat asked of the upstream, any field that is not OpenAI's
    going to it as a vendor's (the SDK's ``extra_body``). A wrong shape is a 422 (a 400 on the
    OpenAI routes, as OpenAI answers it: ``api.errors``)."""
    control = parse_control({k: fields.pop(k) for k in CONTROL_FIELDS & fields.keys()})
    extra = {k: fields.pop(k) for k in list(fields) if k not in REQUEST_FIELDS}  # in the body's order: hashed
    extra = {k: v for k, v in extra.items() if v is not None}  # null: not given (the SDK sends a None as null)
    if extra:
        bad = next((k for k in extra if not VENDOR_FIELD.match(k)), None)
        if bad is not None:
            raise Unprocessable(f"`{bad[:64]}` is not a field name", param=bad[:64])
        fields["extra"] = extra
    return control, chat_request(fields)


def parse_control(fields: dict[str, Any]) -> Control:
    try:
        control = msgspec.convert(fields, Control)
    except msgspec.ValidationError as exc:
        raise Unprocessable(f"invalid request: {exc}", param=param_of(exc)) from None
    if control.n not in {1, None}:
        raise Unprocessable("only n=1 is supported: send one request per choice", param="n")
    return control


def parse_create(body: bytes) -> ChatRequest:
    """The body of ``POST /v1/chats``: a Chat Completions request (``messages``, …; the same body
    as ``POST /v1/chat/completions``, see :func:`completion_request`), or the shorthand ``message``."""
    fields = json_object(body)
    if fields.get("stream") is False:  # the answer is always a stream here; a client asking otherwise is told
        message = (
            "`stream` cannot be false here: POST /v1/chats answers at once and GET /v1/chats/{id}/events "
            "streams the answer; POST /v1/chat/completions waits for it whole"
        )
        raise Unprocessable(message, code="unsupported_parameter", param="stream")
    if ("messages" in fields) == ("message" in fields):
        raise Unprocessable("send either `messages` or `message`, not both or neither", param="messages")
    if "message" in fields:
        message = fields.pop("message")
        if not isinstance(message, str) or not message:
            raise Unprocessable("invalid chat: `message` must be a non-empty string", param="message")
        fields["messages"] = [{"role": "user", "content": message}]
    return completion_request(fields)[1]


def json_object(body: bytes) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}", code="malformed_json") from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply", code="malformed_json") from None
    if not isinstance(value, dict):
        raise Unprocessable("invalid chat: the body must be a JSON object")
    return value


def chat_request(fields: dict[str, Any]) -> ChatRequest:
    try:
        chat = msgspec.convert(fields, ChatRequest)
    except msgspec.ValidationError as exc:
        raise Unprocessable(f"invalid chat: {exc}", param=param_of(exc)) from None
    for param, value in free_form(chat):
        if too_deep(value):  # msgspec took it, but encoding it for the upstream would recurse too far
            raise Unprocessable(f"`{param}` is nested deeper than {MAX_DEPTH} levels", param=param)
    if chat.logprobs:  # the answer would come back without them
        raise Unprocessable("logprobs are not returned by streambridge", code="unsupported_parameter", param="logprobs")
    for n, m in enumerate(chat.messages):
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise Unprocessable(f"invalid chat: a {m.role} message needs `content`", param=f"messages[{n}].content")
    return chat


#: how deep a request's free-form JSON (a vendor's field, a tool's parameters, a schema) may nest
MAX_DEPTH: Final = 64


def free_form(chat: ChatRequest) -> list[tuple[str, Any]]:
    """The parts of a request whose shape is the caller's: where deep nesting can hide."""
    parts: list[tuple[str, Any]] = [(f"{name}", value) for name, value in (chat.extra or {}).items()]
    parts += [(f"tools[{n}].function.parameters", t.function.parameters) for n, t in enumerate(chat.tools or ())]
    if chat.response_format is not None:
        parts.append(("response_format.json_schema", chat.response_format.json_schema))
    for n, m in enumerate(chat.messages):
        parts += [(f"messages[{n}].audio", m.audio), (f"messages[{n}].function_call", m.function_call)]
    return parts


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


_AT: Final = re.compile(r"`\$\.?([^`]*)`")


_MISSING: Final = re.compile(r"missing required field `([^`]*)`")


def param_of(exc: msgspec.ValidationError) -> str | None:
    """The field a validation error names (``messages[0].role``), as OpenAI's ``param`` gives it;
    for a missing field, the field itself, not the object that lacks it."""
    found, missing = _AT.search(str(exc)), _MISSING.search(str(exc))
    where = found.group(1) if found else ""
    if missing is not None:
        return f"{where}.{missing.group(1)}" if where else missing.group(1)
    return where or None


async def owned_chat(
    request: web.Request, ctx: Context, chat_id: str | None = None
) -> tuple[Identity, str, dict[bytes, bytes]]:
    """The chat named in the path (or ``chat_id``), if it is the caller's; anyone else gets 404 as
    if it did not exist."""
    identity = await authenticate(request, ctx.redis, ctx.settings)
    chat_id = chat_id or chat_id_of(request)
    chat: dict[bytes, bytes] = await ctx.streams.hgetall(keys.chat(chat_id))  # type: ignore[misc]
    if not chat or chat.get(b"owner", b"").decode() != identity.user:
        raise NotFound(f"no chat {chat_id!r}")
    span = trace.decode(chat.get(b"trace"))
    logs.bind(chat_id=chat_id, user=identity.user, trace_id=span.trace_id if span is not None else None)
    return identity, chat_id, chat


CHAT_ID: Final = re.compile(r"\A[0-9a-f]{32}\Z")


def chat_id_of(request: web.Request) -> str:
    """The path's chat id; anything not shaped like one is a chat that does not exist."""
    chat_id = request.match_info["id"]
    if CHAT_ID.match(chat_id) is None:
        raise NotFound(f"no chat {chat_id!r}")
    return chat_id


def stream_url(request: web.Request, ctx: Context, chat_id: str, identity: Identity) -> str:
    base = ctx.settings.public_edge_url or str(request.url.origin())
    token = sign_stream_token(ctx.secret, chat_id, identity.credential, ctx.settings.stream_token_ttl)
    return f"{base.rstrip('/')}/v1/chats/{chat_id}/events?token={token}"


async def stream_gone(ctx: Context, chat_id: str) -> bool:
    """Whether the chat's stream can no longer be told from its start: its chat ended (or expired
    itself) and the stream expired, or entries were trimmed from it (an OpenAI-shaped stream is a
    function of all of it). Trimming is judged only where Redis counts appends (7+); elsewhere
    the hub finds it as it reads."""
    info = await stream_info(ctx.streams, keys.events(chat_id))
    if info is None:
        return await ended_and_expired(ctx, chat_id)
    return info.get("entries-added") is not None and trimmed(info, "0-0")


async def ended_and_expired(ctx: Context, chat_id: str) -> bool:
    """Whether the chat has no stream because it ended long ago: its stream expired, or its
    whole record did (an ``Idempotency-Key`` may outlive it)."""
    if await ctx.streams.exists(keys.events(chat_id)):
        return False
    status = await ctx.streams.hget(keys.chat(chat_id), "status")  # type: ignore[misc]
    return status is None or status.decode() in TERMINAL_STATUSES


async def read_stream(ctx: Context, chat_id: str) -> list[Entry]:
    return [entry_from_fields(i, f) for i, f in await ctx.streams.xrange(keys.events(chat_id))]


async def request_cancel(ctx: Context, chat_id: str, owner: str) -> Status:
    """A queued chat is cancelled at once; a running one is flagged for its worker (``machine.CANCEL``),
    which is told at once. A queued chat's job goes after its status changed: a worker that finds
    the job meanwhile finds the chat ended, and drops the job itself."""
    result = msgspec.json.encode({"status": "cancelled", "content": "", "attempts": 0})
    publish = machine.publish_command(ctx.streams)
    answer = await machine.call(
        ctx.streams, machine.cancel(chat_id, result=result, stream_ttl=ctx.settings.stream_ttl, publish=publish)
    )
    if isinstance(answer, list):  # it was queued, and this cancelled it: no worker will count its end
        answer, age_ms = answer
        async with ctx.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(keys.queue(), chat_id)
            pipe.delete(keys.job(chat_id))
            pipe.zrem(keys.active(owner), chat_id)
            await pipe.execute()
        metrics.CHATS_FINISHED_CANCELLED.inc()
        metrics.CHAT_DURATION_CANCELLED.observe(int(age_ms) / 1000)
    elif answer == b"running":
        await ctx.redis.publish(keys.cancels(), chat_id)
    status = cast(Status, bytes(answer).decode() if isinstance(answer, bytes) else str(answer))
    extra = {"event": "chat.cancel_requested", "chat_id": chat_id, "user": owner, "status": status}
    log.info("chat %s: cancel requested (status %s)", chat_id, status, extra=extra)
    return status
