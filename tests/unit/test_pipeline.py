"""The generator pipeline, fed scripted deltas: exact events, awkward text, retries, timeouts, closing."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import msgspec
import pytest

from streambridge.shared.events import (
    Complete,
    Content,
    Error,
    Event,
    Failed,
    FunctionCall,
    Progress,
    Reasoning,
    Started,
    Status,
    ToolCall,
    ToolCallFragment,
    Usage,
    assemble_reasoning,
    assemble_text,
    assemble_tool_calls,
)
from streambridge.workers.pipeline import (
    Delta,
    Failure,
    IncompleteStream,
    OpenStream,
    SurrogateJoiner,
    ToolCallDelta,
    UpstreamTimeout,
    attempt_events,
    backoff,
    chat_events,
    with_timeouts,
)

STOP = Delta(finish_reason="stop")
USAGE = Usage(prompt_tokens=5, completion_tokens=4, total_tokens=9)


async def deltas(*items: Delta | BaseException) -> AsyncGenerator[Delta, None]:
    """A provider stream that yields the given deltas, raising any exception in its place."""
    for item in items:
        if isinstance(item, BaseException):
            raise item
        yield item


def texts(*pieces: str) -> list[Delta]:
    return [Delta(text=piece) for piece in pieces]


def fake_clock(step: float = 0.25) -> Callable[[], float]:
    """A clock that moves ``step`` seconds each time it is read: 0.0, 0.25, 0.5 …"""
    return itertools.count(0.0, step).__next__


async def collect(events: AsyncIterator[Event], into: list[Event] | None = None) -> list[Event]:
    into = [] if into is None else into
    async for event in events:
        into.append(event)
    return into


async def one_attempt(*items: Delta | BaseException, progress_every: int = 100) -> list[Event]:
    return await collect(
        attempt_events(deltas(*items), attempt=1, model="m", progress_every=progress_every, clock=fake_clock())
    )


def contents(events: list[Event]) -> list[Content]:
    return [event for event in events if isinstance(event, Content)]


def untimed(events: list[Event]) -> list[Event]:
    """The events with ``elapsed_ms`` zeroed, for comparing runs that read the real clock."""
    return [msgspec.structs.replace(e, elapsed_ms=0) if isinstance(e, Complete | Progress) else e for e in events]


# --- attempt_events: the exact sequence ---------------------------------------------------------


async def test_one_attempt_yields_started_contents_progress_and_complete() -> None:
    events = await one_attempt(
        Delta(),  # the role-only first chunk
        *texts("Hel", "lo", ", wor", "ld"),
        STOP,
        Delta(usage=USAGE),
        progress_every=2,
    )
    assert events == [
        Started(attempt=1, model="m"),
        Content(content="Hel", index=1, attempt=1),
        Content(content="lo", index=2, attempt=1),
        Progress(chunks=2, chars=5, elapsed_ms=250, attempt=1),
        Content(content=", wor", index=3, attempt=1),
        Content(content="ld", index=4, attempt=1),
        Progress(chunks=4, chars=12, elapsed_ms=500, attempt=1),
        Complete(attempt=1, total_chunks=4, content_length=12, elapsed_ms=750, finish_reason="stop", usage=USAGE),
    ]


async def test_empty_deltas_yield_no_content_and_do_not_count_as_chunks() -> None:
    events = await one_attempt(Delta(), *texts("a", "", "b"), Delta(), STOP)
    assert [e.index for e in contents(events)] == [1, 2]
    assert events[-1] == Complete(attempt=1, total_chunks=2, content_length=2, elapsed_ms=250, finish_reason="stop")


async def test_usage_after_the_finish_reason_chunk_is_still_reported() -> None:
    complete = (await one_attempt(*texts("Hi"), STOP, Delta(usage=USAGE)))[-1]
    assert isinstance(complete, Complete)
    assert complete.finish_reason == "stop"
    assert complete.usage == USAGE


async def test_finish_reason_and_text_in_the_same_chunk() -> None:
    events = await one_attempt(Delta(text="Hi"), Delta(text="!", finish_reason="length"))
    assert assemble_text(events) == "Hi!"
    assert events[-1] == Complete(attempt=1, total_chunks=2, content_length=3, elapsed_ms=250, finish_reason="length")


async def test_content_length_counts_code_points_not_bytes() -> None:
    complete = (await one_attempt(*texts("héllo ", "👩‍💻"), STOP))[-1]
    assert isinstance(complete, Complete)
    assert complete.content_length == len("héllo 👩‍💻") == 9


async def test_stream_without_finish_reason_raises_incomplete_stream_after_its_content() -> None:
    events: list[Event] = []
    stream = attempt_events(deltas(*texts("Hel", "lo")), attempt=1, model="m", progress_every=100)
    with pytest.raises(IncompleteStream):
        await collect(stream, into=events)
    assert events == [
        Started(attempt=1, model="m"),
        Content(content="Hel", index=1, attempt=1),
        Content(content="lo", index=2, attempt=1),
    ]


async def test_attempt_number_is_carried_by_every_event() -> None:
    stream = attempt_events(deltas(*texts("a", "b"), STOP), attempt=4, model="m", progress_every=1)
    assert {getattr(event, "attempt", None) for event in await collect(stream)} == {4}


async def test_reasoning_comes_as_its_own_events_apart_from_the_text() -> None:
    events = await one_attempt(
        Delta(reasoning="The user "),
        Delta(reasoning="greets me."),
        *texts("Hel", "lo"),
        STOP,
        progress_every=2,
    )
    assert events == [
        Started(attempt=1, model="m"),
        Reasoning(content="The user ", index=1, attempt=1),
        Reasoning(content="greets me.", index=2, attempt=1),
        Content(content="Hel", index=1, attempt=1),
        Content(content="lo", index=2, attempt=1),
        Progress(chunks=2, chars=5, elapsed_ms=250, attempt=1),  # progress counts the answer's chunks only
        Complete(attempt=1, total_chunks=2, content_length=5, elapsed_ms=500, finish_reason="stop"),
    ]
    assert assemble_text(events) == "Hello"
    assert assemble_reasoning(events) == "The user greets me."


def call(index: int, arguments: str = "", id: str | None = None, name: str | None = None) -> Delta:
    return Delta(tool_calls=(ToolCallDelta(index, id, name, arguments),))


async def test_tool_call_fragments_become_events_and_finish_reason_tool_calls_completes() -> None:
    events = await one_attempt(
        Delta(),
        call(0, id="call_a", name="get_weather"),
        call(0, '{"city"'),
        call(0, ':"Paris"}'),
        call(1, '{"q":"x"}', id="call_b", name="search"),
        Delta(finish_reason="tool_calls"),
        Delta(usage=USAGE),
    )
    assert events == [
        Started(attempt=1, model="m"),
        ToolCallFragment(index=0, id="call_a", name="get_weather", arguments="", attempt=1),
        ToolCallFragment(index=0, id=None, name=None, arguments='{"city"', attempt=1),
        ToolCallFragment(index=0, id=None, name=None, arguments=':"Paris"}', attempt=1),
        ToolCallFragment(index=1, id="call_b", name="search", arguments='{"q":"x"}', attempt=1),
        Complete(attempt=1, total_chunks=0, content_length=0, elapsed_ms=250, finish_reason="tool_calls", usage=USAGE),
    ]
    assert assemble_tool_calls(events) == [
        ToolCall(id="call_a", function=FunctionCall(name="get_weather", arguments='{"city":"Paris"}')),
        ToolCall(id="call_b", function=FunctionCall(name="search", arguments='{"q":"x"}')),
    ]


async def test_tool_call_arguments_that_split_a_surrogate_pair_are_rejoined() -> None:
    events = await one_attempt(call(0, '{"e":"\ud83d', "call_a", "f"), call(0, '\ude00"}'), call(1, "\ud83d"), STOP)
    fragments = [e for e in events if isinstance(e, ToolCallFragment)]
    for fragment in fragments:
        fragment.arguments.encode("utf-8")  # no lone surrogate: the sink could not encode it
    assert [(f.index, f.arguments) for f in fragments] == [(0, '{"e":"'), (0, '😀"}'), (1, "\ufffd")]


# --- attempt_events: awkward text ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        pytest.param(["Stre", "amb", "ridge"], "Streambridge", id="mid-word"),
        pytest.param(["I am 👩", "\u200d", "💻 now"], "I am 👩‍💻 now", id="mid-zwj-sequence"),
        pytest.param(["caf", "e", "\u0301!"], "cafe\u0301!", id="letter-and-combining-mark"),
        pytest.param(["smile \ud83d", "\ude00 ok"], "smile 😀 ok", id="surrogate-pair-split"),
        pytest.param(["\ud83d", "", "\ude00"], "😀", id="surrogate-pair-around-an-empty-delta"),
        pytest.param(["a\ud83d\ude00b"], "a😀b", id="surrogate-pair-in-one-delta"),
        pytest.param(["x \ud83d", "\ude00\ud83d", "\ude01"], "x 😀😁", id="two-pairs-split-in-a-row"),
        pytest.param(["ok \ud83d"], "ok \ufffd", id="lone-high-surrogate-at-the-end"),
        pytest.param(["a\ude00b"], "a\ufffdb", id="lone-low-surrogate"),
        pytest.param(["a\ud83d", "b"], "a\ufffdb", id="high-surrogate-without-its-pair"),
    ],
)
async def test_awkward_splits_assemble_to_valid_text(pieces: list[str], expected: str) -> None:
    events = await one_attempt(*texts(*pieces), STOP)
    for content in contents(events):
        content.content.encode("utf-8")  # no lone surrogate: raises UnicodeEncodeError otherwise
        assert content.content
    assembled = assemble_text(events)
    assert assembled == expected
    complete = events[-1]
    assert isinstance(complete, Complete)
    assert complete.content_length == len(assembled)
    assert complete.total_chunks == len(contents(events))
    assert [c.index for c in contents(events)] == list(range(1, complete.total_chunks + 1))


def test_surrogate_joiner_holds_a_high_surrogate_until_its_pair_arrives() -> None:
    joiner = SurrogateJoiner()
    assert joiner.feed("a\ud83d") == "a"
    assert joiner.feed("\ude00b") == "😀b"
    assert joiner.flush() == ""


def test_surrogate_joiner_flushes_a_held_half_as_replacement_character() -> None:
    joiner = SurrogateJoiner()
    assert joiner.feed("\ud83d") == ""
    assert joiner.flush() == "\ufffd"
    assert joiner.flush() == ""


# --- chat_events --------------------------------------------------------------------------------


class Flaky(Exception):
    def __init__(self, message: str = "connection reset", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Fatal(Exception):
    pass


def fake_classify(exc: BaseException) -> Failure:
    if isinstance(exc, Flaky):
        return Failure(str(exc), retryable=True, retry_after=exc.retry_after)
    return Failure(str(exc), retryable=False)


class Upstream:
    """An ``open_stream``: each call plays the next script; counts how many streams were opened and closed."""

    def __init__(self, *scripts: list[Delta | BaseException]) -> None:
        self.scripts = scripts
        self.opened = self.closed = 0

    def __call__(self) -> AsyncGenerator[Delta, None]:
        self.opened += 1
        return self._play(self.scripts[self.opened - 1])

    async def _play(self, script: list[Delta | BaseException]) -> AsyncGenerator[Delta, None]:
        try:
            async for delta in deltas(*script):
                yield delta
        finally:
            self.closed += 1


class Sleeps(list[float]):
    async def __call__(self, delay: float) -> None:
        self.append(delay)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def run_chat(open_stream: OpenStream, sleep: Sleeps, *, first_attempt: int = 1) -> AsyncGenerator[Event, None]:
    return chat_events(
        open_stream,
        fake_classify,
        model="m",
        first_attempt=first_attempt,
        max_attempts=3,
        progress_every=100,
        retry_base_delay=0.01,
        sleep=sleep,
    )


async def test_retryable_failure_is_announced_and_the_next_attempt_completes(sleeps: Sleeps) -> None:
    upstream = Upstream([*texts("Hel", "lo"), Flaky("connection reset")], [*texts("Hello", " world"), STOP])
    events = untimed(await collect(run_chat(upstream, sleeps)))

    assert events[:4] == [
        Started(attempt=1, model="m"),
        Content(content="Hel", index=1, attempt=1),
        Content(content="lo", index=2, attempt=1),
        Error(message="connection reset", retryable=True, attempt=1),
    ]
    status = events[4]
    assert isinstance(status, Status)
    assert status.attempt == 2
    assert "attempt 2 of 3" in status.message
    assert events[5:] == [
        Started(attempt=2, model="m"),
        Content(content="Hello", index=1, attempt=2),
        Content(content=" world", index=2, attempt=2),
        Complete(attempt=2, total_chunks=2, content_length=11, elapsed_ms=0, finish_reason="stop"),
    ]
    assert assemble_text(events) == "Hello world"
    assert len(sleeps) == 1
    assert upstream.opened == upstream.closed == 2


async def test_non_retryable_failure_fails_at_once(sleeps: Sleeps) -> None:
    upstream = Upstream([Fatal("bad model")])
    events = await collect(run_chat(upstream, sleeps))
    assert events == [
        Started(attempt=1, model="m"),
        Error(message="bad model", retryable=False, attempt=1),
        Failed(message="bad model", attempts=1),
    ]
    assert upstream.opened == 1
    assert sleeps == []


async def test_every_attempt_failing_ends_in_failed_and_the_last_error_is_not_retryable(sleeps: Sleeps) -> None:
    upstream = Upstream([Flaky("reset 1")], [*texts("partial"), Flaky("reset 2")], [Flaky("reset 3")])
    events = await collect(run_chat(upstream, sleeps))

    errors = [event for event in events if isinstance(event, Error)]
    assert errors == [
        Error(message="reset 1", retryable=True, attempt=1),
        Error(message="reset 2", retryable=True, attempt=2),
        Error(message="reset 3", retryable=False, attempt=3),
    ]
    assert events[-2:] == [errors[-1], Failed(message="reset 3", attempts=3)]
    statuses = [event for event in events if isinstance(event, Status)]
    assert [s.attempt for s in statuses] == [2, 3]
    assert "attempt 2 of 3" in statuses[0].message
    assert "attempt 3 of 3" in statuses[1].message
    assert len(sleeps) == 2  # no sleep after the last failure
    assert upstream.opened == upstream.closed == 3


async def test_first_attempt_numbers_attempts_from_there(sleeps: Sleeps) -> None:
    upstream = Upstream([Flaky()], [*texts("ok"), STOP])
    events = untimed(await collect(run_chat(upstream, sleeps, first_attempt=2)))

    assert events[:2] == [Started(attempt=2, model="m"), Error(message="connection reset", retryable=True, attempt=2)]
    assert isinstance(events[2], Status)
    assert "attempt 3 of 3" in events[2].message
    assert events[3:] == [
        Started(attempt=3, model="m"),
        Content(content="ok", index=1, attempt=3),
        Complete(attempt=3, total_chunks=1, content_length=2, elapsed_ms=0, finish_reason="stop"),
    ]
    assert 0.005 <= sleeps[0] <= 0.01  # the first failure of this run backs off like a first failure


async def test_retry_after_from_classify_is_honoured(sleeps: Sleeps) -> None:
    upstream = Upstream([Flaky("rate limited", retry_after=7.0)], [STOP])
    events = await collect(run_chat(upstream, sleeps))
    assert sleeps[0] >= 7.0
    status = next(event for event in events if isinstance(event, Status))
    assert "7.0 s" in status.message


async def test_consumer_closing_early_closes_the_upstream_stream_at_once(sleeps: Sleeps) -> None:
    upstream = Upstream([*texts("Hel", "lo", " there"), STOP])
    chat = run_chat(upstream, sleeps)
    async for event in chat:
        if isinstance(event, Content):
            break
    assert upstream.closed == 0
    await chat.aclose()
    assert upstream.closed == 1


async def test_cancelling_a_consumer_waiting_on_upstream_closes_it(sleeps: Sleeps) -> None:
    stalled = asyncio.Event()
    closed = asyncio.Event()

    async def stalls() -> AsyncGenerator[Delta, None]:
        try:
            yield Delta(text="Hi")
            stalled.set()
            await asyncio.Event().wait()  # the provider never sends another chunk
            yield STOP
        finally:
            closed.set()

    async def consume() -> None:
        await collect(run_chat(stalls, sleeps))

    task = asyncio.create_task(consume())
    await stalled.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed.is_set()


# --- with_timeouts ------------------------------------------------------------------------------


async def collect_deltas(stream: AsyncIterator[Delta], into: list[Delta] | None = None) -> list[Delta]:
    into = [] if into is None else into
    async for delta in stream:
        into.append(delta)
    return into


class Stalling:
    """A provider that sends ``first`` deltas, then stalls; records whether it was closed."""

    def __init__(self, *first: Delta) -> None:
        self.first = first
        self.closed = False

    async def stream(self) -> AsyncGenerator[Delta, None]:
        try:
            for delta in self.first:
                yield delta
            await asyncio.sleep(10)
            yield STOP
        finally:
            self.closed = True


async def test_no_first_token_in_time_raises_upstream_timeout_and_closes_the_stream() -> None:
    provider = Stalling()
    with pytest.raises(UpstreamTimeout, match="first token"):
        await collect_deltas(with_timeouts(provider.stream(), first=0.05, idle=10))
    assert provider.closed


async def test_stall_between_chunks_raises_upstream_timeout_and_closes_the_stream() -> None:
    provider = Stalling(Delta(text="Hi"))
    received: list[Delta] = []
    with pytest.raises(UpstreamTimeout, match="chunk"):
        await collect_deltas(with_timeouts(provider.stream(), first=10, idle=0.05), into=received)
    assert received == [Delta(text="Hi")]
    assert provider.closed


async def test_role_only_chunk_does_not_count_as_the_first_token() -> None:
    provider = Stalling(Delta())
    with pytest.raises(UpstreamTimeout, match="first token"):
        await collect_deltas(with_timeouts(provider.stream(), first=0.05, idle=10))


@pytest.mark.parametrize(
    "first", [Delta(reasoning="Hm"), call(0, id="call_a", name="f")], ids=["reasoning", "tool-call"]
)
async def test_reasoning_or_a_tool_call_is_the_first_token_too(first: Delta) -> None:
    provider = Stalling(first)
    async with asyncio.timeout(2):  # the first-token limit (60 s) must not be what ends it
        with pytest.raises(UpstreamTimeout, match="chunk"):
            await collect_deltas(with_timeouts(provider.stream(), first=60, idle=0.05))


async def test_stream_in_time_passes_through_unchanged() -> None:
    items = [Delta(), *texts("a", "b"), STOP, Delta(usage=USAGE)]
    assert await collect_deltas(with_timeouts(deltas(*items), first=10, idle=10)) == items


async def test_a_stall_after_the_first_token_is_caught_by_the_idle_limit_not_the_longer_first_one() -> None:
    provider = Stalling(Delta(text="Hi"))
    async with asyncio.timeout(2):  # the first-token limit (60 s) must not be what ends it
        with pytest.raises(UpstreamTimeout, match="chunk"):
            await collect_deltas(with_timeouts(provider.stream(), first=60, idle=0.05))


async def steady(count: int, every: float) -> AsyncGenerator[Delta, None]:
    for n in range(count):
        await asyncio.sleep(every)
        yield Delta(text=str(n))
    yield STOP


async def test_a_steady_stream_that_lasts_many_idle_limits_does_not_time_out() -> None:
    # 0.4 s in all, four idle limits; each gap a tenth of one (room for a loaded host's late timers)
    received = await collect_deltas(with_timeouts(steady(40, 0.01), first=0.1, idle=0.1))
    assert [d.text for d in received] == [*map(str, range(40)), ""]


async def test_time_the_consumer_holds_the_stream_between_chunks_does_not_count() -> None:
    received = []
    async for delta in with_timeouts(deltas(*texts("a", "b", "c"), STOP), first=0.03, idle=0.03):
        received.append(delta)
        await asyncio.sleep(0.08)  # the consumer is slow (a full sink), not the provider
    assert received == [*texts("a", "b", "c"), STOP]


async def test_a_stall_timeout_leaves_no_cancel_request_on_the_task() -> None:
    with pytest.raises(UpstreamTimeout):
        await collect_deltas(with_timeouts(Stalling().stream(), first=0.02, idle=10))
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0
    await asyncio.sleep(0.01)  # and no stray cancellation arrives later


async def test_a_cancel_from_outside_during_a_stall_stays_a_cancel() -> None:
    provider = Stalling(Delta(text="Hi"))
    task = asyncio.create_task(collect_deltas(with_timeouts(provider.stream(), first=10, idle=0.2)))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert provider.closed


async def test_a_cancel_from_outside_as_the_stall_limit_passes_stays_a_cancel() -> None:
    provider = Stalling()
    task = asyncio.create_task(collect_deltas(with_timeouts(provider.stream(), first=0.05, idle=10)))
    await asyncio.sleep(0.05)  # the stall limit fires about now, in either order with the cancel
    task.cancel()
    with pytest.raises((asyncio.CancelledError, UpstreamTimeout)) as caught:
        await task
    # asyncio.timeout's rule: a cancel request of someone else's is never swallowed
    assert isinstance(caught.value, asyncio.CancelledError) or task.cancelling() == 0
    assert provider.closed


# --- backoff ------------------------------------------------------------------------------------


@pytest.mark.parametrize("failures", [1, 2, 3, 5])
def test_backoff_stays_within_its_exponential_window(failures: int) -> None:
    base = 0.5
    delays = [backoff(failures, base) for _ in range(200)]
    assert all(base / 2 <= delay <= base * 2 ** (failures - 1) for delay in delays)


def test_backoff_is_capped_at_30_seconds() -> None:
    assert all(backoff(12, 1.0) <= 30.0 for _ in range(200))


@pytest.mark.parametrize(("failures", "retry_after"), [(1, 7.0), (3, 7.0), (12, 45.0)])
def test_backoff_never_comes_before_retry_after(failures: int, retry_after: float) -> None:
    assert all(backoff(failures, 0.5, retry_after) >= retry_after for _ in range(200))


def test_small_retry_after_does_not_shorten_the_backoff() -> None:
    assert all(backoff(1, 0.5, 0.001) >= 0.25 for _ in range(200))
