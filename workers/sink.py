"""Appends events to a chat's Redis Stream: fenced, idempotent, coalesced.

Each batch is one Lua call that, atomically:
- checks the attempt's lease token (a worker that lost its lease appends nothing more);
- skips a batch whose sequence number was already applied (a retry after a dropped
  connection must not append the same events twice), and refuses one whose predecessor is
  missing (Redis lost writes in a crash: the attempt must not go on with a hole in its text);
- XADDs each event, then PUBLISHes the whole batch on the chat's channel in one message (an
  edge then reads one message and writes to each client once per batch, not per event);
- with an attempt's ``started`` event, records the attempt on the chat, so a re-run after a
  crash numbers its attempt after it (and the attempt's request goes out one round trip sooner
  than with a write of its own before it).

Events handed over while a batch is in flight go out together in the next one, so a
fast provider costs one round trip per batch, not per token, and an idle one no delay. And
every chat of a worker sends its batches through the worker's ``Appender``: one pipeline per
round trip, however many chats stream at once.
"""

from __future__ import annotations

import asyncio
from typing import Final, get_args

import msgspec
from redis.asyncio import Redis

from streambridge.shared import keys
from streambridge.shared.chats import ChatResult
from streambridge.shared.errors import StreambridgeError
from streambridge.shared.events import Event, Started, encode_event, event_type
from streambridge.workers.appender import Appender

APPEND: Final = """
local lease = redis.call('HMGET', KEYS[2], 'token', 'seq')
if lease[1] ~= ARGV[1] then return -1 end
local seq, mine = tonumber(lease[2] or '0'), tonumber(ARGV[2])
if seq >= mine then return 0 end
if seq < mine - 1 then return -2 end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[4], 'attempts', ARGV[4]) end
local notice = {}
for i = 5, #ARGV, 2 do
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'type', ARGV[i], 'data', ARGV[i + 1])
  notice[#notice + 1] = id .. '\\n' .. ARGV[i] .. '\\n' .. ARGV[i + 1]
end
if #notice > 0 then redis.call('PUBLISH', KEYS[3], table.concat(notice, '\\n')) end
redis.call('HSET', KEYS[2], 'seq', ARGV[2])
return 1
"""

# The terminal event and the chat's final state in one step, so the stream can never hold a
# terminal event while the chat still looks runnable (a crash in between would run it again).
# The chat also stops counting against its owner's running chats (a set named prefix + owner).
FINISH: Final = """
local status = redis.call('HGET', KEYS[4], 'status')
if status == 'complete' or status == 'failed' or status == 'cancelled' then return 0 end
local lease = redis.call('HMGET', KEYS[2], 'token', 'seq')
if lease[1] ~= ARGV[1] then return -1 end
if tonumber(lease[2] or '0') < tonumber(ARGV[2]) - 1 then return -2 end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'type', ARGV[4], 'data', ARGV[5])
redis.call('PUBLISH', KEYS[3], id .. '\\n' .. ARGV[4] .. '\\n' .. ARGV[5])
redis.call('HSET', KEYS[4], 'status', ARGV[6], 'result', ARGV[7])
redis.call('EXPIRE', KEYS[4], ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[9])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[5], ARGV[10])
local owner = redis.call('HGET', KEYS[4], 'owner')
if owner then redis.call('ZREM', ARGV[11] .. owner, ARGV[10]) end
return 1
"""

# Each event type's name (its tag), as the bytes the APPEND call sends.
_TYPES: Final[dict[type, bytes]] = {t: str(t.__struct_config__.tag).encode() for t in get_args(Event)}

#: beyond this many unsent events, ``append`` waits for the batch in flight
MAX_PENDING: Final = 1000


class LeaseLost(StreambridgeError):
    """Another attempt owns the chat now; this one must stop writing."""


class StreamGap(StreambridgeError):
    """An earlier batch of this attempt is not in Redis (lost in a crash); the attempt must restart."""


class StreamSink:
    def __init__(
        self, redis: Redis, chat_id: str, token: str, *, maxlen: int, appender: Appender | None = None
    ) -> None:
        self._redis = redis
        self._appender = appender or Appender(redis)
        self._chat_id = chat_id
        self._keys = [keys.events(chat_id), keys.lease(chat_id), keys.notify(chat_id)]
        self._token = token
        self._maxlen = str(maxlen)
        self._script = redis.register_script(APPEND)
        self._finish = redis.register_script(FINISH)
        self._pending: list[Event] = []
        self._started = ""  # the attempt a pending ``started`` event opens, recorded with its batch
        self._seq = 0
        self._flusher: asyncio.Task[None] | None = None

    async def append(self, event: Event) -> None:
        self._pending.append(event)
        if isinstance(event, Started):
            self._started = str(event.attempt)
        if self._flusher is None or self._flusher.done():
            self._raise_failure()
            self._flusher = asyncio.create_task(self._flush())
        elif len(self._pending) >= MAX_PENDING:
            await asyncio.shield(self._flusher)

    async def drain(self) -> None:
        """Wait until every event handed over is in Redis; raise what an append raised."""
        while self._flusher is not None:
            flusher = self._flusher
            await asyncio.shield(flusher)
            if self._flusher is flusher:
                self._flusher = None
        self._raise_failure()

    async def finish(self, terminal: Event, result: ChatResult, *, result_ttl: int, stream_ttl: int) -> None:
        """Append the terminal event and store the result, atomically; then the lease is gone."""
        await self.drain()
        self._seq += 1
        k = [*self._keys, keys.chat(self._chat_id), keys.running()]
        args: list[str | bytes] = [self._token, str(self._seq), self._maxlen, event_type(terminal)]
        args += [encode_event(terminal), result.status, msgspec.json.encode(result), str(result_ttl)]
        args += [str(stream_ttl), self._chat_id, keys.active("")]
        self._check(await self._appender.call(self._finish, k, args))

    async def close(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            started, self._started = self._started, ""
            self._seq += 1
            args: list[str | bytes] = [self._token, str(self._seq), self._maxlen, started]
            for event in batch:
                args.append(_TYPES[type(event)])
                args.append(encode_event(event))
            self._check(await self._appender.call(self._script, [*self._keys, keys.chat(self._chat_id)], args))

    def _check(self, applied: int) -> None:
        if applied == -1:
            raise LeaseLost("the chat's lease belongs to another attempt")
        if applied == -2:
            raise StreamGap("Redis lost an earlier batch of this attempt's events")

    def _raise_failure(self) -> None:
        if self._flusher is not None and self._flusher.done() and not self._flusher.cancelled():
            exc = self._flusher.exception()
            if exc is not None:
                raise exc
