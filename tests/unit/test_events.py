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
    Progress,
    Started,
    Status,
    Usage,
    assemble_text,
    decode_event,
    encode_event,
    event_type,
    is_terminal,
)

EXAMPLES: list[tuple[Event, dict[str, object]]] = [
    (Started(attempt=1, model="m"), {"type": "started", "attempt": 1, "model": "m"}),
    (Content(content="hi", index=1, attempt=1), {"type": "content", "content": "hi", "index": 1, "attempt": 1}),
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
