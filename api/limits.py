"""Abuse limits on creating chats: prompt size, ``max_tokens``, and admission.

Admission is one Lua call that checks, in order, that the caller's credential still exists (a
process that remembers a credential does not read it again), the deployment's queue depth (503 at
once rather than a wait without bound), the user's chats queued or running, and the user's chats
this minute (each 429 with ``Retry-After``), and only then records the chat and enqueues its job.
Every count lives in Redis, so the limits hold across every API process, and a refused chat
counts for nothing.
"""

from __future__ import annotations

import math
import time
from typing import Final

import msgspec
from redis.asyncio import Redis

from streambridge.api.credentials import Identity
from streambridge.shared import keys
from streambridge.shared.chats import ChatRequest
from streambridge.shared.errors import Overloaded, RateLimited, Unauthorized, Unprocessable
from streambridge.shared.queue import ENQUEUE_LUA, job_record
from streambridge.shared.settings import Settings

#: a chat still counted as running this long past its deadline is counted no more (a lost worker)
RUNNING_SLACK_MS: Final = 60_000

ADMIT: Final = (
    ENQUEUE_LUA
    + """
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then return 'revoked' end
local waiting = redis.call('ZCARD', KEYS[1]) - redis.call('ZCARD', KEYS[2])
if waiting >= tonumber(ARGV[2]) then return 'queue' end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[4]) then return 'running' end
if tonumber(redis.call('GET', KEYS[3]) or '0') >= tonumber(ARGV[3]) then return 'rate' end
redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], 120)
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[6])
redis.call('PEXPIREAT', KEYS[4], ARGV[5])
redis.call('HSET', KEYS[5], 'owner', ARGV[8], 'created_at', ARGV[9], 'status', 'queued', 'attempts', 0,
  'request', ARGV[10])
redis.call('EXPIRE', KEYS[5], ARGV[7])
enqueue(KEYS[6], KEYS[7], KEYS[8], ARGV[11], ARGV[12], ARGV[13], ARGV[14], tonumber(ARGV[15]))
return 'ok'
"""
)


def check_prompt(chat: ChatRequest, identity: Identity) -> None:
    q = identity.quota
    if len(chat.messages) > q.max_messages:
        raise Unprocessable(f"a chat may have at most {q.max_messages} messages, not {len(chat.messages)}")
    chars = sum(len(m.content) for m in chat.messages)
    if chars > q.max_prompt_chars:
        raise Unprocessable(f"the prompt may have at most {q.max_prompt_chars} characters, not {chars}")
    if chat.max_tokens is not None and chat.max_tokens > q.max_tokens:
        raise Unprocessable(f"max_tokens may be at most {q.max_tokens}, not {chat.max_tokens}")


def bounded(chat: ChatRequest, identity: Identity) -> ChatRequest:
    """The chat as it will run: a key with its own ``--max-tokens`` bounds chats that name none.

    The deployment-wide cap does not fill in for them: servers such as vLLM and llama.cpp refuse a
    ``max_tokens`` beyond what the model's context leaves, so a default of 8192 would fail every
    such chat on a small model.
    """
    default = identity.quota.default_max_tokens
    if chat.max_tokens is not None or default is None:
        return chat
    return msgspec.structs.replace(chat, max_tokens=default)


async def admit_chat(
    redis: Redis,
    settings: Settings,
    identity: Identity,
    chat_id: str,
    *,
    created_at: str,
    request: bytes,
    now: float | None = None,
) -> None:
    """Records the new chat (status ``queued``) and enqueues its job if every limit allows it, else
    raises 429 or 503: one round trip."""
    now = time.time() if now is None else now
    window = int(now // 60)
    q = identity.quota
    deadline_ms = int(now * 1000 + settings.chat_deadline * 1000 + RUNNING_SLACK_MS)
    k = [keys.QUEUE_NAME, keys.running(), keys.rate(identity.user, window), keys.active(identity.user)]
    k.append(keys.chat(chat_id))
    args: list[str | bytes] = [str(int(now * 1000)), str(settings.max_queue_depth), str(q.chats_per_minute)]
    args += [str(q.max_running_chats), str(deadline_ms), chat_id, str(settings.result_ttl), identity.user]
    args += [created_at, request]
    job_keys, job_args = job_record(chat_id)
    k += [*job_keys, keys.credential(identity.credential)]
    args += job_args
    verdict = await redis.eval(ADMIT, len(k), *k, *args)  # type: ignore[arg-type,misc]
    verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
    if verdict == "revoked":
        raise Unauthorized("the token is unknown, expired or revoked")
    if verdict == "queue":
        raise Overloaded(
            f"the service has {settings.max_queue_depth} chats waiting already; try again shortly", retry_after=2
        )
    if verdict == "running":
        raise RateLimited(
            f"at most {q.max_running_chats} chats may be queued or running at once; wait for one to end",
            code="too_many_chats",
            retry_after=1,
        )
    if verdict == "rate":
        retry_after = max(1, math.ceil((window + 1) * 60 - now))
        raise RateLimited(
            f"at most {q.chats_per_minute} chats a minute; try again in {retry_after} s", retry_after=retry_after
        )


# Counts one more, unless the count is at the limit already: a refused login counts for nothing.
COUNT_UP_TO: Final = """
if tonumber(redis.call('GET', KEYS[1]) or '0') >= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


async def count_visitor_login(redis: Redis, settings: Settings, ip: str, now: float | None = None) -> None:
    """Visitors are free to make, and each has limits of its own: so one address makes only so many."""
    now = time.time() if now is None else now
    window = int(now // 60)
    limit = settings.visitor_logins_per_minute
    counted = await redis.eval(COUNT_UP_TO, 1, keys.visitor_logins(ip, window), str(limit), "120")  # type: ignore[misc]
    if not counted:
        retry_after = max(1, math.ceil((window + 1) * 60 - now))
        message = f"at most {settings.visitor_logins_per_minute} visitor logins a minute from one address"
        raise RateLimited(f"{message}; try again in {retry_after} s", retry_after=retry_after)
