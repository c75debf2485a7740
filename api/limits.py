"""Abuse limits on creating chats: prompt size, ``max_tokens``, and chats per minute per user.

The per-minute count lives in Redis (a counter per user and minute), so it holds across every
API process. Over a limit: 429 with ``Retry-After``.
"""

from __future__ import annotations

import math
import time

from redis.asyncio import Redis

from shared import keys
from shared.chats import ChatRequest
from shared.errors import RateLimited, Unprocessable
from shared.settings import Settings


def check_prompt(chat: ChatRequest, settings: Settings) -> None:
    if len(chat.messages) > settings.max_messages:
        raise Unprocessable(f"a chat may have at most {settings.max_messages} messages, not {len(chat.messages)}")
    chars = sum(len(m.content) for m in chat.messages)
    if chars > settings.max_prompt_chars:
        raise Unprocessable(f"the prompt may have at most {settings.max_prompt_chars} characters, not {chars}")
    if chat.max_tokens is not None and chat.max_tokens > settings.max_tokens_cap:
        raise Unprocessable(f"max_tokens may be at most {settings.max_tokens_cap}, not {chat.max_tokens}")


async def count_chat(redis: Redis, user: str, settings: Settings, now: float | None = None) -> None:
    """Counts a new chat against the user's minute; 429 once over ``chats_per_minute``."""
    now = time.time() if now is None else now
    window = int(now // 60)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.incr(keys.rate(user, window))
        pipe.expire(keys.rate(user, window), 120)
        count, _ = await pipe.execute()
    if count > settings.chats_per_minute:
        retry_after = max(1, math.ceil((window + 1) * 60 - now))
        raise RateLimited(
            f"at most {settings.chats_per_minute} chats a minute; try again in {retry_after} s", retry_after=retry_after
        )
