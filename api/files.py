"""OpenAI's Files API, for batch inputs and outputs: upload, list, read, download, delete.

A file's bytes live in Redis, one list entry per line (``keys.file_lines``): every API and worker
process reaches them with no shared disk, a worker takes one line by its index, and a download is
a walk over pages of lines. An upload is read as a stream, a chunk at a time, and its lines are
parsed and written a page at a time as they arrive: however large the file, the process holds one
page of it. A batch input's lines are checked as Chat Completions bodies on the way in (by the
front door's own parser), and kept parsed (``keys.file_items``), so a batch made from the file
knows at once whether it is valid, and its workers parse nothing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Final, Literal

import msgspec
from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from streambridge.api.auth import authenticate
from streambridge.api.chats import completion_request, json_response
from streambridge.api.context import Context, context
from streambridge.api.credentials import Identity
from streambridge.api.limits import bounded, check_prompt
from streambridge.shared import keys, machine
from streambridge.shared.batches import ENDPOINT, Item, LineError
from streambridge.shared.errors import ApiError, BadRequest, NotFound, PayloadTooLarge, RequestTimeout

routes = web.RouteTableDef()

#: lines written to Redis in one round trip, and served in one page, at most
PAGE: Final = 1000
#: and bytes, at most (give or take a line): lines may be up to a request body long (1 MiB), and
#: 1,000 of those made pages of a gigabyte in the API's memory
PAGE_BYTES: Final = 2 * 1024 * 1024
#: lines one LRANGE inside the page-reading script takes: what Redis holds beyond the byte budget
READ_STEP: Final = 16
#: an upload's bytes read at a time
CHUNK: Final = 64 * 1024
#: the bad lines a failed batch names (OpenAI's ``errors.data``); the count says how many in all
MAX_LINE_ERRORS: Final = 1000
FILE_ID_PREFIX: Final = "file-"
CONTENT_TYPE: Final = "application/jsonl"


class FileObject(msgspec.Struct):
    """OpenAI's ``file`` object."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    object: Literal["file"] = "file"
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileList(msgspec.Struct):
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None
    object: Literal["list"] = "list"


class FileDeleted(msgspec.Struct):
    id: str
    deleted: bool = True
    object: Literal["file"] = "file"


class Line(msgspec.Struct, forbid_unknown_fields=True):
    """A batch input line, as OpenAI's batch JSONL has it."""

    custom_id: str
    method: str
    url: str
    body: dict[str, Any]


_line_decoder: Final = msgspec.json.Decoder(Line)


@routes.post("/v1/files")
async def upload_file(request: web.Request) -> web.Response:
    ctx = context(request)
    identity = await authenticate(request, ctx.redis, ctx.settings)
    if not request.content_type.startswith("multipart/form-data"):
        raise BadRequest("send the file as multipart/form-data, with `file` and `purpose`", code="invalid_request")
    purpose: str | None = None
    upload: Upload | None = None
    try:
        reader = await form(request)
        while (part := await next_part(ctx, reader)) is not None:
            if not isinstance(part, BodyPartReader):
                raise BadRequest("a nested multipart body is not a file", code="invalid_request")
            if part.name == "purpose":
                purpose = (await within(ctx, part.read_chunk(64))).decode(errors="replace").strip()
            elif part.name == "file" and upload is None:
                upload = Upload(ctx, identity, part.filename or "upload.jsonl")
                await upload.receive(part)
            else:
                await within(ctx, part.release())
        if upload is None:
            raise BadRequest("no `file` part in the form", code="invalid_request", param="file")
        if purpose != "batch":
            raise BadRequest(
                f"purpose {purpose!r} is not supported: only `batch` files are", code="invalid_request", param="purpose"
            )
        return json_response(await upload.save())
    except BaseException:
        if upload is not None:
            await asyncio.shield(upload.discard())
        raise


#: what aiohttp raises for a form it cannot read
MALFORMED: Final = (ValueError, AssertionError, KeyError, HttpProcessingError)


async def form(request: web.Request) -> MultipartReader:
    try:
        return await request.multipart()
    except MALFORMED as exc:
        raise BadRequest(f"malformed multipart body: {exc}", code="invalid_request") from None


async def next_part(ctx: Context, reader: MultipartReader) -> Any:
    return await within(ctx, reader.next())


async def within(ctx: Context, step: Any) -> Any:
    """One read of the body, within ``body_timeout``: a client that stops sending holds nothing for long."""
    try:
        async with asyncio.timeout(ctx.settings.body_timeout):
            return await step
    except TimeoutError:
        raise RequestTimeout(f"the upload stalled for {ctx.settings.body_timeout:g} s") from None
    except MALFORMED as exc:
        raise BadRequest(f"malformed multipart body: {exc}", code="invalid_request") from None


class Upload:
    """A file arriving: its lines checked and written to Redis a page at a time."""

    def __init__(self, ctx: Context, identity: Identity, filename: str) -> None:
        # aiohttp keeps undecodable bytes of the name as surrogates, which Redis (and JSON) cannot
        # encode: a "?" for each keeps the rest of the name readable
        filename = filename.encode("utf-8", errors="replace").decode("utf-8")
        self.ctx, self.identity, self.filename = ctx, identity, filename[:256]
        self.id = FILE_ID_PREFIX + uuid.uuid4().hex[:24]
        self.size = 0
        self.lines = 0  # physical lines, blank ones included (errors count them as an editor does)
        self.items = 0
        self.invalid = 0
        self.errors: list[LineError] = []
        self.seen: set[str] = set()  # custom_ids so far: bounded by the line limit
        self._raw: list[bytes] = []
        self._parsed: list[bytes] = []
        self._bytes = 0  # of the page held: _raw's and _parsed's
        self.reserved = 0  # bytes counted against the user's quota so far (``stored_member``)

    async def receive(self, part: BodyPartReader) -> None:
        s = self.ctx.settings
        quota = self.identity.quota.file_bytes
        await self._reserve()  # a user already at the quota is refused before a byte is read
        tail = b""
        while chunk := await within(self.ctx, part.read_chunk(CHUNK)):
            self.size += len(chunk)
            if self.size > s.max_file_bytes:
                raise PayloadTooLarge(f"the file is larger than {s.max_file_bytes} bytes")
            if self.size > quota:  # alone over it: no need to ask Redis
                raise over_quota(quota)
            *complete, tail = (tail + chunk).split(b"\n")
            if len(tail) > s.max_body_bytes:
                raise PayloadTooLarge(f"line {self.lines + 1} is longer than {s.max_body_bytes} bytes")
            for line in complete:
                self._take(line)
                if self.page_full():
                    await self._flush()
        if tail.strip():
            self._take(tail)
        await self._flush()

    def _take(self, raw: bytes) -> None:
        raw = raw.removesuffix(b"\r")
        self.lines += 1
        self._raw.append(raw)
        self._bytes += len(raw)
        if not raw.strip():
            return
        self.items += 1
        if self.items > self.ctx.settings.batch_max_lines:
            raise BadRequest(f"the file has more than {self.ctx.settings.batch_max_lines} lines", code="too_many_lines")
        try:
            item = parse_line(raw, self.identity, self.seen)
        except ApiError as exc:
            self.invalid += 1
            if len(self.errors) < MAX_LINE_ERRORS:
                self.errors.append(LineError(exc.code, exc.message, exc.param, self.lines))
            return
        parsed = msgspec.json.encode(item)
        self._parsed.append(parsed)
        self._bytes += len(parsed)

    def page_full(self) -> bool:
        """Whether the page held is due to be written: by line count, or by bytes for big lines."""
        return len(self._raw) >= PAGE or self._bytes >= PAGE_BYTES

    async def _reserve(self) -> None:
        """Counts the bytes read so far against the user's quota before a page of them is written,
        or refuses the upload: Redis never holds more of a user's files than the quota."""
        quota = self.identity.quota.file_bytes
        call = reserve_bytes(self.identity.user, self.id, self.reserved, self.size, quota, self.ctx.settings.file_ttl)
        accepted, _ = await machine.call(self.ctx.redis, call)
        if not int(accepted):
            raise over_quota(quota)
        self.reserved = self.size

    async def _flush(self) -> None:
        if self.size != self.reserved:
            await self._reserve()
        ttl = self.ctx.settings.file_ttl
        async with self.ctx.redis.pipeline(transaction=False) as pipe:
            if self._raw:
                pipe.rpush(keys.file_lines(self.id), *self._raw)
                pipe.expire(keys.file_lines(self.id), ttl)
            if self._parsed and not self.invalid:  # a file with a bad line never runs: keep no items
                pipe.rpush(keys.file_items(self.id), *self._parsed)
                pipe.expire(keys.file_items(self.id), ttl)
            await pipe.execute()
        self._raw, self._parsed, self._bytes = [], [], 0

    async def save(self) -> FileObject:
        """The file's record, written last: until then the file does not exist for anyone."""
        now = time.time()
        record = {
            "owner": self.identity.user,
            "purpose": "batch",
            "filename": self.filename,
            "bytes": self.size,
            "lines": self.items,
            "invalid": self.invalid,
            "errors": msgspec.json.encode(self.errors),
            "created_ms": int(now * 1000),
        }
        async with self.ctx.redis.pipeline(transaction=False) as pipe:
            if self.invalid:
                pipe.delete(keys.file_items(self.id))
            pipe.hset(keys.file(self.id), mapping=record)
            pipe.expire(keys.file(self.id), self.ctx.settings.file_ttl)
            pipe.zadd(keys.user_files(self.identity.user), {self.id: int(now * 1000)})
            pipe.expire(keys.user_files(self.identity.user), self.ctx.settings.file_ttl)
            await pipe.execute()
        return FileObject(self.id, self.size, int(now), self.filename, "batch")

    async def discard(self) -> None:
        await self.ctx.redis.delete(keys.file_lines(self.id), keys.file_items(self.id))
        if self.reserved:
            await machine.call(self.ctx.redis, release_bytes(self.identity.user, self.id, self.reserved))


def over_quota(quota: int, param: str = "file") -> ApiError:
    # 400, not 429 or 413: the SDK retries a 429 (waiting frees nothing: files go only when deleted
    # or expired), and a 413 says the request itself is too big, when the same file fits once the
    # user deletes others; a storage limit is the state of the account, a plain invalid request.
    return BadRequest(
        f"your stored files would pass your quota of {quota} bytes: delete files (DELETE /v1/files/{{id}}) "
        "or wait for them to expire",
        code="storage_quota_exceeded",
        param=param,
    )


def stored_member(file_id: str, size: int) -> str:
    """A file's member of ``keys.user_file_sizes``: its size rides in the name, so pruning an
    expired one knows what to subtract without another key per file."""
    return f"{file_id}:{size}"


#: The per-user quota on stored file bytes. A sorted set of the user's files scored by when each
#: expires (``keys.user_file_sizes``), with a running total beside it (``keys.user_file_bytes``),
#: pruned of what has expired at each check. A lone counter with the files' TTL, refreshed on each
#: upload, would be simpler, but a user who uploads at least once a TTL would never see it fall:
#: each expired file's bytes would be counted forever. Here they drop out when the file does (give
#: or take the seconds between the last page's check and the record's write). Both keys expire a
#: TTL after the last upload, when every file in them has expired too.
#: KEYS: sizes, total. ARGV: old member ('' if none), new member, old size, new size, quota, TTL (ms).
#: Returns {1, total} if the new size fits (and is counted instead of the old), else {0, total}; a
#: new size of 0 only asks whether the user has a byte of room left.
RESERVE_BYTES: Final = machine.define(
    "reserve_file_bytes",
    """
local now = now_ms()
local total = tonumber(redis.call('GET', KEYS[2]) or '0')
-- at most 1,000 expired files pruned per call, to bound the script; the rest go on the next ones
-- (until then the total overstates, refusing too early rather than too late)
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1000)
for _, member in ipairs(gone) do
  total = total - tonumber(string.match(member, ':(%d+)$'))
  redis.call('ZREM', KEYS[1], member)
end
if total < 0 then total = 0 end
local old, new, quota, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if ARGV[1] ~= '' and redis.call('ZSCORE', KEYS[1], ARGV[1]) == false then old = 0 end
-- nothing read yet (new = 0): only whether there is room for a byte, counting nothing
local over = (new == 0 and total >= quota) or total - old + new > quota
if over or new == 0 then
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('SET', KEYS[2], total, 'KEEPTTL') end
  return {over and 0 or 1, total}
end
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
total = total - old + new
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
redis.call('SET', KEYS[2], total, 'PX', ttl)
redis.call('PEXPIRE', KEYS[1], ttl)
return {1, total}
""",
)

#: A file's bytes off the user's total, if they are still counted (not pruned as expired already).
#: KEYS: sizes, total. ARGV: member.
RELEASE_BYTES: Final = machine.define(
    "release_file_bytes",
    """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  local left = redis.call('DECRBY', KEYS[2], tonumber(string.match(ARGV[1], ':(%d+)$')))
  if left <= 0 or redis.call('ZCARD', KEYS[1]) == 0 then redis.call('DEL', KEYS[1], KEYS[2]) end
end
return 0
""",
)


def reserve_bytes(user: str, file_id: str, old: int, new: int, quota: int, ttl: int) -> machine.Call:
    previous = stored_member(file_id, old) if old else ""
    args: list[str | bytes] = [previous, stored_member(file_id, new), str(old), str(new), str(quota), str(ttl * 1000)]
    return machine.Call(RESERVE_BYTES, [keys.user_file_sizes(user), keys.user_file_bytes(user)], args)


def release_bytes(user: str, file_id: str, size: int) -> machine.Call:
    member = stored_member(file_id, size)
    return machine.Call(RELEASE_BYTES, [keys.user_file_sizes(user), keys.user_file_bytes(user)], [member])


def parse_line(raw: bytes, identity: Identity, seen: set[str]) -> Item:
    """A batch input line as its worker will run it; raises the ``ApiError`` the same body would
    get from ``POST /v1/chat/completions`` (its ``code``, ``message`` and ``param``)."""
    try:
        line = _line_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise BadRequest(f"not a batch request line: {exc}", code="invalid_json_line") from None
    if not line.custom_id or len(line.custom_id) > 512:
        raise BadRequest("`custom_id` must be 1 to 512 characters", code="invalid_custom_id", param="custom_id")
    if line.custom_id in seen:
        raise BadRequest(f"`custom_id` {line.custom_id!r} repeats an earlier line's", code="duplicate_custom_id")
    seen.add(line.custom_id)
    if line.method != "POST":
        raise BadRequest("`method` must be POST", code="invalid_method", param="method")
    if line.url != ENDPOINT:
        raise BadRequest(f"`url` must be {ENDPOINT}", code="invalid_url", param="url")
    try:  # the front door's own reading of the body, its fields named as the line has them
        control, chat = completion_request(dict(line.body))
        check_prompt(chat, identity)
    except ApiError as exc:
        raise BadRequest(exc.message, code=exc.code, param=f"body.{exc.param}" if exc.param else None) from None
    if control.stream:
        raise BadRequest("a batch line cannot stream: leave out `stream`", code="invalid_request", param="body.stream")
    chat = bounded(chat, identity)
    body: dict[str, Any] = msgspec.to_builtins(chat)
    body.update(body.pop("extra", None) or {})
    for message in body["messages"]:  # an earlier reply's reasoning, sent back: upstreams refuse it
        message.pop("reasoning_content", None)
        message.pop("reasoning", None)
    return Item(line.custom_id, msgspec.Raw(msgspec.json.encode(body)))


async def owned_file(request: web.Request) -> tuple[Context, Identity, str, dict[bytes, bytes]]:
    """The file named in the path, if it is the caller's; anyone else gets 404 as if it did not exist."""
    ctx = context(request)
    identity = await authenticate(request, ctx.redis, ctx.settings)
    file_id = request.match_info["id"]
    record: dict[bytes, bytes] = {}
    if file_id.startswith(FILE_ID_PREFIX) and len(file_id) <= 64:
        record = await ctx.redis.hgetall(keys.file(file_id))  # type: ignore[misc]
    if not record or record.get(b"owner", b"").decode() != identity.user:
        raise NotFound(f"no file {file_id[:64]!r}", code="file_not_found")
    return ctx, identity, file_id, record


def file_object(file_id: str, record: dict[bytes, bytes]) -> FileObject:
    purpose: Literal["batch", "batch_output"] = "batch" if record[b"purpose"] == b"batch" else "batch_output"
    created = int(record[b"created_ms"]) // 1000
    return FileObject(file_id, int(record[b"bytes"]), created, record[b"filename"].decode(), purpose)


@routes.get("/v1/files/{id}")
async def read_file(request: web.Request) -> web.Response:
    _, _, file_id, record = await owned_file(request)
    return json_response(file_object(file_id, record))


@routes.delete("/v1/files/{id}")
async def delete_file(request: web.Request) -> web.Response:
    """A batch that runs from the file keeps running: its items are the batch's to finish."""
    ctx, identity, file_id, record = await owned_file(request)
    async with ctx.redis.pipeline(transaction=False) as pipe:
        pipe.delete(keys.file(file_id), keys.file_lines(file_id))
        pipe.zrem(keys.user_files(identity.user), file_id)
        await pipe.execute()
    # uploads and batch results alike (a result file of a batch that ended before results were
    # counted is in no total: nothing to release)
    await machine.call(ctx.redis, release_bytes(identity.user, file_id, int(record[b"bytes"])))
    return json_response(FileDeleted(file_id))


@routes.get("/v1/files/{id}/content")
async def file_content(request: web.Request) -> web.StreamResponse:
    ctx, _, file_id, _ = await owned_file(request)
    response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
    await response.prepare(request)
    async for page in pages(ctx, keys.file_lines(file_id)):
        await response.write(page)
    await response.write_eof()
    return response


#: up to ARGV[2] lines of the list KEYS[1] from index ARGV[1], stopping after the line that brings
#: them to ARGV[3] bytes; read ARGV[4] lines at a time so that Redis, too, never holds a page of
#: a thousand big lines at once
READ_PAGE: Final = machine.define(
    "read_page",
    """
local start, most, budget, step = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local out, size = {}, 0
while #out < most and size < budget do
  local first = start + #out
  local got = redis.call('LRANGE', KEYS[1], first, first + math.min(step, most - #out) - 1)
  if #got == 0 then break end
  for _, line in ipairs(got) do
    out[#out + 1] = line
    size = size + #line
    if size >= budget then break end
  end
end
return out
""",
)


async def pages(ctx: Context, key: str, stop: int | None = None, *, budget: int = PAGE_BYTES) -> AsyncIterator[bytes]:
    """The list's lines, a page at a time (at most PAGE lines, and about ``budget`` bytes), each
    line ending with a newline; up to ``stop`` lines."""
    start = 0
    while stop is None or start < stop:
        most = PAGE if stop is None else min(PAGE, stop - start)
        read = machine.Call(READ_PAGE, [key], [str(start), str(most), str(budget), str(READ_STEP)])
        lines: list[bytes] = await machine.call(ctx.redis, read)
        if not lines:
            return
        yield b"\n".join(lines) + b"\n"
        start += len(lines)


@routes.get("/v1/files")
async def list_files(request: web.Request) -> web.Response:
    ctx = context(request)
    identity = await authenticate(request, ctx.redis, ctx.settings)
    limit, after = page_query(request, default=10_000, most=10_000)
    purpose = request.query.get("purpose")
    order = request.query.get("order", "desc")
    if order not in {"asc", "desc"}:
        raise BadRequest("`order` must be asc or desc", code="invalid_request", param="order")
    # Filter before the limit, reading on until limit + 1 files match or the set ends: filtering a
    # page already cut to the limit answered `data: [], has_more: true, last_id: null`, and the
    # SDK's auto-paging stops at a page without a last_id.
    files: list[FileObject] = []
    cursor = after
    while len(files) <= limit:
        ids = await ids_after(ctx, keys.user_files(identity.user), cursor, limit + 1, descending=order == "desc")
        if not ids:
            break
        async with ctx.redis.pipeline(transaction=False) as pipe:
            for file_id in ids:
                pipe.hgetall(keys.file(file_id))
            records = await pipe.execute()
        found = [file_object(i, r) for i, r in zip(ids, records, strict=True) if r]  # an expired record: skipped
        files += [f for f in found if purpose is None or f.purpose == purpose]
        if len(ids) <= limit:
            break  # the set's end
        cursor = ids[-1]
    more = len(files) > limit
    files = files[:limit]
    first, last = (files[0].id, files[-1].id) if files else (None, None)
    return json_response(FileList(files, more, first, last))


def page_query(request: web.Request, *, default: int, most: int) -> tuple[int, str | None]:
    """``limit`` and ``after`` of a list route, as OpenAI's cursor pagination has them."""
    unknown = sorted(set(request.query) - {"limit", "after", "order", "purpose"})
    if unknown:
        raise BadRequest(f"unknown query parameter `{unknown[0]}`", code="invalid_request", param=unknown[0])
    raw = request.query.get("limit", str(default))
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= most:
        raise BadRequest(f"`limit` must be 1 to {most}", code="invalid_request", param="limit")
    return int(raw), request.query.get("after") or None


async def ids_after(ctx: Context, key: str, after: str | None, count: int, *, descending: bool = True) -> list[str]:
    """Up to ``count`` members of a sorted set, newest first (or oldest), after the member ``after``."""
    start = 0
    if after is not None:
        rank = await (ctx.redis.zrevrank(key, after) if descending else ctx.redis.zrank(key, after))
        if rank is None:
            return []
        start = rank + 1
    fetch = ctx.redis.zrevrange if descending else ctx.redis.zrange
    return [m.decode() for m in await fetch(key, start, start + count - 1)]
