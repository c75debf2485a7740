"""In every worker: its heartbeat, the re-queue of dead workers' chats, and the stop of cancelled chats."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, Final

from redis.asyncio import Redis

from streambridge.shared import keys, machine, metrics, trace
from streambridge.workers.lease import Requeue, recover
from streambridge.workers.runner import ChatRunner, Stop

log = logging.getLogger("streambridge.worker")


async def whose(redis: machine.Store, chat_id: str) -> dict[str, Any]:
    """The fields that follow a chat across processes (``shared.logs``), for a line logged outside
    its task: its id, its owner and its trace id, as far as Redis answers."""
    fields: dict[str, Any] = {"chat_id": chat_id}
    try:
        owner, stored = await redis.hmget(keys.chat(chat_id), ["owner", "trace"])  # type: ignore[misc]
    except Exception:  # the line is written without them
        return fields
    span = trace.decode(stored)
    if owner:
        fields["user"] = owner.decode()
    if span is not None:
        fields["trace_id"] = span.trace_id
    return fields


async def beat_forever(runner: ChatRunner, ttl: float) -> None:
    """The worker's heartbeat (its first was written before it took a chat: :func:`first_beat`).
    Beside it, never holding it up, an audit of the worker's list (:func:`audit`)."""
    control = runner.redis
    auditing: asyncio.Task[None] | None = None
    beats = 0
    try:
        while True:
            await asyncio.sleep(ttl / 3)
            beats += 1
            try:
                if await machine.call(control, machine.heartbeat(runner.worker_id, int(ttl * 1000))):
                    log.warning(
                        "worker: its heartbeat had lapsed (Redis unreachable, or the process stalled); "
                        "its chats may have been re-queued, and those that were stop at their next append",
                        extra={"event": "worker.heartbeat_lapsed"},
                    )
            except Exception as exc:  # the chats stay this worker's until the heartbeat lapses
                metrics.REDIS_ERRORS_WORKER.inc()
                log.warning("worker heartbeat: %s", exc)
            if auditing is None or auditing.done():
                auditing = asyncio.create_task(audit(runner, ttl, flags=beats % AUDIT_FLAGS_EVERY == 0))
    finally:
        if auditing is not None:
            auditing.cancel()
            await asyncio.gather(auditing, return_exceptions=True)


#: every how many heartbeats the audit also reads the running chats' cancel flags
AUDIT_FLAGS_EVERY: Final = 10
#: how long a worker's reaper (or its audit) keeps a dead worker's list to itself, in ms
REAP_LOCK_MS: Final = 5000


async def audit(runner: ChatRunner, ttl: float, *, flags: bool = False) -> None:
    """A chat listed here that runs here no more (a hand-back whose last step failed) would
    otherwise wait for this worker's death: it is handed back now. With ``flags``, the running
    chats' cancel flags are read too (the backstop for a cancel message missed). Bounded: a Redis
    that does not answer holds up the audit, never the heartbeat."""
    try:
        async with asyncio.timeout(ttl * 2):
            listed: dict[bytes, bytes] = await runner.redis.hgetall(keys.worker_chats(runner.worker_id))  # type: ignore[misc]
            strays = [(c.decode(), t.decode()) for c, t in listed.items() if _idle(runner, c.decode())]
            if strays and await _lock(runner.redis, runner.worker_id):
                try:
                    for chat_id, token in strays:
                        if not _idle(runner, chat_id):
                            continue  # started again meanwhile
                        requeue = runner.requeue
                        if await recover(runner.redis, runner.streams, runner.worker_id, chat_id, token, requeue):
                            extra = {"event": "chat.reaped", **await whose(runner.streams, chat_id)}
                            log.warning("chat %s: listed here but not running here; re-queued", chat_id, extra=extra)
                finally:
                    await _unlock(runner.redis, runner.worker_id)
            if flags:
                await runner.stop_flagged()
    except Exception as exc:
        log.warning("worker audit: %s", exc or type(exc).__name__)


def _idle(runner: ChatRunner, chat_id: str) -> bool:
    return chat_id not in runner.active and chat_id not in runner.starting


async def _lock(control: Redis, worker_id: str) -> bool:
    """One recoverer at a time for a worker's list: two that interleave on one chat could queue it
    again after another worker started it (a stale job, found busy by every scan until it ends).
    Held by this process (its token), so that its release never frees another's lock."""
    return bool(await control.set(keys.reaping(worker_id), _LOCK_TOKEN, nx=True, px=REAP_LOCK_MS))


async def _unlock(control: Redis, worker_id: str) -> None:
    await control.eval(_UNLOCK, 1, keys.reaping(worker_id), _LOCK_TOKEN)  # type: ignore[misc]


#: this process's reaper lock token
_LOCK_TOKEN: Final = uuid.uuid4().hex
_UNLOCK: Final = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


async def first_beat(control: Redis, worker_id: str, ttl: float) -> None:
    await machine.call(control, machine.heartbeat(worker_id, int(ttl * 1000), first=True))


async def retire(control: Redis, worker_id: str) -> None:
    """The worker stops: whatever it still lists (a hand-back that failed) is any reaper's at once."""
    await control.zadd(keys.workers(), {worker_id: 0})


async def reap_forever(control: Redis, streams: machine.Store, interval: float, requeue: Requeue | None = None) -> None:
    while True:
        try:
            await reap(control, streams, requeue)
        except Exception as exc:
            metrics.REDIS_ERRORS_WORKER.inc()
            log.warning("reaper: %s", exc)
        await asyncio.sleep(interval)


async def reap(control: Redis, streams: machine.Store, requeue: Requeue | None = None) -> None:
    """Every chat of every worker whose heartbeat lapsed goes back on the queue; then the worker is
    forgotten. A dead worker's list is one reaper's at a time (:func:`_lock`)."""
    for worker_id in await machine.call(control, machine.dead()):
        worker_id = worker_id.decode()
        if not await _lock(control, worker_id):
            continue
        try:
            await _reap_worker(control, streams, worker_id, requeue)
        finally:
            await _unlock(control, worker_id)


async def _reap_worker(control: Redis, streams: machine.Store, worker_id: str, requeue: Requeue | None) -> None:
    listed: dict[bytes, bytes] = await control.hgetall(keys.worker_chats(worker_id))  # type: ignore[misc]
    for chat, token in listed.items():
        chat_id = chat.decode()
        try:
            recovery = await recover(control, streams, worker_id, chat_id, token.decode(), requeue, reaped=True)
        except Exception as exc:  # this chat waits for the next round; the others go on
            metrics.REDIS_ERRORS_WORKER.inc()
            log.warning("reaper: chat %s: %s", chat_id, exc)
            continue
        if recovery:
            metrics.REAPED.inc()
            extra = {"event": "chat.reaped", "recovery": recovery, **await whose(streams, chat_id)}
            log.warning("chat %s: its worker is gone; re-queued (recovery %d)", chat_id, recovery, extra=extra)
    await machine.call(control, machine.forget(worker_id))


async def listen_for_cancels(redis: Redis, runner: ChatRunner) -> None:
    """Owners' cancel requests reach the worker running the chat at once, wherever it runs. After
    each (re)subscription the worker's chats' flags are read too: a request sent while this
    listener was reconnecting is not missed."""
    while True:
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(keys.cancels())
            await runner.stop_flagged()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and runner.stop(chat_id := message["data"].decode(), Stop.CANCELLED):
                    extra = {"event": "chat.cancelling", **await whose(runner.streams, chat_id)}
                    log.info("chat %s: cancelling at its owner's request", chat_id, extra=extra)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("cancel listener: %s; reconnecting", exc)
            await asyncio.sleep(0.5)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
