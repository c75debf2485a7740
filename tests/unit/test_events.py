import msgspec
import pytest

from streambridge.shared.events import (
    EVENT_TYPES,
    Cancelled,
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
    decode_event,
    encode_event,
    event_type,
    is_terminal,
)

EXAMPLES: list[tuple[Event, dict[str, object]]] = [
    (Started(attempt=1, model="m"), {"type": "started", "attempt": 1, "model": "m"}),
    (Content(content="hi", index=1, attempt=1), {"type": "content", "content": "hi", "index": 1, "attempt": 1}),
    (
        Reasoning(content="hmm", index=1, attempt=1),
        {"type": "reasoning", "content": "hmm", "index": 1, "attempt": 1},
    ),
    (
        ToolCallFragment(index=0, id="call_1", name="get_weather", arguments='{"ci', attempt=1),
        {"type": "tool_call", "index": 0, "id": "call_1", "name": "get_weather", "arguments": '{"ci', "attempt": 1},
    ),
    (
        Progress(chunks=10, chars=42, elapsed_ms=300, attempt=1),
        {"type": "progress", "chunks": 10, "chars": 42, "elapsed_ms": 300, "attempt": 1},
    ),
    (Status(message="retrying", attempt=2), {"type": "status", "message": "retrying", "attempt": 2}),
    (
        Error(message="boom", retryable=True, attempt=1),
        {"type": "error", "message": "boom", "retryable": True, "attempt": 1},
    ),
    (
        Complete(
            attempt=1,
            total_chunks=3,
            content_length=7,
            elapsed_ms=5,
            finish_reason="stop",
            usage=Usage(prompt_tokens=1, completion_tokens=3, total_tokens=4),
        ),
        {
            "type": "complete",
            "attempt": 1,
            "total_chunks": 3,
            "content_length": 7,
            "elapsed_ms": 5,
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
        },
    ),
    (Failed(message="gave up", attempts=3), {"type": "failed", "message": "gave up", "attempts": 3}),
    (Cancelled(), {"type": "cancelled"}),
]


@pytest.mark.parametrize(("event", "json"), EXAMPLES, ids=[event_type(e) for e, _ in EXAMPLES])
def test_event_json_is_the_contracts_shape_and_round_trips(event: Event, json: dict[str, object]) -> None:
    assert msgspec.json.decode(encode_event(event)) == json
    assert decode_event(encode_event(event)) == event
    assert event_type(event) == json["type"]


def test_every_contract_type_has_an_example() -> None:
    assert {event_type(e) for e, _ in EXAMPLES} == EVENT_TYPES


def test_terminal_events() -> None:
    assert [event_type(e) for e, _ in EXAMPLES if is_terminal(e)] == ["complete", "failed", "cancelled"]


def test_unknown_type_is_rejected() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_event(b'{"type":"nope"}')


def test_text_is_the_completing_attempts_content_only() -> None:
    events: list[Event] = [
        Started(attempt=1, model="m"),
        Content(content="abandoned ", index=1, attempt=1),
        Error(message="x", retryable=True, attempt=1),
        Started(attempt=2, model="m"),
        Content(content="kept", index=1, attempt=2),
        Content(content=" text", index=2, attempt=2),
        Complete(attempt=2, total_chunks=2, content_length=9, elapsed_ms=1),
    ]
    assert assemble_text(events) == "kept text"
    assert assemble_text(events[:3]) == "abandoned "
    assert assemble_text(events[:5]) == "kept"


def fragment(index: int, arguments: str, attempt: int = 2, **named: str) -> ToolCallFragment:
    return ToolCallFragment(
        index=index, id=named.get("id"), name=named.get("name"), arguments=arguments, attempt=attempt
    )


def test_reasoning_and_tool_calls_are_the_completing_attempts_and_not_part_of_the_text() -> None:
    events: list[Event] = [
        Started(attempt=1, model="m"),
        Reasoning(content="abandoned thought", index=1, attempt=1),
        fragment(0, '{"x":', attempt=1, id="call_old", name="old"),
        Error(message="x", retryable=True, attempt=1),
        Started(attempt=2, model="m"),
        Reasoning(content="Let me ", index=1, attempt=2),
        Reasoning(content="think.", index=2, attempt=2),
        fragment(1, "", id="call_b", name="lookup"),
        fragment(0, "", id="call_a", name="get_weather"),
        fragment(0, '{"city":'),
        fragment(1, '{"q":"rivers"}'),
        fragment(0, '"Paris"}', id="call_a", name="get_weather"),  # repeated by some servers: kept once
        Complete(attempt=2, total_chunks=0, content_length=0, elapsed_ms=1, finish_reason="tool_calls"),
    ]
    assert assemble_text(events) == ""
    assert assemble_reasoning(events) == "Let me think."
    assert assemble_tool_calls(events) == [
        ToolCall(id="call_a", function=FunctionCall(name="get_weather", arguments='{"city":"Paris"}')),
        ToolCall(id="call_b", function=FunctionCall(name="lookup", arguments='{"q":"rivers"}')),
    ]
    assert assemble_reasoning(events[:4]) == "abandoned thought"  # no attempt completed: the latest
    assert assemble_tool_calls(events[:4]) == [ToolCall(id="call_old", function=FunctionCall("old", '{"x":'))]
    assert assemble_tool_calls(events[:6]) == []  # attempt 2 started: attempt 1's call is superseded


def test_an_assembled_tool_call_is_shaped_as_openai_sends_it() -> None:
    call = ToolCall(id="call_a", function=FunctionCall(name="f", arguments="{}"))
    assert msgspec.json.decode(msgspec.json.encode(call)) == {
        "id": "call_a",
        "type": "function",
        "function": {"name": "f", "arguments": "{}"},
    }
