"""Enqueueing a chat: the arq job, and the token that wakes an idle worker at once."""

from __future__ import annotations

from arq.connections import ArqRedis

from shared import keys

#: wake tokens kept when no worker is waiting; more would only cause empty polls later
WAKE_BACKLOG = 100


async def enqueue_chat(redis: ArqRedis, chat_id: str, *, job_id: str | None = None) -> None:
    """Queue the chat's job (its id is the chat id, or ``job_id`` for a re-run) and hand its id to
    an idle worker, which starts it at once (arq's own scan of the queue is the fallback)."""
    job_id = job_id or chat_id
    await redis.enqueue_job("run_chat", chat_id, _job_id=job_id, _queue_name=keys.QUEUE_NAME)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.lpush(keys.wake(), job_id)
        pipe.ltrim(keys.wake(), 0, WAKE_BACKLOG - 1)
        await pipe.execute()
