"""The generator pipeline: provider deltas in, typed events out.

Pure: no Redis, no openai SDK. ``attempt_events`` turns one attempt's deltas into
``started → reasoning/content/tool_call/progress… → complete``; ``chat_events`` runs attempts with backoff
until one completes or the attempts run out, announcing each failure.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import NamedTuple

import msgspec

from streambridge.shared.events import (
    Complete,
    Content,
    Error,
    Event,
    Failed,
    Progress,
    Reasoning,
    Started,
    Status,
    ToolCallFragment,
    Usage,
)


class ToolCallDelta(msgspec.Struct, frozen=True):
    """One fragment of a streamed tool call (OpenAI's ``delta.tool_calls[i]``)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class Delta(NamedTuple):
    """What one provider chunk contributes: text, reasoning, tool call fragments, maybe a finish reason and usage."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()


class Failure(NamedTuple):
    """How the job should treat an exception an attempt raised."""

    message: str
    retryable: bool
    retry_after: float | None = None
    upstream_status: int | None = None  # the HTTP status the upstream refused the request with
    code: str | None = None  # and its error's code and param, as it said them
    param: str | None = None


class UpstreamTimeout(Exception):
    """The provider sent nothing for too long (before the first chunk, or between two)."""


class IncompleteStream(Exception):
    """The provider's stream ended without a ``finish_reason``: it broke part-way."""


OpenStream = Callable[[], AsyncGenerator[Delta, None]]
Classify = Callable[[BaseException], Failure]


_SURROGATE = re.compile("[\ud800-\udfff]")


class SurrogateJoiner:
    """Re-pairs UTF-16 surrogates that a provider split across two chunks.

    A server that cuts text in UTF-16 code units sends half an emoji as a lone ``\\ud83d``;
    it is held back until its other half arrives, so every event carries valid text.
    """

    def __init__(self) -> None:
        self._held = ""

    def feed(self, text: str) -> str:
        if not self._held and (text.isascii() or _SURROGATE.search(text) is None):
            return text  # the usual case, checked without a loop over the characters in Python
        text = self._held + text
        self._held = ""
        if text and "\ud800" <= text[-1] <= "\udbff":
            text, self._held = text[:-1], text[-1]
        if _SURROGATE.search(text) is not None:
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return text

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "\ufffd" if held else ""


class _Deadline:
    """A stall deadline kept lazily: moving it is two stores, not a timer per chunk.

    ``asyncio.timeout`` per chunk creates and cancels a timer each time, and under uvloop a timer
    is a libuv handle: that cost a fifth of a worker's CPU at full speed. Here one timer is armed
    for the deadline; when it fires and the deadline has moved on, it re-arms itself for the new
    one, so a steady stream costs one timer per ``limit`` seconds. Only the time spent waiting on
    the provider counts (as with a timeout around each ``anext``), not the time the consumer holds
    the generator suspended between chunks. The cancellation it causes is told apart from any
    other as ``asyncio.timeout`` does, by the task's count of cancel requests.
    """

    __slots__ = ("_handle", "_loop", "_scheduled", "_task", "cancelling", "deadline", "expired", "waiting")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._handle: asyncio.TimerHandle | None = None
        self._scheduled = 0.0
        self.deadline = 0.0
        self.waiting = False
        self.expired = False
        self.cancelling = 0

    def arm(self, limit: float) -> None:
        """The provider has ``limit`` seconds from now to deliver the next delta."""
        self.deadline = self._loop.time() + limit
        self.cancelling = self._task.cancelling()
        self.waiting = True
        if self._handle is None:
            self._schedule()
        elif self.deadline < self._scheduled:  # a shorter limit now (idle after first): sooner
            self._handle.cancel()
            self._schedule()

    def _schedule(self) -> None:
        self._scheduled = self.deadline
        self._handle = self._loop.call_at(self.deadline, self._fire)

    def _fire(self) -> None:
        self._handle = None
        if not self.waiting:
            return  # the consumer holds the stream between chunks: ``arm`` schedules again
        if self.deadline > self._scheduled:
            self._schedule()  # deltas came in time: wait for the current deadline
            return
        self.expired = True
        self._task.cancel()

    def disarm(self) -> bool:
        """The wait is over; True if it ended because this deadline cancelled the task (and no one else did)."""
        self.waiting = False
        if not self.expired:
            return False
        self.expired = False
        return self._task.uncancel() <= self.cancelling

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


async def with_timeouts(
    deltas: AsyncGenerator[Delta, None], *, first: float, idle: float
) -> AsyncGenerator[Delta, None]:
    """``deltas``, failing with :class:`UpstreamTimeout` when the provider stalls."""
    limit, what = first, "first token"
    async with aclosing(deltas):
        deadline = _Deadline()
        try:
            while True:
                deadline.arm(limit)
                try:
                    delta = await anext(deltas)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if deadline.disarm():
                        raise UpstreamTimeout(f"no {what} from the LLM within {limit:g} s") from None
                    raise
                finally:
                    deadline.disarm()
                yield delta
                if delta.text or delta.reasoning or delta.tool_calls:
                    limit, what = idle, "chunk"
        finally:
            deadline.close()


async def attempt_events(
    deltas: AsyncIterator[Delta],
    *,
    attempt: int,
    model: str,
    progress_every: int,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncGenerator[Event, None]:
    """One attempt: ``started``, then ``reasoning``/``content``/``tool_call`` (and ``progress``), then ``complete``.

    ``progress`` and ``complete`` count the answer's ``content`` only: reasoning and tool calls have
    events of their own, and ``content_length`` is the length of the answer's text.
    """
    start = clock()
    yield Started(attempt=attempt, model=model)
    joiner, thinker = SurrogateJoiner(), SurrogateJoiner()
    arguments: dict[int, SurrogateJoiner] = {}  # per tool call: its fragments may split a surrogate pair too
    chunks = chars = thoughts = 0
    finish_reason: str | None = None
    usage: Usage | None = None
    async for delta in deltas:
        finish_reason = delta.finish_reason or finish_reason
        usage = delta.usage or usage
        if reasoning := thinker.feed(delta.reasoning):
            thoughts += 1
            yield Reasoning(content=reasoning, index=thoughts, attempt=attempt)
        for call in delta.tool_calls:
            part = arguments.setdefault(call.index, SurrogateJoiner()).feed(call.arguments)
            if part or call.id or call.name:
                yield ToolCallFragment(index=call.index, id=call.id, name=call.name, arguments=part, attempt=attempt)
        text = joiner.feed(delta.text)
        if not text:
            continue
        chunks += 1
        chars += len(text)
        yield Content(content=text, index=chunks, attempt=attempt)
        if chunks % progress_every == 0:
            yield Progress(chunks=chunks, chars=chars, elapsed_ms=_ms(clock() - start), attempt=attempt)
    if tail := thinker.flush():
        yield Reasoning(content=tail, index=thoughts + 1, attempt=attempt)
    for index, held in arguments.items():
        if tail := held.flush():
            yield ToolCallFragment(index=index, id=None, name=None, arguments=tail, attempt=attempt)
    if tail := joiner.flush():
        chunks += 1
        chars += len(tail)
        yield Content(content=tail, index=chunks, attempt=attempt)
    if finish_reason is None:
        raise IncompleteStream("the LLM's stream ended without a finish_reason")
    yield Complete(
        attempt=attempt,
        total_chunks=chunks,
        content_length=chars,
        elapsed_ms=_ms(clock() - start),
        finish_reason=finish_reason,
        usage=usage,
    )


async def chat_events(
    open_stream: OpenStream,
    classify: Classify,
    *,
    model: str,
    first_attempt: int = 1,
    max_attempts: int,
    progress_every: int,
    retry_base_delay: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncGenerator[Event, None]:
    """Attempts until one completes: each failure is announced, the last one ends in ``failed``."""
    attempt = first_attempt
    while True:
        try:
            # aclosing: a cancelled chat must close the upstream HTTP stream now, not at GC.
            async with aclosing(open_stream()) as deltas:
                events = attempt_events(deltas, attempt=attempt, model=model, progress_every=progress_every)
                async with aclosing(events):
                    async for event in events:
                        yield event
            return
        except Exception as exc:  # every provider failure becomes an event
            failure = classify(exc)
        last = attempt >= max_attempts or not failure.retryable
        yield Error(message=failure.message, retryable=failure.retryable and not last, attempt=attempt)
        if last:
            yield Failed(failure.message, attempt, failure.upstream_status, failure.code, failure.param)
            return
        delay = backoff(attempt - first_attempt + 1, retry_base_delay, failure.retry_after)
        attempt += 1
        yield Status(message=f"retrying in {delay:.1f} s: attempt {attempt} of {max_attempts}", attempt=attempt)
        await sleep(delay)


def backoff(failures: int, base: float, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter, capped at 30 s; never earlier than ``Retry-After``."""
    delay = min(random.uniform(base / 2, base * 2 ** min(failures - 1, 16)), 30.0)
    return max(delay, retry_after or 0.0)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
