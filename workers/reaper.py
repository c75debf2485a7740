"""In every worker: its heartbeat, the re-queue of dead workers' chats, and the stop of cancelled chats."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio import Redis

from streambridge.shared import keys, machine, metrics, trace
from streambridge.workers.lease import recover
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
    """The worker's heartbeat (its first was written before it took a chat: :func:`first_beat`),
    and an audit of its list with each: a chat listed here that runs here no more (a FINISH or a
    hand-back whose second half Redis lost in a restart) would otherwise wait for this worker's death."""
    control = runner.redis
    while True:
        await asyncio.sleep(ttl / 3)
        try:
            if await machine.call(control, machine.heartbeat(runner.worker_id, int(ttl * 1000))):
                log.warning(
                    "worker: its heartbeat had lapsed (Redis unreachable, or the process stalled); "
                    "its chats may have been re-queued, and those that were stop at their next append",
                    extra={"event": "worker.heartbeat_lapsed"},
                )
            await audit(runner)
        except Exception as exc:  # the chats stay this worker's until the heartbeat lapses
            metrics.REDIS_ERRORS_WORKER.inc()
            log.warning("worker heartbeat: %s", exc)


async def audit(runner: ChatRunner) -> None:
    listed: list[bytes] = await runner.redis.hkeys(keys.worker_chats(runner.worker_id))  # type: ignore[misc]
    for raw in listed:
        chat_id = raw.decode()
        if chat_id in runner.active or chat_id in runner.starting:
            continue
        token = await runner.redis.hget(keys.worker_chats(runner.worker_id), chat_id)  # type: ignore[misc]
        if token is None or chat_id in runner.active or chat_id in runner.starting:
            continue  # let go of meanwhile, or started again
        if await recover(runner.redis, runner.streams, runner.worker_id, chat_id, token.decode()):
            extra = {"event": "chat.reaped", **await whose(runner.streams, chat_id)}
            log.warning("chat %s: listed here but not running here; re-queued", chat_id, extra=extra)


async def first_beat(control: Redis, worker_id: str, ttl: float) -> None:
    await machine.call(control, machine.heartbeat(worker_id, int(ttl * 1000), first=True))


async def retire(control: Redis, worker_id: str) -> None:
    """The worker stops: whatever it still lists (a hand-back that failed) is any reaper's at once."""
    await control.zadd(keys.workers(), {worker_id: 0})


async def reap_forever(control: Redis, streams: machine.Store, interval: float) -> None:
    while True:
        try:
            await reap(control, streams)
        except Exception as exc:
            metrics.REDIS_ERRORS_WORKER.inc()
            log.warning("reaper: %s", exc)
        await asyncio.sleep(interval)


async def reap(control: Redis, streams: machine.Store) -> None:
    """Every chat of every worker whose heartbeat lapsed goes back on the queue; then the worker is forgotten."""
    for worker_id in await machine.call(control, machine.dead()):
        worker_id = worker_id.decode()
        listed: dict[bytes, bytes] = await control.hgetall(keys.worker_chats(worker_id))  # type: ignore[misc]
        for chat, token in listed.items():
            chat_id = chat.decode()
            recovery = await recover(control, streams, worker_id, chat_id, token.decode())
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
