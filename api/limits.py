"""Abuse limits on creating chats: prompt size, ``max_tokens``, and admission.

Admission is one Lua call (``shared.machine.ADMIT``) that checks, in order, that the caller's
credential still exists (a process that remembers a credential does not read it again), whether
the ``Idempotency-Key`` already names a chat (that chat is the answer), the deployment's queue depth
(503 at once rather than a wait without bound), the user's chats queued or running, and the user's
chats this minute (each 429 with ``Retry-After``), and only then records the chat and enqueues its
job. Every count lives in Redis, so the limits hold across every API process, and a refused chat
counts for nothing. The call is safe to send twice: a re-send after a lost reply finds its chat.
"""

from __future__ import annotations

import math
from typing import Final

import msgspec
from redis.asyncio import Redis

from streambridge.api.credentials import Identity
from streambridge.shared import keys, machine
from streambridge.shared.chats import ChatRequest
from streambridge.shared.errors import Overloaded, RateLimited, Unauthorized, Unprocessable
from streambridge.shared.jobs import JOB_EXPIRES_MS, job_record
from streambridge.shared.settings import Settings

#: a chat still counted as running this long past its deadline is counted no more (a lost worker)
RUNNING_SLACK_MS: Final = 60_000
#: how long an ``Idempotency-Key`` names the chat it created (at most: never beyond the chat itself)
IDEMPOTENCY_TTL: Final = 86_400


def check_prompt(chat: ChatRequest, identity: Identity) -> None:
    q = identity.quota
    if chat.extra and q.vendor_fields is not None:
        refused = next((name for name in chat.extra if name not in q.vendor_fields), None)
        if refused is not None:  # the operator's to open: ``STREAMBRIDGE_VENDOR_FIELDS``
            raise Unprocessable(f"`{refused}` is not a field this deployment passes to the LLM", param=refused)
    if len(chat.messages) > q.max_messages:
        raise Unprocessable(
            f"a chat may have at most {q.max_messages} messages, not {len(chat.messages)}", param="messages"
        )
    # what the upstream reads counts: tools' definitions, earlier tool calls and vendors' fields too
    chars = sum(len(m.text()) for m in chat.messages)
    for part in (chat.tools, [m.tool_calls for m in chat.messages if m.tool_calls], chat.extra):
        chars += len(msgspec.json.encode(part)) if part else 0
    if chars > q.max_prompt_chars:
        raise Unprocessable(f"the prompt may have at most {q.max_prompt_chars} characters, not {chars}")
    for name in ("max_tokens", "max_completion_tokens"):
        asked = getattr(chat, name)
        if asked is not None and asked > q.max_tokens:
            raise Unprocessable(f"{name} may be at most {q.max_tokens}, not {asked}", param=name)


def bounded(chat: ChatRequest, identity: Identity) -> ChatRequest:
    """The chat as it will run: a key with its own ``--max-tokens`` bounds chats that name none.

    The deployment-wide cap does not fill in for them: servers such as vLLM and llama.cpp refuse a
    ``max_tokens`` beyond what the model's context leaves, so a default of 8192 would fail every
    such chat on a small model.
    """
    default = identity.quota.default_max_tokens
    if chat.max_tokens is not None or chat.max_completion_tokens is not None or default is None:
        return chat
    return msgspec.structs.replace(chat, max_tokens=default)


async def admit_chat(
    redis: Redis,
    streams: machine.Store,
    settings: Settings,
    identity: Identity,
    chat_id: str,
    *,
    created_at: str,
    request: bytes,
    idempotency_key: str | None = None,
    idempotency_ttl: int = IDEMPOTENCY_TTL,
    replay: bool = True,
    trace: str = "",
) -> str:
    """Records the new chat (status ``queued``, on the streams Redis) and enqueues its job if every
    limit allows it (on the control Redis), else takes the record back and raises 429 or 503: two
    round trips, each safe to send twice. Returns the chat's id: ``chat_id``, or the chat an earlier
    request with the same ``idempotency_key`` created (its request must be the same).

    A crash between the two, or an error from ADMIT, leaves the record (ADMIT may have run, its
    answer lost): with no job pointing to it, no worker ever finds it, and it expires with the
    result TTL."""
    q = identity.quota
    limits = machine.Admission(
        max_queue=settings.max_queue_depth,
        chats_per_minute=q.chats_per_minute,
        max_running=q.max_running_chats,
        deadline_ms=int(settings.chat_deadline * 1000) + RUNNING_SLACK_MS,
        result_ttl=settings.result_ttl,
    )
    created = machine.create(
        chat_id, identity.user, created_at=created_at, request=request, result_ttl=settings.result_ttl, trace=trace
    )
    await machine.call(streams, created)
    admission = machine.admit(
        chat_id,
        identity.user,
        identity.credential,
        request=request,
        job=job_record(chat_id),
        job_expires_ms=JOB_EXPIRES_MS,
        limits=limits,
        idempotency_key=idempotency_key,
        idempotency_ttl=min(idempotency_ttl, settings.result_ttl),
        replay=replay,
    )
    # A lost reply is not a refusal (ADMIT may have run): the record stays, and expires if unused.
    answer = await machine.call(redis, admission)
    verdict, *detail = [_text(v) if isinstance(v, bytes) else v for v in answer]
    if verdict == "ok":
        return chat_id
    await streams.delete(keys.chat(chat_id))  # refused, or another chat answers: this one never was
    if verdict == "replay":
        return str(detail[0])
    if verdict == "reused":
        raise Unprocessable(
            "this Idempotency-Key was used for a different request; use a new key for a new chat",
            code="idempotency_key_reused",
        )
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
    retry_after = _seconds(int(detail[0]))
    raise RateLimited(
        f"at most {q.chats_per_minute} chats a minute; try again in {retry_after} s", retry_after=retry_after
    )


def _seconds(pttl: int) -> int:
    """A Retry-After, from a window's remaining milliseconds (PTTL)."""
    return max(1, math.ceil(pttl / 1000))


def _text(value: bytes) -> str:
    return value.decode()


# Counts one more in the window that began with the first (a minute, by Redis's clock), unless the
# count is at the limit already: a refused login counts for nothing. Answers the window's PTTL if refused.
COUNT_UP_TO: Final = """
if tonumber(redis.call('GET', KEYS[1]) or '0') >= tonumber(ARGV[1]) then return redis.call('PTTL', KEYS[1]) end
if redis.call('INCR', KEYS[1]) == 1 or redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], 60000) end
return 0
"""


async def count_visitor_login(redis: Redis, settings: Settings, ip: str) -> None:
    """Visitors are free to make, and each has limits of its own: so one address makes only so many."""
    limit = settings.visitor_logins_per_minute
    refused = int(await redis.eval(COUNT_UP_TO, 1, keys.visitor_logins(ip), str(limit)))  # type: ignore[misc]
    if refused:
        retry_after = _seconds(refused)
        message = f"at most {settings.visitor_logins_per_minute} visitor logins a minute from one address"
        raise RateLimited(f"{message}; try again in {retry_after} s", retry_after=retry_after)
