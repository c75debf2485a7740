"""Runs one chat: claim its lease, stream attempts through the pipeline into the sink, store the result.

A run stops early for one of three reasons: its owner cancelled it (it ends ``cancelled``), its
lease was lost (another attempt owns the chat; it writes nothing more), or its worker is shutting
down (it hands the chat back at once, for another worker's reaper to re-queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Final

import openai
from redis.asyncio import Redis

from streambridge.shared import logs, machine, metrics, trace
from streambridge.shared.chats import ChatRequest, ChatResult, decode_request
from streambridge.shared.events import (
    Cancelled,
    Complete,
    Content,
    Error,
    Event,
    Failed,
    Reasoning,
    Started,
    Status,
    ToolCallFragment,
    assemble_reasoning,
    assemble_text,
    assemble_tool_calls,
)
from streambridge.shared.settings import Settings
from streambridge.workers.appender import Appender
from streambridge.workers.lease import Lease
from streambridge.workers.llm import classify, failure_cause, stream_deltas
from streambridge.workers.pipeline import Delta, Failure, chat_events, with_timeouts
from streambridge.workers.sink import LeaseLost, StreamGap, StreamSink

log = logging.getLogger("streambridge.worker")

#: how long appends are sent again over a dropped connection to a Redis Cluster: a primary's
#: failover (its replica took over in 2.2–4.3 s here) costs a retry, not an attempt
CLUSTER_APPEND_RETRY_FOR: Final = 15.0


class Stop(enum.Enum):
    CANCELLED = "cancelled by its owner"
    LEASE_LOST = "lease lost to another attempt"
    HANDBACK = "handed back: worker shutting down"


@dataclass
class Active:
    task: asyncio.Task[object]
    lease: Lease
    stop: Stop | None = None


class ResultTracker:
    """Folds the events into the chat's final result: the completing attempt's text, reasoning and tool calls."""

    def __init__(self) -> None:
        self.parts: list[Event] = []  # the current attempt's answer: content, reasoning and tool call events
        self.attempt = 0
        self.result: ChatResult | None = None
        #: the completing attempt's first content to its end, in s (None: it streamed no content)
        self.streamed: float | None = None

    def observe(self, event: Event) -> None:
        if isinstance(event, Started):
            self.parts, self.attempt = [], event.attempt
        elif isinstance(event, Content | Reasoning | ToolCallFragment):
            self.parts.append(event)
        elif isinstance(event, Complete):
            self.result = ChatResult(
                status="complete",
                content=assemble_text(self.parts),
                finish_reason=event.finish_reason,
                usage=event.usage,
                attempts=event.attempt,
                reasoning=assemble_reasoning(self.parts) or None,
                tool_calls=assemble_tool_calls(self.parts) or None,
            )
        elif isinstance(event, Failed):
            self.result = ChatResult(
                status="failed",
                attempts=event.attempts,
                error=event.message,
                upstream_status=event.upstream_status,
                error_code=event.code,
                error_param=event.param,
            )
        elif isinstance(event, Error):  # the attempt failed: a cancel in the backoff keeps nothing of it
            self.parts = []

    def cancelled(self) -> ChatResult:
        """A cancelled chat's result keeps what its attempt had said."""
        return ChatResult(
            status="cancelled",
            content=assemble_text(self.parts),
            attempts=self.attempt,
            reasoning=assemble_reasoning(self.parts) or None,
            tool_calls=assemble_tool_calls(self.parts) or None,
        )


class ChatRunner:
    """Runs chats for one worker: ``control`` is the control Redis, ``streams`` the chats' own (the
    same client when one Redis holds both)."""

    def __init__(
        self, redis: Redis, llm: openai.AsyncOpenAI, settings: Settings, streams: machine.Store | None = None
    ) -> None:
        self.redis = redis
        self.streams: machine.Store = streams if streams is not None else redis
        self.publish = machine.publish_command(self.streams)
        self.llm = llm
        self.settings = settings
        #: this worker's id among the workers' heartbeats (``shared.keys.workers``)
        self.worker_id = uuid.uuid4().hex
        self.active: dict[str, Active] = {}
        #: chats being started here (listed as this worker's, not yet running or let go)
        self.starting: set[str] = set()
        # every chat's appends, in one pipeline per round trip; a dropped connection costs a re-send.
        # On a cluster, for as long as a primary's failover takes (the leases hold meanwhile: they
        # have no TTL); on one Redis, briefly: an outage fails the attempt, which is handed back.
        retry_for = CLUSTER_APPEND_RETRY_FOR if self.publish == machine.SPUBLISH else settings.lease_ttl / 2
        self.appender = Appender(self.streams, retry_for=retry_for)
        metrics.RUNNING_CHATS.set_function(lambda: len(self.active))

    def stop(self, chat_id: str, reason: Stop) -> bool:
        """Stop the chat if it runs here; the first reason given wins."""
        active = self.active.get(chat_id)
        if active is None or active.stop is not None:
            return False
        active.stop = reason
        active.task.cancel()
        return True

    def lease(self, chat_id: str) -> Lease:
        """A new attempt's lease on the chat, not yet claimed."""
        return Lease(self.redis, self.streams, self.worker_id, chat_id, secrets.token_hex(16), self.requeue)

    async def requeue(self, call: machine.Call) -> Any:
        """A REQUEUE, through the appends' round trips, durable: on a cluster, answered once a replica
        has it (a REQUEUE lost in a failover would leave the chat held by a dead attempt)."""
        return await self.appender.call(call.script, call.keys, call.args, durable=True)

    async def stop_flagged(self) -> None:
        """Stops every chat here whose owner asked to cancel it (read from each chat's flag)."""
        for chat_id, active in list(self.active.items()):
            if await active.lease.cancel_flagged():
                self.stop(chat_id, Stop.CANCELLED)

    async def run(self, chat_id: str) -> str:
        """Starts the chat and runs it; the outcome (a final status, or why it did not run)."""
        lease = self.lease(chat_id)
        return await self.run_claimed(lease, await lease.claim())

    async def run_claimed(self, lease: Lease, claimed: str) -> str:
        """Runs the chat whose claim answered ``claimed``: anything but ``claimed`` is why it does not run."""
        chat_id = lease.chat_id
        if claimed != "claimed":
            log.info("chat %s: not run (%s)", chat_id, claimed, extra={"event": "chat.not_run", "chat_id": chat_id})
            return claimed
        span = trace.decode(lease.chat.get(b"trace")) or trace.new_trace()
        owner = lease.chat.get(b"owner", b"").decode() or None
        logs.bind(chat_id=chat_id, user=owner, trace_id=span.trace_id, attempt=None)
        began = time.monotonic()
        task = asyncio.current_task()
        assert task is not None
        active = self.active[chat_id] = Active(task, lease)
        self.starting.discard(chat_id)
        sink = StreamSink(
            self.streams,
            chat_id,
            lease.token,
            maxlen=self.settings.stream_maxlen,
            appender=self.appender,
            publish=self.publish,
            coalesce=self.settings.append_coalesce_ms / 1000,
        )
        tracker = ResultTracker()
        finishing: asyncio.Future[None] | None = None
        terminal: Event | None = None
        try:
            accepted = self._accepted(lease)
            chat = lease.chat
            if b"cancel" in chat:
                self.stop(chat_id, Stop.CANCELLED)
                await asyncio.sleep(0)  # take the cancellation here
            request, attempts = decode_request(chat[b"request"]), int(chat[b"attempts"])
            try:
                async with asyncio.timeout_at(self._deadline(lease)):
                    terminal = await self._stream(chat_id, request, attempts, sink, tracker, accepted, span)
            except TimeoutError:
                terminal = await self._past_deadline(sink, tracker)
            finishing = asyncio.ensure_future(self._finish(lease, sink, tracker, terminal))
            await asyncio.shield(finishing)
        except asyncio.CancelledError:
            if finishing is not None:  # the chat's end was being written: let it land, it stands
                task.uncancel()
                await finishing
            elif active.stop in (None, Stop.HANDBACK):
                await asyncio.shield(self._hand_back(lease, sink))
                raise
            else:
                task.uncancel()
                if active.stop is Stop.LEASE_LOST:
                    return await self._lost(lease)
                try:
                    await asyncio.shield(self._finish(lease, sink, tracker, Cancelled()))
                except LeaseLost:  # raised in this handler, so the sibling clause below cannot catch it
                    return await self._lost(lease)
        except LeaseLost:
            return await self._lost(lease)
        except StreamGap as exc:
            log.warning(
                "chat %s: %s; handing it back for a new attempt", chat_id, exc, extra={"event": "chat.stream_gap"}
            )
            await self._hand_back(lease, sink)
            return "handed_back"
        finally:
            del self.active[chat_id]
            await sink.close()
        assert tracker.result is not None
        log_end(chat_id, tracker.result, time.monotonic() - began)
        _measure_end(tracker.result.status, terminal, asyncio.get_running_loop().time() - accepted, tracker.streamed)
        return tracker.result.status

    async def _stream(
        self,
        chat_id: str,
        request: ChatRequest,
        attempts: int,
        sink: StreamSink,
        tracker: ResultTracker,
        accepted: float,
        span: trace.Trace,
    ) -> Event:
        """Appends the attempts' events and returns the terminal one, which ``_finish`` writes.
        ``accepted``: when the chat was accepted, in loop time (for its time to first token)."""
        s = self.settings
        model = request.model or s.llm_model
        cause = "other"  # the last failure's, for the retry it leads to

        def classify_counting(exc: BaseException) -> Failure:
            nonlocal cause
            cause = failure_cause(exc)
            metrics.ATTEMPT_FAILURES.labels(cause).inc()
            return classify(exc)

        def open_stream() -> AsyncGenerator[Delta, None]:
            # each call upstream is a span of the chat's trace: a child of the span that admitted it.
            # streambridge exports no spans: the line says which span is whose parent, so the LLM
            # gateway's span (a child of span_id) joins the caller's through chat.admitted's.
            call = span.child()
            headers = call.headers()
            extra = {
                "event": "upstream.request",
                "traceparent": headers["traceparent"],
                "span_id": call.span_id,
                "parent_span_id": span.span_id,
            }
            log.info("calling the LLM (%s), traceparent %s", model, headers["traceparent"], extra=extra)
            deltas = stream_deltas(self.llm, request, model, headers)
            return with_timeouts(deltas, first=s.first_token_timeout, idle=s.idle_timeout)

        if attempts:  # a worker died (or handed it back) while this chat ran
            metrics.RESUMED.inc()
            message = f"attempt {attempts} was interrupted (worker lost); resuming with attempt {attempts + 1}"
            await sink.append(Status(message=message, attempt=attempts + 1))
        events = chat_events(
            open_stream,
            classify_counting,
            model=model,
            first_attempt=attempts + 1,
            max_attempts=max(s.max_attempts, attempts + 1),
            progress_every=s.progress_every,
            retry_base_delay=s.retry_base_delay,
        )
        first = not attempts  # time to first token: on a chat's first run only
        content_at: float | None = None  # the attempt's first content, for its token rate
        loop = asyncio.get_running_loop()
        async with aclosing(events):
            async for event in events:
                if isinstance(event, Complete | Failed):
                    tracker.streamed = None if content_at is None else loop.time() - content_at
                    return event
                if isinstance(event, _ATTEMPT_EVENTS):
                    log_attempt(event)
                if type(event) is Content:
                    if content_at is None:
                        content_at = loop.time()
                        if first:
                            first = False
                            metrics.TTFT.observe(content_at - accepted)
                elif type(event) is Started:
                    content_at = None
                elif type(event) is Error and event.retryable:
                    metrics.RETRIES.labels(cause).inc()
                tracker.observe(event)
                await sink.append(event)  # a ``started`` event also records its attempt on the chat
        raise AssertionError("chat_events always ends with complete or failed")

    def _accepted(self, lease: Lease) -> float:
        """When the chat was accepted, in loop time (by Redis's clock, as :meth:`_deadline`); observes
        its pickup on its first start."""
        waited = (lease.started_ms - int(lease.chat.get(b"created_ms", lease.started_ms))) / 1000
        if lease.chat.get(b"attempts", b"0") == b"0":
            metrics.PICKUP.observe(max(0.0, waited))
        return asyncio.get_running_loop().time() - waited

    def _deadline(self, lease: Lease) -> float:
        """The loop time by which the chat must end, counted from its creation (recoveries included),
        both by Redis's clock: a worker whose clock disagrees with the API's gives it no more or less."""
        age = (lease.started_ms - int(lease.chat.get(b"created_ms", lease.started_ms))) / 1000
        return asyncio.get_running_loop().time() + self.settings.chat_deadline - age

    async def _past_deadline(self, sink: StreamSink, tracker: ResultTracker) -> Failed:
        message = f"the chat did not finish within its deadline of {self.settings.chat_deadline:g} s"
        if tracker.attempt:
            await sink.append(Error(message=message, retryable=False, attempt=tracker.attempt))
        return Failed(message=message, attempts=tracker.attempt)

    async def _hand_back(self, lease: Lease, sink: StreamSink) -> None:
        with contextlib.suppress(Exception):
            await sink.drain()
        with contextlib.suppress(Exception):
            await lease.release()
        metrics.HANDED_BACK.inc()
        log.info("chat %s: handed back", lease.chat_id, extra={"event": "chat.handed_back"})

    async def _lost(self, lease: Lease) -> str:
        """Another attempt holds the chat (a reaper took this worker for dead), or Redis lost the
        lease: the chat leaves this worker's list, queued again in the second case."""
        log.warning("chat %s: lease lost", lease.chat_id, extra={"event": "chat.lease_lost"})
        try:
            await lease.release()
        except Exception as exc:  # it stays listed: a reaper finishes this when the worker stops
            log.warning("chat %s: cannot let go of it (%s)", lease.chat_id, exc)
        return "lease_lost"

    async def _finish(self, lease: Lease, sink: StreamSink, tracker: ResultTracker, terminal: Event) -> None:
        tracker.observe(terminal)
        if tracker.result is None:  # cancelled
            tracker.result = tracker.cancelled()
        s = self.settings
        await sink.finish(terminal, tracker.result, result_ttl=s.result_ttl, stream_ttl=s.stream_ttl)
        try:
            await lease.finished()
        except Exception as exc:  # it ended; it stays listed, and its owner's slot lapses at its deadline
            metrics.REDIS_ERRORS_WORKER.inc()
            log.warning("chat %s: ended, but not taken off its worker's list (%s)", lease.chat_id, exc)


#: the events that start or fail an attempt: each is logged (a tuple: ``isinstance`` with a union per event costs more)
_ATTEMPT_EVENTS: Final = (Started, Error)


def log_attempt(event: Started | Error) -> None:
    if isinstance(event, Started):
        logs.bind(attempt=event.attempt)
        log.info(
            "attempt %d started (%s)",
            event.attempt,
            event.model,
            extra={"event": "attempt.started", "model": event.model},
        )
        return
    reason = error_head(event.message)
    log.info(
        "attempt %d failed: %s%s",
        event.attempt,
        reason,
        "; trying again" if event.retryable else "",
        extra={"event": "attempt.failed", "retryable": event.retryable, "error": reason, **_detail(event.message)},
    )


#: the event of a chat's last line, by its final status
END_EVENTS: Final = {"complete": "chat.completed", "failed": "chat.failed", "cancelled": "chat.cancelled"}


def log_end(chat_id: str, result: ChatResult, elapsed: float) -> None:
    """The chat's last line: how it ended, in how many attempts and how long this run took."""
    fields: dict[str, object] = {"event": END_EVENTS[result.status], "status": result.status}
    fields.update(attempts=result.attempts, elapsed_ms=round(elapsed * 1000))
    if result.status == "complete":
        fields["finish_reason"] = result.finish_reason
        fields["content_length"] = len(result.content)
        if result.usage is not None:
            fields["completion_tokens"] = result.usage.completion_tokens
        if logs.content_logged():
            fields["answer"] = result.content
    elif result.status == "failed":
        fields.update(error=error_head(result.error or ""), upstream_status=result.upstream_status)
        fields.update(error_code=result.error_code, **_detail(result.error or ""))
    log.info("chat %s: %s after %d attempt(s)", chat_id, result.status, result.attempts, extra=fields)


def error_head(message: str) -> str:
    """What went wrong, without what the upstream said about it (``LLM answered 400``): an
    upstream's error message may quote the request, so its words are logged only with the content."""
    return message.partition(": ")[0][:200]


def _detail(message: str) -> dict[str, str]:
    return {"error_detail": message} if logs.content_logged() else {}


def _measure_end(status: str, terminal: Event | None, duration: float, streamed: float | None = None) -> None:
    """A chat's end: its final status and duration, and a completed chat's tokens and their rate:
    the tokens after the first over ``streamed``, its completing attempt's first content to its end
    (the time to first token left out; a completion without content, tool calls only, not observed)."""
    metrics.CHATS_FINISHED.labels(status).inc()
    metrics.CHAT_DURATION.labels(status).observe(duration)
    if isinstance(terminal, Complete):
        usage = terminal.usage
        tokens = usage.completion_tokens if usage is not None and usage.completion_tokens else terminal.total_chunks
        metrics.COMPLETION_TOKENS.inc(tokens)
        if tokens > 1 and streamed is not None and streamed > 0:
            metrics.TOKEN_RATE.observe((tokens - 1) / streamed)
