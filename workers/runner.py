"""Runs one chat: load it, stream attempts through the pipeline into the sink, store the result."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncGenerator
from contextlib import aclosing

import msgspec
import openai
from redis.asyncio import Redis

from shared import keys
from shared.chats import TERMINAL_STATUSES, ChatRequest, ChatResult, decode_request
from shared.events import Complete, Content, Event, Failed, Started
from shared.settings import Settings
from workers.llm import classify, stream_deltas
from workers.pipeline import Delta, chat_events, with_timeouts
from workers.sink import LeaseLost, StreamSink

log = logging.getLogger("streambridge.worker")


class ResultTracker:
    """Folds the events into the chat's final result (the completing attempt's text)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.result: ChatResult | None = None

    def observe(self, event: Event) -> None:
        if isinstance(event, Started):
            self.parts = []
        elif isinstance(event, Content):
            self.parts.append(event.content)
        elif isinstance(event, Complete):
            self.result = ChatResult(
                status="complete",
                content="".join(self.parts),
                finish_reason=event.finish_reason,
                usage=event.usage,
                attempts=event.attempt,
            )
        elif isinstance(event, Failed):
            self.result = ChatResult(status="failed", attempts=event.attempts, error=event.message)


class ChatRunner:
    def __init__(self, redis: Redis, llm: openai.AsyncOpenAI, settings: Settings) -> None:
        self.redis = redis
        self.llm = llm
        self.settings = settings

    async def run(self, chat_id: str) -> str:
        chat = await self.redis.hgetall(keys.chat(chat_id))  # type: ignore[misc]
        if not chat:
            log.warning("chat %s: not found (expired?); nothing to run", chat_id)
            return "missing"
        status: str = chat[b"status"].decode()
        if status in TERMINAL_STATUSES:
            return status
        request = decode_request(chat[b"request"])
        first_attempt = int(chat.get(b"attempts", b"0")) + 1
        token = secrets.token_hex(16)
        await self.redis.hset(keys.lease(chat_id), mapping={"token": token, "seq": 0})  # type: ignore[misc]
        await self.redis.hset(keys.chat(chat_id), "status", "running")  # type: ignore[misc]
        sink = StreamSink(self.redis, chat_id, token, maxlen=self.settings.stream_maxlen)
        try:
            result = await self._stream(chat_id, request, first_attempt, sink)
        except LeaseLost:
            log.warning("chat %s: lease lost; another attempt owns it", chat_id)
            return "lease_lost"
        finally:
            await sink.close()
        await self._finish(chat_id, result)
        log.info("chat %s: %s after %d attempt(s)", chat_id, result.status, result.attempts)
        return result.status

    async def _stream(self, chat_id: str, request: ChatRequest, first_attempt: int, sink: StreamSink) -> ChatResult:
        s = self.settings
        model = request.model or s.llm_model

        def open_stream() -> AsyncGenerator[Delta, None]:
            return with_timeouts(
                stream_deltas(self.llm, request, model), first=s.first_token_timeout, idle=s.idle_timeout
            )

        tracker = ResultTracker()
        events = chat_events(
            open_stream,
            classify,
            model=model,
            first_attempt=first_attempt,
            max_attempts=max(s.max_attempts, first_attempt),
            progress_every=s.progress_every,
            retry_base_delay=s.retry_base_delay,
        )
        async with aclosing(events):
            async for event in events:
                tracker.observe(event)
                if isinstance(event, Started):
                    # Persisted before the attempt's events, so a re-run numbers its attempt after it.
                    await self.redis.hset(keys.chat(chat_id), "attempts", str(event.attempt))  # type: ignore[misc]
                await sink.append(event)
        await sink.drain()
        assert tracker.result is not None, "chat_events always ends with complete or failed"
        return tracker.result

    async def _finish(self, chat_id: str, result: ChatResult) -> None:
        s = self.settings
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.chat(chat_id), mapping={"status": result.status, "result": msgspec.json.encode(result)})
            pipe.expire(keys.chat(chat_id), s.result_ttl)
            pipe.expire(keys.events(chat_id), s.stream_ttl)
            pipe.delete(keys.lease(chat_id))
            await pipe.execute()
