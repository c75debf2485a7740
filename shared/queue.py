"""Enqueueing a chat: the arq job, and the token that wakes an idle worker at once."""

from __future__ import annotations

from typing import Final

from arq.connections import ArqRedis
from arq.constants import expires_extra_ms, job_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms

from streambridge.shared import keys

#: wake tokens kept when no worker is waiting; more would only cause empty polls later
WAKE_BACKLOG: Final = 100
JOB_FUNCTION: Final = "run_chat"

# What ``ArqRedis.enqueue_job`` writes (arq's job record and its queue entry), and the wake token,
# as a Lua fragment: the API runs it in the same call that admits and records the chat.
# KEYS: job, queue, wake; ARGV: job id, serialized job, expiry (ms), score (ms), wake backlog.
ENQUEUE_LUA: Final = """
local function enqueue(job_key, queue, wake, job_id, job, expires_ms, score, backlog)
  if redis.call('SET', job_key, job, 'PX', expires_ms, 'NX') then
    redis.call('ZADD', queue, score, job_id)
    redis.call('LPUSH', wake, job_id)
    redis.call('LTRIM', wake, 0, backlog - 1)
  end
end
"""


def job_record(chat_id: str, job_id: str | None = None) -> tuple[list[str], list[str | bytes]]:
    """The keys and arguments of :data:`ENQUEUE_LUA` for the chat's job, as arq would enqueue it now."""
    job_id = job_id or chat_id
    now = timestamp_ms()
    job = serialize_job(JOB_FUNCTION, (chat_id,), {}, None, now)
    return [job_key_prefix + job_id, keys.QUEUE_NAME, keys.wake()], [
        job_id,
        job,
        str(expires_extra_ms),
        str(now),
        str(WAKE_BACKLOG),
    ]


async def enqueue_chat(redis: ArqRedis, chat_id: str, *, job_id: str | None = None) -> None:
    """Queue the chat's job (its id is the chat id, or ``job_id`` for a re-run) and hand its id to
    an idle worker, which starts it at once (arq's own scan of the queue is the fallback)."""
    job_id = job_id or chat_id
    await redis.enqueue_job(JOB_FUNCTION, chat_id, _job_id=job_id, _queue_name=keys.QUEUE_NAME)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.lpush(keys.wake(), job_id)
        pipe.ltrim(keys.wake(), 0, WAKE_BACKLOG - 1)
        await pipe.execute()
