"""OpenAI's Batches API over streambridge's workers, plus what OpenAI's lacks: live progress as SSE
(``/events``, resumable with ``Last-Event-ID``) and the results finished so far (``/results``).

A batch is created from an uploaded file whose lines were checked on upload (``api/files.py``), in
one call (``shared.batches.CREATE``): ``failed`` at once, naming each bad line, or ``in_progress``,
its items open to every worker's spare capacity (``workers/batches.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Final, Literal, cast

import msgspec
from aiohttp import web
from redis.exceptions import RedisError

from streambridge.api.auth import authenticate
from streambridge.api.chats import json_object, json_response, read_body
from streambridge.api.context import Context, context
from streambridge.api.credentials import Identity
from streambridge.api.edge import parse_last_event_id
from streambridge.api.files import CONTENT_TYPE, FILE_ID_PREFIX, ids_after, over_quota, page_query, pages, reserve_bytes
from streambridge.api.sse import HEADERS, PING
from streambridge.shared import batches, keys, machine, metrics
from streambridge.shared.batches import (
    COMPLETION_WINDOW,
    ENDPOINT,
    BatchKeys,
    BatchStatus,
    LineError,
    Metadata,
)
from streambridge.shared.errors import BadRequest, NotFound
from streambridge.shared.streams import id_key

log = logging.getLogger("streambridge.api")

routes = web.RouteTableDef()

BATCH_ID_PREFIX: Final = "batch_"
#: how often an events stream looks for new entries while none come (it polls: no connection is held)
POLL_MIN: Final = 0.05
POLL_MAX: Final = 0.5


class CreateBatch(msgspec.Struct, forbid_unknown_fields=True):
    input_file_id: str
    # taken as any string, so that a wrong one gets its own error code
    endpoint: Annotated[str, msgspec.Meta(extra_json_schema={"const": ENDPOINT})]
    completion_window: Annotated[str, msgspec.Meta(extra_json_schema={"const": COMPLETION_WINDOW})]
    metadata: Metadata | None = None
    output_expires_after: dict[str, Any] | None = None  # taken, as OpenAI's: files here last file_ttl


class Errors(msgspec.Struct):
    data: list[LineError]
    object: Literal["list"] = "list"


class RequestCounts(msgspec.Struct):
    total: int
    completed: int
    failed: int


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class BatchUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens_details: OutputTokensDetails


class BatchObject(msgspec.Struct):
    """OpenAI's ``batch`` object; ``request_counts`` and ``usage`` are live while it runs."""

    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: int
    request_counts: RequestCounts
    usage: BatchUsage
    errors: Errors | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    metadata: dict[str, str] | None = None
    object: Literal["batch"] = "batch"


class BatchList(msgspec.Struct):
    data: list[BatchObject]
    has_more: bool
    first_id: str | None
    last_id: str | None
    object: Literal["list"] = "list"


_errors_decoder: Final = msgspec.json.Decoder(list[LineError])
_metadata_decoder: Final = msgspec.json.Decoder(dict[str, str] | None)
_TIMES: Final = ("in_progress", "expires", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")


def batch_object(record: dict[bytes, bytes]) -> BatchObject:
    def text(field: str) -> str:
        return record.get(field.encode(), b"").decode()

    def number(field: str) -> int:
        return int(record.get(field.encode(), b"0"))

    def stamp(field: str) -> int | None:
        value = record.get(f"{field}_at".encode())
        return int(value) if value is not None else None

    tokens = (number("prompt_tokens"), number("completion_tokens"), number("total_tokens"))
    obj = BatchObject(
        id=text("id"),
        endpoint=text("endpoint"),
        input_file_id=text("input_file_id"),
        completion_window=text("completion_window"),
        status=cast(BatchStatus, text("status")),
        created_at=number("created_at"),
        request_counts=RequestCounts(number("total"), number("completed"), number("failed")),
        usage=BatchUsage(tokens[0], tokens[1], tokens[2], InputTokensDetails(), OutputTokensDetails()),
        output_file_id=text("output_file_id") or None,
        error_file_id=text("error_file_id") or None,
        metadata=_metadata_decoder.decode(record.get(b"metadata", b"null")),
    )
    for name in _TIMES:
        setattr(obj, f"{name}_at", stamp(name))
    if b"errors" in record:
        obj.errors = Errors(_errors_decoder.decode(record[b"errors"]))
    return obj


@routes.post("/v1/batches")
async def create_batch(request: web.Request) -> web.Response:
    ctx = context(request)
    identity = await authenticate(request, ctx.redis, ctx.settings)
    try:
        body = msgspec.convert(json_object(await read_body(request, ctx)), CreateBatch)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid batch: {exc}", code="invalid_request") from None
    if body.endpoint != ENDPOINT:
        raise BadRequest(f"`endpoint` must be {ENDPOINT}", code="unsupported_endpoint", param="endpoint")
    if body.completion_window != COMPLETION_WINDOW:
        raise BadRequest(
            f"`completion_window` must be {COMPLETION_WINDOW}", code="invalid_request", param="completion_window"
        )
    batch_id = BATCH_ID_PREFIX + uuid.uuid4().hex
    k = BatchKeys(
        batch_id,
        identity.user,
        body.input_file_id if body.input_file_id.startswith(FILE_ID_PREFIX) else FILE_ID_PREFIX + "none",
        FILE_ID_PREFIX + uuid.uuid4().hex[:24],
        FILE_ID_PREFIX + uuid.uuid4().hex[:24],
    )
    s = ctx.settings
    # a user whose stored files (their batches' results among them) fill the quota starts no batch:
    # its results could not be refused once its items had run
    quota = identity.quota.file_bytes
    room, _ = await machine.call(ctx.redis, reserve_bytes(identity.user, "", 0, 0, quota, s.file_ttl))
    if not int(room):
        raise over_quota(quota, "input_file_id")
    created = machine.call(
        ctx.redis,
        batches.create(
            k,
            endpoint=body.endpoint,
            window=body.completion_window,
            metadata=msgspec.json.encode(body.metadata),
            window_ms=int(s.batch_completion_window * 1000),
            ttl=s.file_ttl,
            user_limit=identity.quota.batch_running_items_override,
            batch_limit=identity.quota.batch_max_running_items_override,
            file_quota=quota,
        ),
    )
    if await created == b"no_file":
        raise BadRequest(
            f"no batch input file {body.input_file_id[:64]!r} (upload one with purpose=batch)",
            code="invalid_input_file",
            param="input_file_id",
        )
    return json_response(await read_batch_object(ctx, batch_id))


async def read_batch_object(ctx: Context, batch_id: str) -> BatchObject:
    return batch_object(await ctx.redis.hgetall(keys.batch(batch_id)))  # type: ignore[misc]


async def owned_batch(request: web.Request) -> tuple[Context, Identity, str, dict[bytes, bytes]]:
    """The batch named in the path, if it is the caller's; anyone else gets 404 as if it did not exist."""
    ctx = context(request)
    identity = await authenticate(request, ctx.redis, ctx.settings)
    batch_id = request.match_info["id"]
    record: dict[bytes, bytes] = {}
    if batch_id.startswith(BATCH_ID_PREFIX) and len(batch_id) <= 64:
        record = await ctx.redis.hgetall(keys.batch(batch_id))  # type: ignore[misc]
    if not record or record.get(b"owner", b"").decode() != identity.user:
        raise NotFound(f"no batch {batch_id[:64]!r}", code="batch_not_found")
    return ctx, identity, batch_id, record


@routes.get("/v1/batches/{id}")
async def read_batch(request: web.Request) -> web.Response:
    _, _, _, record = await owned_batch(request)
    return json_response(batch_object(record))


@routes.post("/v1/batches/{id}/cancel")
async def cancel_batch(request: web.Request) -> web.Response:
    """Running items stop; finished ones stay in the output. Idempotent."""
    ctx, identity, batch_id, record = await owned_batch(request)
    k = BatchKeys(
        batch_id,
        identity.user,
        record[b"input_file_id"].decode(),
        record[b"output_file"].decode(),
        record[b"error_file"].decode(),
    )
    await machine.call(ctx.redis, batches.cancel(k, ttl=ctx.settings.file_ttl))
    return json_response(await read_batch_object(ctx, batch_id))


@routes.get("/v1/batches")
async def list_batches(request: web.Request) -> web.Response:
    ctx = context(request)
    identity = await authenticate(request, ctx.redis, ctx.settings)
    limit, after = page_query(request, default=20, most=100)
    ids = await ids_after(ctx, keys.user_batches(identity.user), after, limit + 1)
    async with ctx.redis.pipeline(transaction=False) as pipe:
        for batch_id in ids:
            pipe.hgetall(keys.batch(batch_id))
        records = await pipe.execute()
    found = [batch_object(r) for r in records if r]
    more = len(ids) > limit
    found = found[:limit]
    first, last = (found[0].id, found[-1].id) if found else (None, None)
    return json_response(BatchList(found, more, first, last))


@routes.get("/v1/batches/{id}/results")
async def batch_results(request: web.Request) -> web.StreamResponse:
    """Every item finished so far, one ``BatchRequestOutput`` line each: the output file's lines,
    then the error file's, as they were when the request came (later ones are for a later request)."""
    ctx, _, _, record = await owned_batch(request)
    output, error = keys.file_lines(record[b"output_file"].decode()), keys.file_lines(record[b"error_file"].decode())
    async with ctx.redis.pipeline(transaction=False) as pipe:
        pipe.llen(output)
        pipe.llen(error)
        done = await pipe.execute()
    response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
    await response.prepare(request)
    for key, count in zip((output, error), done, strict=True):
        async for page in pages(ctx, key, stop=int(count)):
            await response.write(page)
    await response.write_eof()
    return response


@routes.get("/v1/batches/{id}/events")
async def batch_events(request: web.Request) -> web.StreamResponse:
    """The batch's progress as SSE (``id`` the stream entry's id): from the start, or after
    ``Last-Event-ID``; it ends after the ``end`` event."""
    ctx, _, batch_id, _ = await owned_batch(request)
    unknown = sorted(set(request.query) - {"last_event_id"})
    if unknown:  # a typo'd resume parameter would silently replay from the start
        raise BadRequest(f"unknown query parameter `{unknown[0]}`", code="invalid_request", param=unknown[0])
    after = parse_last_event_id(request)
    key = keys.batch_events(batch_id)
    if after is not None:
        last = await ctx.redis.xrevrange(key, count=1)
        if not last or id_key(after) > id_key(last[0][0].decode()):
            raise BadRequest(f"Last-Event-ID {after} is not an event of this batch", code="bad_last_event_id")
    response = web.StreamResponse(headers=HEADERS)
    metrics.OPEN_STREAMS.inc()
    try:
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):
            async for frame in event_frames(ctx, key, after):
                await response.write(frame)
            await response.write_eof()
    except RedisError as exc:
        metrics.REDIS_ERRORS_STREAM.inc()
        log.warning("batch %s: ending an events stream on a Redis error (%s); the client will resume", batch_id, exc)
        response.force_close()
    finally:
        metrics.OPEN_STREAMS.dec()
    return response


async def event_frames(ctx: Context, key: str, after: str | None) -> AsyncIterator[bytes]:
    """The stream's entries after ``after`` as SSE frames, a ping while none come, until ``end``.

    It polls with XRANGE, a little less often the longer nothing comes: a blocking read would hold
    one of the process's few Redis connections for each client watching."""
    start = f"({after}" if after is not None else "-"
    delay, quiet = POLL_MIN, 0.0
    loop = asyncio.get_running_loop()
    while True:
        entries = await ctx.redis.xrange(key, min=start, count=PAGE_EVENTS)
        if not entries:
            if quiet >= ctx.settings.heartbeat_interval:
                if not await ctx.redis.exists(key):  # the batch expired meanwhile: nothing more will come
                    return
                yield PING
                quiet = 0.0
            began = loop.time()
            await asyncio.sleep(delay)
            quiet += loop.time() - began
            delay = min(delay * 2, POLL_MAX)
            continue
        delay, quiet = POLL_MIN, 0.0
        frames = []
        ended = False
        for entry_id, fields in entries:
            kind = fields[b"type"]
            frames.append(b"id: %s\nevent: %s\ndata: %s\n\n" % (entry_id, kind, fields[b"data"]))
            ended = ended or kind == b"end"
            start = f"({entry_id.decode()}"
        yield b"".join(frames)
        if ended:
            return


#: events read in one round trip
PAGE_EVENTS: Final = 500
