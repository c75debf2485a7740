"""Leases: exactly one attempt runs a chat, and a dead worker's chat is found within seconds.

An attempt claims a chat by creating its lease (a token with a short TTL) and keeps it alive
while it runs; the sink's appends are fenced by the same token. The ``running`` sorted set
scores each chat by when its lease lapses, so every worker's reaper finds a dead worker's chat
with one range query and re-queues it. All state changes are single Lua calls.
"""

from __future__ import annotations

import time
from typing import Final

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from streambridge.shared import keys

# The claim, for CLAIM and START: the chat must be runnable and its lease free; it then reads
# the chat. ``pickup`` (enqueue → this start, ms) is kept on the chat for operators and the benchmark.
_CLAIM_BODY: Final = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status ~= 'queued' and status ~= 'running' then return status end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'busy' end
redis.call('HSET', KEYS[2], 'token', ARGV[1], 'seq', 0)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'running', 'pickup_ms', pickup)
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
local chat = redis.call('HGETALL', KEYS[1])
table.insert(chat, 1, 'claimed')
return chat
"""

CLAIM: Final = "local pickup = ARGV[5]" + _CLAIM_BODY

# A woken job's start, in one call: arq's in-progress mark (so that arq's scan leaves the job
# alone; another worker's mark means it runs there), then the claim. A job that left arq's queue
# before its wake-up came has ended: its mark is taken back. KEYS[4]: the in-progress key,
# KEYS[5]: arq's queue; ARGV[5]: the worker's clock (ms), ARGV[6]: the job id, ARGV[7]: the mark's ms.
START: Final = (
    """
if not redis.call('SET', KEYS[4], '1', 'PX', ARGV[7], 'NX') then return 'elsewhere' end
local enqueued = redis.call('ZSCORE', KEYS[5], ARGV[6])
if not enqueued then
  redis.call('DEL', KEYS[4])
  return 'finished'
end
local pickup = string.format('%.3f', tonumber(ARGV[5]) - tonumber(enqueued))"""
    + _CLAIM_BODY
)

# 0: lost to another attempt; 1: renewed; 2: renewed, and the owner asked to cancel (a backstop
# for a cancel whose Pub/Sub message the worker missed while reconnecting).
RENEW: Final = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
if redis.call('HEXISTS', KEYS[3], 'cancel') == 1 then return 2 end
return 1
"""

# Hand a chat back at once (worker shutting down): drop the lease, make it due for reaping now.
RELEASE: Final = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZADD', KEYS[2], 0, ARGV[2])
return 1
"""

# One reaper wins a lapsed chat: the ZREM decides. Returns the recovery number, or 0.
REAP: Final = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('ZREM', KEYS[3], ARGV[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
return redis.call('HINCRBY', KEYS[1], 'recoveries', 1)
"""


def now_ms() -> int:
    return int(time.time() * 1000)


class Lease:
    def __init__(self, redis: Redis, chat_id: str, token: str, ttl: float) -> None:
        self.redis = redis
        self.chat_id = chat_id
        self.token = token
        self.ttl_ms = int(ttl * 1000)
        #: the chat's hash as the claim found it (its request, attempts, created_at, cancel flag)
        self.chat: dict[bytes, bytes] = {}

    async def claim(self, pickup_ms: float = 0.0) -> str:
        """``claimed``, or why not: ``missing``, ``busy`` (another attempt holds it) or a terminal status.

        A claim also reads the chat (into :attr:`chat`): one round trip to start a run, not two.
        """
        k = self._claim_keys()
        return self.took(await self.redis.eval(CLAIM, len(k), *k, *self._claim_args(f"{pickup_ms:.3f}")))  # type: ignore[misc]

    def start(self, pipe: Pipeline, job_id: str, in_progress_key: str, queue: str, mark_ms: int) -> None:
        """Queues a woken job's start on ``pipe`` (:data:`START`); :meth:`took` reads its answer:
        what :meth:`claim` answers, or ``elsewhere`` (another worker has it) or ``finished``."""
        k = [*self._claim_keys(), in_progress_key, queue]
        args = [*self._claim_args(f"{time.time() * 1000:.3f}"), job_id, str(mark_ms)]
        pipe.eval(START, len(k), *k, *args)

    def took(self, answer: list[bytes] | bytes | str) -> str:
        """The outcome of a claim or a start, keeping the chat it read."""
        if not isinstance(answer, list):
            return _text(answer)
        fields = answer[1:]
        self.chat = dict(zip(fields[::2], fields[1::2], strict=True))
        return _text(answer[0])

    def _claim_keys(self) -> list[str]:
        return [keys.chat(self.chat_id), keys.lease(self.chat_id), keys.running()]

    def _claim_args(self, pickup_or_now: str) -> list[str]:
        return [self.token, str(self.ttl_ms), str(now_ms() + self.ttl_ms), self.chat_id, pickup_or_now]

    async def renew(self) -> int:
        """0: the lease is lost; 1: renewed; 2: renewed, but the chat's owner asked to cancel it."""
        k = [keys.lease(self.chat_id), keys.running(), keys.chat(self.chat_id)]
        args = [self.token, str(self.ttl_ms), str(now_ms() + self.ttl_ms), self.chat_id]
        return int(await self.redis.eval(RENEW, len(k), *k, *args))  # type: ignore[misc]

    async def release(self) -> bool:
        k = [keys.lease(self.chat_id), keys.running()]
        return bool(await self.redis.eval(RELEASE, len(k), *k, self.token, self.chat_id))  # type: ignore[misc]


async def lapsed_chats(redis: Redis, limit: int = 100) -> list[str]:
    ids = await redis.zrangebyscore(keys.running(), "-inf", now_ms(), start=0, num=limit)
    return [i.decode() for i in ids]


async def reap(redis: Redis, chat_id: str) -> int:
    k = [keys.chat(chat_id), keys.lease(chat_id), keys.running()]
    return int(await redis.eval(REAP, len(k), *k, chat_id))  # type: ignore[misc]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
