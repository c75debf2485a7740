"""The result a worker stores at the end: the completing attempt's text, reasoning and tool calls."""

from streambridge.shared.chats import ChatResult
from streambridge.shared.events import (
    Complete,
    Content,
    Error,
    Event,
    FunctionCall,
    Reasoning,
    Started,
    ToolCall,
    ToolCallFragment,
)
from streambridge.workers.runner import ResultTracker


def observed(*events: Event) -> ChatResult | None:
    tracker = ResultTracker()
    for event in events:
        tracker.observe(event)
    return tracker.result


def test_the_stored_result_has_the_completing_attempts_reasoning_and_tool_calls() -> None:
    result = observed(
        Started(attempt=1, model="m"),
        Reasoning(content="lost", index=1, attempt=1),
        ToolCallFragment(index=0, id="call_old", name="f", arguments="{", attempt=1),
        Error(message="reset", retryable=True, attempt=1),
        Started(attempt=2, model="m"),
        Reasoning(content="Weather: ", index=1, attempt=2),
        Reasoning(content="ask the tool.", index=2, attempt=2),
        ToolCallFragment(index=0, id="call_a", name="get_weather", arguments="", attempt=2),
        ToolCallFragment(index=0, id=None, name=None, arguments='{"city":"Paris"}', attempt=2),
        Complete(attempt=2, total_chunks=0, content_length=0, elapsed_ms=1, finish_reason="tool_calls"),
    )
    call = ToolCall(id="call_a", function=FunctionCall(name="get_weather", arguments='{"city":"Paris"}'))
    assert result == ChatResult(
        status="complete",
        finish_reason="tool_calls",
        attempts=2,
        reasoning="Weather: ask the tool.",
        tool_calls=[call],
    )


def test_a_plain_answer_stores_no_reasoning_or_tool_calls() -> None:
    result = observed(
        Started(attempt=1, model="m"),
        Content(content="Hi", index=1, attempt=1),
        Complete(attempt=1, total_chunks=1, content_length=2, elapsed_ms=1, finish_reason="stop"),
    )
    assert result == ChatResult(status="complete", content="Hi", finish_reason="stop", attempts=1)
    assert result.reasoning is None
    assert result.tool_calls is None
