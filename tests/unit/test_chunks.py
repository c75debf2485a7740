"""The chunk stream of the OpenAI front door as a function of a chat's events: what a client is
shown once is never shown again, even across a retried attempt."""

from __future__ import annotations

import msgspec

from streambridge.api.completions import Chunks
from streambridge.shared.events import (
    Complete,
    Content,
    Error,
    Event,
    Reasoning,
    Started,
    ToolCallFragment,
    encode_event,
)
from streambridge.shared.streams import Entry


def chunks_of(*events: Event, after: int | None = None) -> list[dict[str, object] | str]:
    chunks = Chunks("c" * 32, include_usage=False)
    out: list[dict[str, object] | str] = []
    for n, event in enumerate(events):
        data = chunks.feed(Entry(f"1700000000000-{n}", "", encode_event(event)))
        if after is not None and n <= after:
            continue
        for line in data.decode().splitlines():
            if line.startswith("data: "):
                out.append(line[6:] if line == "data: [DONE]" else msgspec.json.decode(line[6:]))
    return out


def deltas(out: list[dict[str, object] | str]) -> list[object]:
    return [c["choices"][0]["delta"] for c in out if isinstance(c, dict) and c.get("choices")]  # type: ignore[index]


def test_a_retry_that_says_the_same_again_shows_only_what_goes_beyond() -> None:
    out = chunks_of(
        Started(1, "m"),
        Content("Hello ", 1, 1),
        Content("wor", 2, 1),
        Error("broken stream", True, 1),
        Started(2, "m"),
        Content("Hello world", 1, 2),
        Complete(2, 1, 11, 5, "stop"),
    )
    contents = [d.get("content") for d in deltas(out)]  # type: ignore[attr-defined]
    assert contents == ["", "Hello ", "wor", "ld", None]
    assert out[-1] == "[DONE]"


def test_a_retry_that_says_something_else_ends_the_stream_with_an_error() -> None:
    out = chunks_of(
        Started(1, "m"), Content("Hello", 1, 1), Error("x", True, 1), Started(2, "m"), Content("Howdy", 1, 2)
    )
    assert out[-1]["error"]["code"] == "retry_diverged"  # type: ignore[index]


def test_reasoning_and_tool_calls_come_out_as_openai_streams_them() -> None:
    out = chunks_of(
        Started(1, "m"),
        Reasoning("think", 1, 1),
        ToolCallFragment(0, "call_1", "lookup", '{"q":', 1),
        ToolCallFragment(0, None, None, '"x"}', 1),
        Complete(1, 0, 0, 5, "tool_calls"),
    )
    assert deltas(out)[1:3] == [
        {"reasoning_content": "think"},
        {
            "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q":'}}
            ]
        },
    ]
    assert deltas(out)[3] == {"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]}
    assert out[-2]["choices"][0]["finish_reason"] == "tool_calls"  # type: ignore[index]


def test_a_resume_shows_exactly_what_followed_its_cursor() -> None:
    events = (Started(1, "m"), Content("a", 1, 1), Content("b", 2, 1), Content("c", 3, 1), Complete(1, 3, 3, 1))
    whole = chunks_of(*events)
    assert chunks_of(*events, after=2) == whole[3:]


def test_a_tool_calls_id_and_name_go_with_its_first_fragment_only() -> None:
    # some upstreams repeat them on every fragment; the SDK would join the repeats
    out = chunks_of(
        Started(1, "m"),
        ToolCallFragment(0, "call_1", "lookup", "{", 1),
        ToolCallFragment(0, "call_1", "lookup", "}", 1),
        Complete(1, 0, 0, 5, "tool_calls"),
    )
    assert deltas(out)[2] == {"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}


def test_a_retried_tool_call_with_a_new_id_is_the_same_call() -> None:
    out = chunks_of(
        Started(1, "m"),
        ToolCallFragment(0, "call_a", "lookup", "{}", 1),
        Error("x", True, 1),
        Started(2, "m"),
        ToolCallFragment(0, "call_b", "lookup", "{}", 2),
        Complete(2, 0, 0, 5, "tool_calls"),
    )
    assert out[-1] == "[DONE]"
    assert len([d for d in deltas(out) if "tool_calls" in d]) == 1  # type: ignore[operator]


def test_a_stream_cut_short_ends_with_an_error_naming_where_to_resume() -> None:
    chunks = Chunks("c" * 32, include_usage=False)
    chunks.feed(Entry("1700000000000-0", "", encode_event(Started(1, "m"))))
    chunks.feed(Entry("1700000000000-1", "", encode_event(Content("a", 1, 1))))
    error = msgspec.json.decode(chunks.interrupted().decode()[6:])
    assert error["error"]["code"] == "stream_interrupted"
    assert error["streambridge"]["cursor"] == "1700000000000-1"


def test_a_retry_may_split_a_tool_calls_arguments_otherwise() -> None:
    out = chunks_of(
        Started(1, "m"),
        ToolCallFragment(0, "call_1", "f", '{"q":', 1),
        Error("broken stream", True, 1),
        Started(2, "m"),
        ToolCallFragment(0, "call_9", "f", '{"', 2),
        ToolCallFragment(0, None, None, 'q":"x"}', 2),
        Complete(2, 2, 0, 5, "tool_calls"),
    )
    calls = [d["tool_calls"][0] for d in deltas(out) if d.get("tool_calls")]  # type: ignore[attr-defined]
    assert [c["function"]["arguments"] for c in calls] == ['{"q":', '"x"}']
    assert [c.get("id") for c in calls] == ["call_1", None], "the call is named once, as first shown"
    assert out[-1] == "[DONE]"
