"""One worker's appends, every chat's, sent together: one pipeline per round trip.

A worker streams many chats at once, and an LLM sends each token on its own. Sent one call per
chat, each token cost a Redis round trip of its own: taking a pooled connection, a write, a
read, a wake-up; at 50 chats a third of a worker's CPU (docs/benchmarks.md). Here each chat's
batch joins the pipeline that goes next: at once when none is in flight (no fixed delay), or
as soon as the one in flight returns, together with every batch that came meanwhile.

Each chat still has at most one batch in flight (its sink waits for the answer before it sends
the next), so a chat's events keep their order; the sink's sequence numbers make a batch Redis
already applied harmless if a reconnect sends it again. So a round trip whose connection broke
(a failover, a proxy's reset, ``CLIENT KILL``) is sent again, the same calls with the same
sequence numbers, for up to ``retry_for`` seconds (on a cluster, as long as a primary's failover
takes; the leases hold meanwhile: they have no TTL): a dropped socket costs a retry, not an attempt.

On a Redis Cluster the round trip is one pipeline per node (redis-py's cluster pipeline groups the
calls by their keys' slot and follows MOVED); a promoted replica, which has no scripts yet, gets
the NOSCRIPT calls again as EVAL.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.exceptions import ClusterDownError, NoScriptError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streambridge.shared.machine import Script, Store

#: what a dropped connection, or a cluster between a primary's death and its replica's promotion,
#: raises: the round trip is sent again
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError, OSError)

Waiting = tuple[Script, list[str], list[str | bytes], asyncio.Future[Any]]


class Appender:
    def __init__(self, redis: Store, *, retry_for: float = 0.75) -> None:
        self._redis = redis
        self._retry_for = retry_for
        self._queue: list[Waiting] = []
        self._sender: asyncio.Task[None] | None = None

    async def call(self, script: Script, keys: list[str], args: list[str | bytes]) -> Any:
        """``script``'s answer, sent with whatever else is waiting to go."""
        answer = asyncio.get_running_loop().create_future()
        self._queue.append((script, keys, args, answer))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())
        return await answer

    async def close(self) -> None:
        """Stop sending (the worker is done): whoever still waits for an answer is cancelled."""
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        for *_, answer in self._queue:
            answer.cancel()
        self._queue = []

    async def _send(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                answers = await self._execute_again_if_dropped(batch)
            except Exception as exc:  # Redis unreachable: every caller of this round trip hears it
                answers = [exc] * len(batch)
            except asyncio.CancelledError:  # the worker's loop is closing: nobody waits forever
                for *_, answer in [*batch, *self._queue]:
                    answer.cancel()
                raise
            for (*_, answer), result in zip(batch, answers, strict=True):
                if answer.done():  # its caller was cancelled
                    continue
                if isinstance(result, BaseException):
                    answer.set_exception(result)
                else:
                    answer.set_result(result)

    async def _execute_again_if_dropped(self, batch: list[Waiting]) -> list[Any]:
        loop = asyncio.get_running_loop()
        give_up, delay = loop.time() + self._retry_for, 0.02
        while True:
            try:
                # bounded as a whole: the client's own retries and socket timeout would run on past it
                async with asyncio.timeout(max(0.0, give_up - loop.time())):
                    return await self._execute(batch)
            except TimeoutError:
                raise RedisTimeoutError(f"an append went unanswered for {self._retry_for:g} s") from None
            except TRANSIENT:
                if loop.time() + delay > give_up:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def _execute(self, batch: list[Waiting], *, command: str = "EVALSHA") -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for script, keys, args, _ in batch:
                # execute_command: a cluster pipeline refuses ``evalsha()``, not the command itself
                body = script.sha if command == "EVALSHA" else script.lua
                pipe.execute_command(command, body, len(keys), *keys, *args)
            answers: list[Any] = await pipe.execute(raise_on_error=False)
        unknown = [n for n, a in enumerate(answers) if isinstance(a, NoScriptError)]
        if unknown and command == "EVALSHA":  # a restarted Redis, or a promoted replica: send the scripts
            again = await self._execute([batch[n] for n in unknown], command="EVAL")
            for n, answer in zip(unknown, again, strict=True):
                answers[n] = answer
        transient = next((a for a in answers if isinstance(a, TRANSIENT)), None)
        if transient is not None:  # a node of the cluster dropped: the whole round trip again (each call is fenced)
            raise transient
        return answers
