"""Leases: exactly one attempt runs a chat, and a dead worker's chats are found within seconds.

A chat starts in three steps (``shared.machine``): the worker lists it among its own, with the
attempt's token (control Redis); claims its lease (CLAIM, on the chat's own node of the streams
Redis); then takes its job off the queue (control). The sink's appends are fenced by the same
token. The lease has no TTL of its own: the attempt lives while its worker's heartbeat does (one
write per worker per beat, however many chats it runs). When a heartbeat lapses, any worker's
reaper puts each chat on the dead worker's list back on the queue (:func:`recover`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from streambridge.shared import keys, machine
from streambridge.shared.jobs import JOB_EXPIRES_MS, job_record

#: CLAIM's answers for a chat that has ended, or is gone: its job is stale
ENDED = frozenset({"complete", "failed", "cancelled", "missing"})


class Lease:
    def __init__(
        self,
        control: Redis,
        streams: machine.Store,
        worker_id: str,
        chat_id: str,
        token: str,
        requeue: Requeue | None = None,
    ) -> None:
        self.control = control
        self.streams = streams
        self.worker_id = worker_id
        self.chat_id = chat_id
        self.token = token
        self._requeue = requeue
        #: the chat's hash as the claim found it (its owner, request, attempts, created_ms, cancel flag)
        self.chat: dict[bytes, bytes] = {}
        #: Redis's clock (ms) when the chat started
        self.started_ms = 0

    def register(self, pipe: Pipeline) -> None:
        """Lists the chat among its worker's, before the claim: a worker that dies after claiming
        leaves the chat where a reaper finds it. Its answer: 1 listed, 0 refused (the worker's
        heartbeat had lapsed: it must not start chats until it beats again). (The script itself, not
        its hash: a pipeline has no second chance after NOSCRIPT.)"""
        c = machine.listing(self.worker_id, self.chat_id, self.token)
        pipe.eval(c.script.lua, len(c.keys), *c.keys, *c.args)  # type: ignore[arg-type]

    def claim_call(self) -> machine.Call:
        return machine.claim(self.chat_id, self.token)

    def took(self, answer: list[Any]) -> str:
        """``claimed`` (keeping the chat it read), or why not: ``busy`` (another attempt holds it),
        ``missing`` or a terminal status."""
        outcome = _text(answer[0])
        if outcome == "claimed":
            self.started_ms = int(answer[1])
            fields = answer[2:]
            self.chat = dict(zip(fields[::2], fields[1::2], strict=True))
        return outcome

    def take(self, pipe: Pipeline, outcome: str) -> None:
        """After the claim: a started or ended chat's job leaves the queue (a chat another attempt
        holds keeps it, and starts once that attempt lets go); a chat not started here leaves the list."""
        if outcome == "claimed" or outcome in ENDED:
            pipe.zrem(keys.queue(), self.chat_id)
            pipe.delete(keys.job(self.chat_id))
        if outcome != "claimed":
            self.unlist(pipe)

    def unlist(self, pipe: Pipeline) -> None:
        c = machine.unlisting(self.worker_id, self.chat_id, self.token)
        pipe.eval(c.script.lua, len(c.keys), *c.keys, *c.args)  # type: ignore[arg-type]

    async def claim(self) -> str:
        """All three steps for this chat alone (tests, and a worker's single starts)."""
        async with self.control.pipeline(transaction=False) as pipe:
            self.register(pipe)
            (listed,) = await pipe.execute()
        if not listed:
            return "unlisted"
        outcome = self.took(await machine.call(self.streams, self.claim_call()))
        async with self.control.pipeline(transaction=False) as pipe:
            self.take(pipe, outcome)
            await pipe.execute()
        return outcome

    @property
    def owner(self) -> str:
        return self.chat.get(b"owner", b"").decode()

    async def finished(self) -> None:
        """The chat ended (FINISH): it leaves its worker's list and its owner's running chats."""
        async with self.control.pipeline(transaction=False) as pipe:
            self.unlist(pipe)
            pipe.zrem(keys.active(self.owner), self.chat_id)
            await pipe.execute()

    async def cancel_flagged(self) -> bool:
        """Whether the chat's owner asked to cancel it (a backstop for a cancel message missed)."""
        return bool(await self.streams.hexists(keys.chat(self.chat_id), "cancel"))  # type: ignore[misc]

    async def release(self) -> int:
        """Hands the chat back now (its worker is stopping, or its run failed): back on the queue
        for another worker, as a reaper would. The recovery's number, or 0."""
        return await recover(self.control, self.streams, self.worker_id, self.chat_id, self.token, self._requeue)


#: sends a REQUEUE call and answers it: on a cluster, the worker's appender, which waits for a
#: replica to have it (a REQUEUE lost in a failover would leave the chat held by a dead attempt)
Requeue = Callable[[machine.Call], Awaitable[Any]]


async def recover(
    control: Redis,
    streams: machine.Store,
    worker_id: str,
    chat_id: str,
    token: str,
    requeue: Requeue | None = None,
    *,
    reaped: bool = False,
) -> int:
    """Puts a chat that ``worker_id`` listed with ``token`` back on the queue, unless it ended or
    another attempt holds it; then takes it off the list (if it is still listed with ``token``).
    Every step is safe to repeat, and a crash between any two leaves the chat listed, for the next
    reaper to finish. ``reaped``: by a reaper, for a worker taken for dead (its list is left alone
    if the worker came back). Answers the recovery's number when this call queued the chat again, else 0."""
    async with streams.pipeline(transaction=False) as pipe:  # one slot: one node, one round trip
        pipe.hmget(keys.chat(chat_id), ["status", "created_ms", "owner"])
        pipe.hget(keys.lease(chat_id), "token")
        (status, created_ms, owner), held = await pipe.execute()
    recovery = 0
    mine = held in (None, token.encode())
    if status in (b"running", b"queued") and mine:
        # The job first: a chat queued with no job would wait forever. (Queued already: a REQUEUE
        # done, or a claim never made, and its job is there, unless a failover lost a step.)
        enqueue = machine.enqueue(
            chat_id, job=job_record(chat_id), job_expires_ms=JOB_EXPIRES_MS, created_ms=int(created_ms or 0)
        )
        await machine.call(control, enqueue)
    if status == b"running" and mine:
        call = machine.requeue(chat_id, token)
        answer = await (requeue(call) if requeue is not None else machine.call(streams, call))
        if isinstance(answer, int):
            recovery = answer
        elif _text(answer) in ENDED:  # it ended meanwhile (its worker was not dead, only late)
            await control.zrem(keys.queue(), chat_id)
            await control.delete(keys.job(chat_id))
    unlisting = machine.unlisting(worker_id, chat_id, token, reaped=reaped)
    async with control.pipeline(transaction=False) as pipe:
        if (status is None or _text(status) in ENDED) and owner:
            pipe.zrem(keys.active(owner.decode()), chat_id)
        pipe.eval(unlisting.script.lua, len(unlisting.keys), *unlisting.keys, *unlisting.args)  # type: ignore[arg-type]
        await pipe.execute()
    return recovery


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
