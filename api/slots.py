"""Open-stream limits, per user and per client address, counted in Redis across every edge.

Each open stream holds a slot: a member of the user's and the address's sorted sets, scored by
when it lapses. The edge renews its slots while their streams are open and removes them when
they close; a slot an edge could not remove (it crashed, or Redis was away) lapses by itself
within ``SLOT_TTL``, so a crash never locks a user out for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from typing import Final

from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.credentials import Identity
from shared import keys
from shared.errors import RateLimited

SLOT_TTL: Final = 30.0
RENEW_EVERY: Final = 10.0

OPEN: Final = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 1 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return 2 end
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], ARGV[2], ARGV[3])
  redis.call('PEXPIREAT', KEYS[i], ARGV[2])
end
return 0
"""


class StreamSlots:
    def __init__(self, redis: Redis, per_ip: int) -> None:
        self._redis = redis
        self._per_ip = per_ip
        self._held: dict[str, tuple[str, str]] = {}
        self._names = (f"{secrets.token_hex(6)}:{n}" for n in itertools.count())
        self._open = redis.register_script(OPEN)

    async def acquire(self, identity: Identity, ip: str) -> str:
        """A slot for one more stream, or 429 when the user or the address has too many open."""
        slot, user_key, ip_key = next(self._names), keys.user_streams(identity.user), keys.ip_streams(ip)
        now = time.time()
        args: list[str | int] = [
            int(now * 1000),
            int((now + SLOT_TTL) * 1000),
            slot,
            identity.quota.max_open_streams,
            self._per_ip,
        ]
        refused = await self._open(keys=[user_key, ip_key], args=args)
        if refused == 1:
            limit = identity.quota.max_open_streams
            raise RateLimited(
                f"at most {limit} streams may be open at once per user; close one first",
                code="too_many_streams",
                retry_after=1,
            )
        if refused == 2:
            raise RateLimited(
                f"at most {self._per_ip} streams may be open at once from one address",
                code="too_many_streams",
                retry_after=1,
            )
        self._held[slot] = (user_key, ip_key)
        return slot

    async def release(self, slot: str) -> None:
        user_key, ip_key = self._held.pop(slot)
        with contextlib.suppress(RedisError, OSError):  # it lapses by itself within SLOT_TTL
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zrem(user_key, slot)
                pipe.zrem(ip_key, slot)
                await pipe.execute()

    async def renew_forever(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY)
            with contextlib.suppress(RedisError, OSError):
                await self.renew()

    async def renew(self) -> None:
        expires = int((time.time() + SLOT_TTL) * 1000)
        held = list(self._held.items())
        for start in range(0, len(held), 1000):  # bounded pipelines, however many streams are open
            async with self._redis.pipeline(transaction=False) as pipe:
                for slot, (user_key, ip_key) in held[start : start + 1000]:
                    for key in (user_key, ip_key):
                        pipe.zadd(key, {slot: expires}, xx=True)
                        pipe.pexpireat(key, expires)
                await pipe.execute()
