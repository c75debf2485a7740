"""The architecture with nothing on it: ``python -m bench.skeleton api|edge|worker --port 0``.

``bench.cpu --skeleton`` runs issue 18's loads through these three processes beside ours. They
keep streambridge's shape: a POST that queues a job in Redis; a worker that streams the LLM over
HTTP and appends each read's tokens to the chat's Redis Stream, publishing them in the same Lua
call; an edge that subscribes to the chat's channel, reads the stream's history, then writes live
entries, each event's SSE ``id`` its entry id. Everything that shape is for is gone: no auth,
limits or stream slots, no lease, fencing or sequence check, no retries, deadlines, recovery or
cancel, no resume position, stream length cap or expiry, no stored result, progress events,
heartbeats, write timeouts, metrics or logs, no OpenAI surface; the worker does not even read
Redis's answers (``CLIENT REPLY OFF``). What is left is done with the cheapest parts we have
found: uvloop; plain hiredis connections; the API's two commands in one write; the LLM's stream
read on a hand-written keep-alive HTTP/1.1 connection, each read handled in its callback (no task
woken per read, as aiohttp's client wakes one) and its chunks decoded with msgspec; ``started``
sent with the first tokens, and the end (with the chat's status) with the last read's tokens when
``[DONE]`` comes in the same read (as the simulated LLM writes it); the edge writing live entries
from the feed's callback (``api/feed.py``). The upstream is asked what our worker asks of it
(``stream_options.include_usage``: one usage chunk more a chat), so both are divided by the same
work. ``BENCH_SKELETON_LLM=aiohttp`` reads the LLM with aiohttp's client instead
(``bench.cpu --skeleton-aiohttp``): what the HTTP library alone costs, in the same run.

So the skeleton is a floor for this shape on these libraries (aiohttp serving the API and the
edge, a Pub/Sub channel per chat so that edges scale out), as lean as we have made it: a system of
this shape with guarantees, on the same libraries, costs more. The relay (``bench/proxy.py``) is
the floor with no shape at all. Bench use only: the edge does not re-read the stream after a feed
reconnect or a subscription confirmed late, and Redis errors on the worker's appends go unseen (no
replies), either of which hangs a load rather than failing it; the hand-written LLM client speaks
only what the simulated LLM answers (HTTP/1.1, chunked: anything else fails the chat); Redis is
reached over plain TCP without a password.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import hiredis
import msgspec
import uvloop
from aiohttp import web
from redis.asyncio import Redis

from streambridge.api.feed import Feed
from streambridge.shared import keys

QUEUE: Final = b"skeleton:queue"


def redis_url() -> str:
    """As the deployment sets it for ours."""
    return os.environ.get("STREAMBRIDGE_REDIS_URL", "redis://127.0.0.1:6379/0")


#: one read's entries, appended and published together; the chat's status too, with its last.
#: KEYS: stream, channel, chat; ARGV: the status to set ('' for none), then type, data, type, data, ...
APPEND: Final = b"""
local out = {}
for i = 2, #ARGV, 2 do
  local id = redis.call('XADD', KEYS[1], '*', 'type', ARGV[i], 'data', ARGV[i + 1])
  out[#out + 1] = id .. '\\31' .. ARGV[i] .. '\\31' .. ARGV[i + 1]
end
redis.call('PUBLISH', KEYS[2], table.concat(out, '\\30'))
if ARGV[1] ~= '' then redis.call('HSET', KEYS[3], 'status', ARGV[1]) end
"""


class Wire(asyncio.Protocol):
    """One Redis connection: a command is written at once, its reply answers its future from the
    connection's callback."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not asyncio's class

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            answer = self._waiting.popleft()
            if not answer.done():
                answer.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        for answer in self._waiting:
            if not answer.done():
                answer.set_exception(ConnectionError("Redis went away"))

    def call(self, *command: bytes | str) -> asyncio.Future[Any]:
        return self.pipeline(command)[0]

    def pipeline(self, *commands: tuple[bytes | str, ...]) -> list[asyncio.Future[Any]]:
        """The commands in one write; their answers in order."""
        loop = asyncio.get_running_loop()
        answers: list[asyncio.Future[Any]] = [loop.create_future() for _ in commands]
        self._waiting.extend(answers)
        self.send(*commands)
        return answers

    def send(self, *commands: tuple[bytes | str, ...]) -> None:
        """Written, no answer awaited: on a connection told ``CLIENT REPLY OFF``, none comes."""
        assert self._transport is not None
        self._transport.write(b"".join(hiredis.pack_command(c) for c in commands))  # type: ignore[arg-type]


async def wire(url: str) -> Wire:
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(Wire, parts.hostname or "127.0.0.1", parts.port or 6379)
    if parts.path.strip("/") not in ("", "0"):
        await protocol.call(b"SELECT", parts.path.strip("/"))
    return protocol


async def serve(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"listening on http://127.0.0.1:{bound}", flush=True)
    await asyncio.Event().wait()


# The API: a chat's record and its job, in one round trip.


async def api(port: int) -> None:
    redis = await wire(redis_url())
    edge = os.environ.get("STREAMBRIDGE_PUBLIC_EDGE_URL", "http://127.0.0.1:8001")
    decode = msgspec.json.Decoder(dict[str, Any]).decode

    async def visitor(request: web.Request) -> web.Response:
        return web.json_response({"token": "skeleton", "user": "skeleton"}, status=201)

    async def create(request: web.Request) -> web.Response:
        body = decode(await request.read())
        chat_id, created = uuid.uuid4().hex, datetime.now(UTC).isoformat()
        job = {"id": chat_id, "model": body.get("model", "fake"), "message": body["message"]}
        job = msgspec.json.encode(job | ({"max_tokens": body["max_tokens"]} if "max_tokens" in body else {}))
        record = (b"HSET", keys.chat(chat_id), b"owner", b"skeleton", b"status", b"queued")
        await asyncio.gather(*redis.pipeline(record, (b"RPUSH", QUEUE, job)))
        answer = {"id": chat_id, "status": "queued", "stream_url": f"{edge}/v1/chats/{chat_id}/events"}
        return web.json_response(answer | {"created_at": created}, status=202)

    app = web.Application()
    app.router.add_post("/v1/auth/visitor", visitor)
    app.router.add_post("/v1/chats", create)
    await serve(app, port)


# The worker: every queued chat at once; each read's tokens in one append, whose answer it does
# not wait for nor even get (no fencing, no retry: nothing to do with one).


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []


class Content(msgspec.Struct, tag="content", tag_field="type"):
    content: str
    index: int


class Upstream(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to the LLM, by hand: a chat's request written, its chunked
    SSE body parsed in the connection's callback and each read's whole lines handed to ``on_lines``
    there, with no task woken per read (aiohttp's client wakes one)."""

    def __init__(self, idle: list[Upstream]) -> None:
        self._idle = idle
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._head = True  # the status line and headers are still to come
        self._tail = b""  # a line cut between two chunks
        self.on_lines: Callable[[list[bytes]], None] | None = None
        self.on_end: Callable[[bool], None] | None = None  # True: the body ended whole

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def alive(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def request(self, host: str, path: str, body: bytes) -> None:
        assert self._transport is not None
        self._buffer, self._head, self._tail = b"", True, b""
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        self._transport.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data
        if self._head:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self._buffer = buffer
                return
            if not buffer.startswith(b"HTTP/1.1 200"):
                self._end(False)
                return
            buffer, self._head = buffer[end + 4 :], False
        lines: list[bytes] = []
        while (cut := buffer.find(b"\r\n")) >= 0:
            size = int(buffer[:cut], 16)
            if len(buffer) < cut + 2 + size + 2:
                break
            piece, buffer = buffer[cut + 2 : cut + 2 + size], buffer[cut + 2 + size + 2 :]
            if size == 0:
                self._deliver(lines)
                self._buffer = buffer
                self._end(True)
                return
            got = (self._tail + piece).split(b"\n")
            self._tail = got.pop()
            lines += got
        self._buffer = buffer
        self._deliver(lines)

    def _deliver(self, lines: list[bytes]) -> None:
        if lines and self.on_lines is not None:
            self.on_lines(lines)

    def _end(self, whole: bool) -> None:
        on_end, self.on_lines, self.on_end = self.on_end, None, None
        if whole:
            self._idle.append(self)  # kept alive for the next chat
        elif self._transport is not None:
            self._transport.close()
        if on_end is not None:
            on_end(whole)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self in self._idle:
            self._idle.remove(self)
        if self.on_end is not None:
            self._end(False)


_chunk_of: Final = msgspec.json.Decoder(_Chunk).decode
_encode: Final = msgspec.json.encode


class Chat:
    """One chat's events, from the upstream connection's callbacks to Redis: a read's tokens in one
    append, ``started`` with the first, the end with the read that brings ``[DONE]``."""

    def __init__(self, redis: Wire, sha: str, chat_id: str) -> None:
        self._redis = redis
        self._head = (b"EVALSHA", sha, b"3", keys.events(chat_id), keys.notify(chat_id), keys.chat(chat_id))
        self._events: list[bytes] = [b"started", b'{"type":"started","attempt":1}']
        self._n = 0
        self._ended = False

    def on_lines(self, lines: list[bytes]) -> None:
        sent = self._n
        for line in lines:
            if line.startswith(b"data: {"):
                for choice in _chunk_of(line[6:]).choices:
                    if choice.delta is not None and choice.delta.content:
                        self._n += 1
                        self._events += (b"content", _encode(Content(choice.delta.content, self._n)))
            elif line.startswith(b"data: [DONE]"):
                self._end(b"complete", b'{"type":"complete","total_chunks":%d}' % self._n)
                return
        if self._n > sent:
            self._redis.send((*self._head, b"", *self._events))
            self._events = []

    def on_end(self, whole: bool) -> None:
        if not self._ended:  # the edge ends a stream at its last event: it must come, whatever happened
            self._end(b"failed", b'{"type":"failed"}')

    def _end(self, kind: bytes, data: bytes) -> None:
        self._redis.send((*self._head, kind, *self._events, kind, data))
        self._events, self._ended = [], True


async def read_with_aiohttp(session: aiohttp.ClientSession, url: str, body: bytes, chat: Chat) -> None:
    """The same chat read with aiohttp's client, as the skeleton first did: a task woken per read."""
    tail = b""
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
            response.raise_for_status()
            async for piece in response.content.iter_any():
                lines = (tail + piece).split(b"\n")
                tail = lines.pop()
                chat.on_lines(lines)
    except (aiohttp.ClientError, OSError):
        pass  # the chat fails below, as on the hand-written client
    finally:
        chat.on_end(False)  # a no-op once the chat has ended


async def worker() -> None:
    redis, queue = await wire(redis_url()), await wire(redis_url())
    sha = (await redis.call(b"SCRIPT", b"LOAD", APPEND)).decode()
    redis.send((b"CLIENT", b"REPLY", b"OFF"))  # from here on, a Redis error is silent
    llm = urlsplit(os.environ["STREAMBRIDGE_LLM_BASE_URL"])
    host, port, path = llm.hostname or "127.0.0.1", llm.port or 80, f"{llm.path.rstrip('/')}/chat/completions"
    idle: list[Upstream] = []
    loop = asyncio.get_running_loop()
    # no total timeout, as on the hand-written client (and as our worker's)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout())
    on_aiohttp = os.environ.get("BENCH_SKELETON_LLM") == "aiohttp"

    async def run(job: dict[str, Any]) -> None:
        chat = Chat(redis, sha, job["id"])
        body = {"model": job["model"], "messages": [{"role": "user", "content": job["message"]}], "stream": True}
        body |= {"stream_options": {"include_usage": True}}  # as our worker asks: the same upstream work
        body |= {"max_tokens": job["max_tokens"]} if "max_tokens" in job else {}
        if on_aiohttp:
            await read_with_aiohttp(session, f"http://{host}:{port}{path}", _encode(body), chat)
            return
        while idle and not idle[-1].alive():
            idle.pop()
        if idle:
            upstream = idle.pop()
        else:
            try:
                _, upstream = await loop.create_connection(lambda: Upstream(idle), host, port)
            except OSError:
                chat.on_end(False)
                return
        upstream.on_lines, upstream.on_end = chat.on_lines, chat.on_end  # the chat runs in its callbacks
        upstream.request(host, path, _encode(body))

    print("worker started", flush=True)
    decode = msgspec.json.Decoder(dict[str, Any]).decode
    running: set[asyncio.Task[None]] = set()
    while True:
        popped = await queue.call(b"BLPOP", QUEUE, b"1")
        if popped:
            task = asyncio.create_task(run(decode(popped[1])))
            running.add(task)
            task.add_done_callback(running.discard)


# The edge: history with XRANGE, then live entries written from the feed's callback.


class Reader:
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None  # set once the history is written: live from then
        self.waiting: list[bytes] = []  # what came before that
        self.last = (0, 0)
        self.done = asyncio.get_running_loop().create_future()

    def write(self, entries: list[tuple[bytes, bytes, bytes]]) -> None:
        frames = []
        for entry_id, kind, data in entries:
            ms, _, seq = entry_id.partition(b"-")
            key = (int(ms), int(seq))
            if key <= self.last:
                continue
            self.last = key
            frames.append(b"id: %s\nevent: %s\ndata: %s\n\n" % (entry_id, kind, data))
            if kind in (b"complete", b"failed") and not self.done.done():
                self.done.set_result(None)
        if frames and self.transport is not None and not self.transport.is_closing():
            frame = b"".join(frames)
            self.transport.write(b"%x\r\n%s\r\n" % (len(frame), frame))  # a chunk of the chunked body

    def offer(self, data: bytes) -> None:
        if self.transport is None:
            self.waiting.append(data)
        else:
            self.write(parse(data))


def parse(data: bytes) -> list[tuple[bytes, bytes, bytes]]:
    return [tuple(record.split(b"\x1f", 2)) for record in data.split(b"\x1e")]  # type: ignore[misc]


async def edge(port: int) -> None:
    redis = await wire(redis_url())
    readers: dict[bytes, set[Reader]] = {}
    confirmed: dict[bytes, asyncio.Future[None]] = {}

    def on_message(channel: bytes, data: bytes) -> None:
        for reader in readers.get(channel, ()):
            reader.offer(data)

    def on_gap(channel: bytes) -> None:
        if (first := confirmed.get(channel)) is not None and not first.done():
            first.set_result(None)

    feed = Feed(Redis.from_url(redis_url()), on_message, on_gap)
    await feed.start()

    async def events(request: web.Request) -> web.StreamResponse:
        chat_id = request.match_info["id"]
        channel, reader = keys.notify(chat_id).encode(), Reader()
        if channel not in readers:
            readers[channel] = set()
            confirmed[channel] = asyncio.get_running_loop().create_future()
            feed.subscribe(channel.decode())
        readers[channel].add(reader)
        try:
            await asyncio.wait([confirmed[channel]], timeout=0.5)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            history = await redis.call(b"XRANGE", keys.events(chat_id), b"-", b"+")
            entries = [(entry_id, dict(zip(f[::2], f[1::2], strict=True))) for entry_id, f in history]
            reader.transport = request.transport
            reader.write([(entry_id, f[b"type"], f[b"data"]) for entry_id, f in entries])
            for data in reader.waiting:
                reader.write(parse(data))
            await reader.done
            await response.write_eof()
            return response
        finally:
            readers[channel].discard(reader)
            if not readers[channel]:
                del readers[channel], confirmed[channel]
                feed.unsubscribe(channel.decode())

    app = web.Application()
    app.router.add_get("/v1/chats/{id}/events", events)
    await serve(app, port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=("api", "edge", "worker"))
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    run = {"api": lambda: api(args.port), "edge": lambda: edge(args.port), "worker": worker}[args.role]
    uvloop.run(run())


if __name__ == "__main__":
    main()
