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
from dataclasses import dataclass
from typing import Final

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from streambridge.api.credentials import Identity
from streambridge.shared import keys
from streambridge.shared.errors import RateLimited

SLOT_TTL: Final = 30.0
RENEW_EVERY: Final = 10.0
RENEW_PER_CALL: Final = 500

# Scored by Redis's clock (TIME), as every lapse is: edges whose clocks disagree still agree on
# which slots have lapsed. ARGV: the slot's TTL (ms), the slot, the user's limit, the address's.
OPEN: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lapses = now + tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 1 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return 2 end
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], lapses, ARGV[2])
  redis.call('PEXPIREAT', KEYS[i], lapses)
end
return 0
"""


@dataclass(frozen=True)
class SlotRequest:
    slot: str
    keys: list[str]
    args: list[int]  # the slot's TTL (ms)
    limit: int


class StreamSlots:
    def __init__(self, redis: Redis, per_ip: int) -> None:
        self._redis = redis
        self._per_ip = per_ip
        self._held: dict[str, tuple[str, str]] = {}
        # slots being given back, by key, and when they are gone; the round trip that sends them
        self._returning: tuple[dict[str, list[str]], asyncio.Future[None]] | None = None
        self._returner: asyncio.Task[None] | None = None
        self._names = (f"{secrets.token_hex(6)}:{n}" for n in itertools.count())
        self._open = redis.register_script(OPEN)

    @property
    def held(self) -> int:
        """Slots this edge holds: one per stream open on it."""
        return len(self._held)

    async def acquire(self, identity: Identity, ip: str) -> str:
        """A slot for one more stream, or 429 when the user or the address has too many open."""
        ask = self.ask(identity, ip)
        try:
            refused = await self._open(keys=ask.keys, args=self._args(ask))
        except BaseException:  # Redis may have taken it before the answer was lost
            await asyncio.shield(self.release(ask.slot))
            raise
        return self.settle(ask, refused)

    def ask(self, identity: Identity, ip: str) -> SlotRequest:
        """The OPEN call for one more stream: for :meth:`acquire`, or a caller's own pipeline
        (:meth:`add_to`), its answer then given to :meth:`settle`. The slot counts as held from
        here, so that :meth:`release` gives it back whatever became of the call."""
        ask = SlotRequest(
            next(self._names),
            [keys.user_streams(identity.user), keys.ip_streams(ip)],
            [int(SLOT_TTL * 1000)],
            identity.quota.max_open_streams,
        )
        self._held[ask.slot] = (ask.keys[0], ask.keys[1])
        return ask

    def add_to(self, pipe: Pipeline, ask: SlotRequest) -> None:
        """Queue ``ask`` on ``pipe`` (a NOSCRIPT answer means: :meth:`acquire` instead)."""
        pipe.evalsha(self._open.sha, 2, *ask.keys, *self._args(ask))  # type: ignore[arg-type]

    def _args(self, ask: SlotRequest) -> list[str | int]:
        return [*ask.args, ask.slot, ask.limit, self._per_ip]

    def settle(self, ask: SlotRequest, refused: int) -> str:
        """The slot ``ask`` took, or the 429 it was refused with."""
        if refused in (1, 2):
            self._held.pop(ask.slot, None)
        if refused == 1:
            raise RateLimited(
                f"at most {ask.limit} streams may be open at once per user; close one first",
                code="too_many_streams",
                retry_after=1,
            )
        if refused == 2:
            raise RateLimited(
                f"at most {self._per_ip} streams may be open at once from one address",
                code="too_many_streams",
                retry_after=1,
            )
        return ask.slot

    async def release(self, slot: str) -> None:
        """Give the slot back; a slot already given back is nothing to do.

        Slots given back while a round trip is out go together in the next one, one ZREM per key:
        when a chat that thousands watch ends, its streams all close at once, and a round trip
        each held the edge's loop (every other stream's delivery with it) for a second.
        """
        held = self._held.pop(slot, None)
        if held is None:
            return
        if self._returning is None:
            self._returning = ({}, asyncio.get_running_loop().create_future())
        for key in held:
            self._returning[0].setdefault(key, []).append(slot)
        done = self._returning[1]
        if self._returner is None or self._returner.done():
            self._returner = asyncio.create_task(self._return_slots())
        await asyncio.shield(done)

    async def _return_slots(self) -> None:
        try:
            while self._returning is not None:
                (by_key, done), self._returning = self._returning, None
                try:
                    with contextlib.suppress(RedisError, OSError):  # they lapse by themselves within SLOT_TTL
                        async with self._redis.pipeline(transaction=False) as pipe:
                            for key, slots in by_key.items():
                                pipe.zrem(key, *slots)
                            await pipe.execute()
                finally:
                    done.set_result(None)
        finally:  # cancelled (the edge is closing): whoever waits for the next batch waits no more
            if self._returning is not None:
                self._returning[1].set_result(None)
                self._returning = None

    async def renew_forever(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY)
            with contextlib.suppress(RedisError, OSError):
                await self.renew()

    async def renew(self) -> None:
        """Pushes every held slot's lapse forward: one ZADD per key (a user's, an address's) naming
        all its slots, in pipelines of at most ``RENEW_PER_CALL`` slots. A command per slot, as
        before, held the edge's loop for 100 ms at 2,000 streams, and every stream's delivery with it.
        """
        seconds, micros = await self._redis.time()  # Redis's clock, as OPEN's
        expires = seconds * 1000 + micros // 1000 + int(SLOT_TTL * 1000)
        by_key: dict[str, list[str]] = {}
        for slot, held in list(self._held.items()):
            for key in held:
                by_key.setdefault(key, []).append(slot)
        pipe, queued = self._redis.pipeline(transaction=False), 0
        for key, slots in by_key.items():
            for start in range(0, len(slots), RENEW_PER_CALL):
                part = slots[start : start + RENEW_PER_CALL]
                pipe.zadd(key, dict.fromkeys(part, expires), xx=True)  # XX: not one given back meanwhile
                queued += len(part)
                if queued >= RENEW_PER_CALL:
                    await pipe.execute()
                    queued = 0
            pipe.pexpireat(key, expires)
        await pipe.execute()
