"""In every worker: re-queue chats whose lease lapsed (their worker died), and stop cancelled chats."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio import Redis

from streambridge.shared import keys, machine, metrics, trace
from streambridge.shared.jobs import JOB_EXPIRES_MS, job_record
from streambridge.workers.runner import ChatRunner, Stop

log = logging.getLogger("streambridge.worker")


async def whose(redis: Redis, chat_id: str) -> dict[str, Any]:
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


async def reap_forever(redis: Redis, interval: float) -> None:
    while True:
        try:
            for chat_id in await machine.call(redis, machine.lapsed()):
                chat_id = chat_id.decode()
                reaped = machine.reap(chat_id, job=job_record(chat_id), job_expires_ms=JOB_EXPIRES_MS)
                recovery = await machine.call(redis, reaped)
                if recovery:
                    metrics.REAPED.inc()
                    extra = {"event": "chat.reaped", "recovery": recovery, **await whose(redis, chat_id)}
                    log.warning("chat %s: its worker is gone; re-queued (recovery %d)", chat_id, recovery, extra=extra)
        except Exception as exc:
            metrics.REDIS_ERRORS_WORKER.inc()
            log.warning("reaper: %s", exc)
        await asyncio.sleep(interval)


async def listen_for_cancels(redis: Redis, runner: ChatRunner) -> None:
    """Owners' cancel requests reach the worker running the chat at once, wherever it runs."""
    while True:
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(keys.cancels())
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and runner.stop(chat_id := message["data"].decode(), Stop.CANCELLED):
                    extra = {"event": "chat.cancelling", **await whose(redis, chat_id)}
                    log.info("chat %s: cancelling at its owner's request", chat_id, extra=extra)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("cancel listener: %s; reconnecting", exc)
            await asyncio.sleep(0.5)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
