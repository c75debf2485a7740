"""A chat told as a Responses stream: numbered from 0 the same way on every replay, items in
OpenAI's order, a retried attempt's repeats never shown twice, and every end told as OpenAI does."""

from __future__ import annotations

from typing import Any

from streambridge.api.response_stream import Echo, ResponseStream
from streambridge.api.retold import from_result
from streambridge.shared.chats import ChatResult
from streambridge.shared.events import (
    Cancelled,
    Complete,
    Content,
    Error,
    Event,
    Failed,
    FunctionCall,
    Reasoning,
    Started,
    ToolCall,
    ToolCallFragment,
    Usage,
)

CHAT = "c" * 32


def told(*events: Event) -> tuple[list[dict[str, Any]], ResponseStream]:
    story = ResponseStream(CHAT, Echo(), 1700000000, "m")
    out = story.begin()
    for event in events:
        out += story.feed(event)
    return out, story


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def test_every_replay_numbers_every_event_the_same_from_zero() -> None:
    chat = (Started(1, "m"), Content("Hel", 1, 1), Content("lo", 2, 1), Complete(1, 2, 5, 9, "stop", Usage(1, 2, 3)))
    first, _ = told(*chat)
    again, _ = told(*chat)
    assert first == again
    assert [e["sequence_number"] for e in first] == list(range(len(first)))
    assert kinds(first) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    completed = first[-1]["response"]
    assert completed["output"][0]["content"][0]["text"] == "Hello"
    assert completed["usage"]["output_tokens"] == 2


def test_a_retry_that_says_the_same_again_shows_only_what_goes_beyond() -> None:
    out, story = told(
        Started(1, "m"),
        Content("Hello ", 1, 1),
        Error("broken stream", True, 1),
        Started(2, "m"),
        Content("Hello world", 1, 2),
        Complete(2, 1, 11, 5, "stop"),
    )
    assert [e["delta"] for e in out if e["type"] == "response.output_text.delta"] == ["Hello ", "world"]
    assert kinds(out).count("response.in_progress") == 1
    assert story.snapshot()["output"][0]["content"][0]["text"] == "Hello world"


def test_a_retry_that_says_something_else_fails_the_response_stream() -> None:
    out, story = told(Started(1, "m"), Content("Hello", 1, 1), Started(2, "m"), Content("Howdy", 1, 2))
    assert out[-1]["type"] == "response.failed"
    assert out[-1]["response"]["error"]["code"] == "retry_diverged"
    assert story.ended


def test_reasoning_is_an_item_done_before_the_message_begins() -> None:
    out, story = told(Started(1, "m"), Reasoning("hmm", 1, 1), Content("yes", 1, 1), Complete(1, 1, 3, 1, "stop"))
    assert kinds(out).index("response.reasoning_text.done") < kinds(out).index("response.output_item.added", 5)
    assert [item["type"] for item in story.snapshot()["output"]] == ["reasoning", "message"]
    assert story.snapshot()["output"][0]["content"] == [{"type": "reasoning_text", "text": "hmm"}]


def test_interleaved_parallel_calls_each_get_their_item_and_end_with_the_response() -> None:
    out, story = told(
        Started(1, "m"),
        ToolCallFragment(0, "call_a", "f", '{"x"', 1),
        ToolCallFragment(1, "call_b", "g", '{"y"', 1),
        ToolCallFragment(0, None, None, ":1}", 1),
        ToolCallFragment(1, None, None, ":2}", 1),
        Complete(1, 4, 0, 1, "tool_calls"),
    )
    calls = story.snapshot()["output"]
    assert [(c["call_id"], c["name"], c["arguments"], c["status"]) for c in calls] == [
        ("call_a", "f", '{"x":1}', "completed"),
        ("call_b", "g", '{"y":2}', "completed"),
    ]
    done = [e["arguments"] for e in out if e["type"] == "response.function_call_arguments.done"]
    assert done == ['{"x":1}', '{"y":2}']
    assert out[-1]["type"] == "response.completed"


def test_a_length_stop_is_incomplete_for_max_output_tokens() -> None:
    out, story = told(Started(1, "m"), Content("cut", 1, 1), Complete(1, 1, 3, 1, "length"))
    assert out[-1]["type"] == "response.incomplete"
    assert story.snapshot()["incomplete_details"] == {"reason": "max_output_tokens"}


def test_failure_and_cancel_end_the_response_with_their_status() -> None:
    failed, story = told(Started(1, "m"), Content("par", 1, 1), Failed("upstream down", 3))
    assert failed[-1]["type"] == "response.failed"
    assert story.snapshot()["error"] == {"code": "server_error", "message": "upstream down"}
    assert story.snapshot()["output"][0]["status"] == "incomplete"
    cancelled, story = told(Started(1, "m"), Cancelled())
    assert cancelled[-1]["type"] == "response.incomplete"
    assert story.snapshot()["status"] == "cancelled"


def test_a_keepalive_takes_no_number_of_its_own() -> None:
    out, story = told(Started(1, "m"), Content("a", 1, 1))
    assert story.keepalive() == {"type": "keepalive", "sequence_number": out[-1]["sequence_number"]}
    assert story.feed(Content("b", 2, 1))[0]["sequence_number"] == out[-1]["sequence_number"] + 1


def test_a_result_tells_the_same_items_as_the_stream_did() -> None:
    streamed, _ = told(
        Started(1, "m"),
        Reasoning("hmm", 1, 1),
        Content("yes", 1, 1),
        ToolCallFragment(0, "call_a", "f", "{}", 1),
        Complete(1, 2, 3, 1, "tool_calls", Usage(1, 2, 3)),
    )
    call = ToolCall(id="call_a", function=FunctionCall("f", "{}"))
    result = ChatResult("complete", "yes", "tool_calls", Usage(1, 2, 3), 1, reasoning="hmm", tool_calls=[call])
    _, story = told(*from_result("m", result))
    assert story.snapshot()["output"] == streamed[-1]["response"]["output"]
