"""Leases: exactly one attempt runs a chat, and a dead worker's chat is found within seconds.

An attempt starts a chat by taking its job off the queue and creating its lease (a token with a
short TTL), in one call (``shared.machine.START``), and keeps the lease alive while it runs; the
sink's appends are fenced by the same token. The ``running`` sorted set scores each chat by when
its lease lapses, so every worker's reaper finds a dead worker's chat with one range query and
puts it back on the queue (``REAP``).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from streambridge.shared import machine


class Lease:
    def __init__(self, redis: Redis, chat_id: str, token: str, ttl: float) -> None:
        self.redis = redis
        self.chat_id = chat_id
        self.token = token
        self.ttl_ms = int(ttl * 1000)
        #: the chat's hash as the start found it (its owner, request, attempts, created_ms, cancel flag)
        self.chat: dict[bytes, bytes] = {}
        #: Redis's clock (ms) when the chat started
        self.started_ms = 0

    def start(self, pipe: Pipeline) -> None:
        """Queues the chat's start on ``pipe``; :meth:`took` reads its answer. (The script itself,
        not its hash: a pipeline has no second chance after NOSCRIPT, and starts are rare.)"""
        c = machine.start(self.chat_id, self.token, self.ttl_ms)
        pipe.eval(c.script.lua, len(c.keys), *c.keys, *c.args)  # type: ignore[arg-type]

    async def claim(self) -> str:
        """Starts the chat now, in a call of its own: ``claimed``, or why not (see :meth:`took`)."""
        return self.took(await machine.call(self.redis, machine.start(self.chat_id, self.token, self.ttl_ms)))

    def took(self, answer: list[Any]) -> str:
        """``claimed`` (keeping the chat it read), or why not: ``taken`` (another worker started it,
        or it was cancelled), ``missing``, ``busy`` or a terminal status."""
        outcome = _text(answer[0])
        if outcome == "claimed":
            self.started_ms = int(answer[1])
            fields = answer[2:]
            self.chat = dict(zip(fields[::2], fields[1::2], strict=True))
        return outcome

    @property
    def owner(self) -> str:
        return self.chat.get(b"owner", b"").decode()

    async def renew(self) -> int:
        """0: the lease is lost; 1: renewed; 2: renewed, but the chat's owner asked to cancel it."""
        return int(await machine.call(self.redis, machine.renew(self.chat_id, self.token, self.ttl_ms)))

    async def release(self) -> bool:
        return bool(await machine.call(self.redis, machine.release(self.chat_id, self.token)))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
