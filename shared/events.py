"""The event stream's types: one msgspec tagged union, encoded once per event.

The JSON of each event carries ``"type"``; the edge sends it verbatim as SSE ``data``.
Fields added later must get defaults so that old entries still decode.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Literal, TypeVar, cast

import msgspec


class Usage(msgspec.Struct, frozen=True, omit_defaults=True):
    prompt_tokens: int  # the counts have no default, so they are always written
    completion_tokens: int
    total_tokens: int
    # the upstream's breakdowns (``cached_tokens``, ``reasoning_tokens``, …), only where it sent them
    prompt_tokens_details: dict[str, int] | None = None
    completion_tokens_details: dict[str, int] | None = None


class Started(msgspec.Struct, tag="started", tag_field="type", frozen=True):
    attempt: int
    model: str


class Content(msgspec.Struct, tag="content", tag_field="type", frozen=True):
    content: str
    index: int
    attempt: int


class Reasoning(msgspec.Struct, tag="reasoning", tag_field="type", frozen=True):
    """The model's reasoning text, kept apart from the answer; `index` counts these within the attempt."""

    content: str
    index: int
    attempt: int


class ToolCallFragment(msgspec.Struct, tag="tool_call", tag_field="type", frozen=True):
    """One fragment of a streamed tool call, as OpenAI's `delta.tool_calls[i]` carries it.

    `index` is the call's place in the message; `id` and `name` come with its first fragment,
    and the `arguments` fragments, joined in stream order, are its arguments' JSON.
    """

    index: int
    id: str | None
    name: str | None
    arguments: str
    attempt: int


class Progress(msgspec.Struct, tag="progress", tag_field="type", frozen=True):
    chunks: int
    chars: int
    elapsed_ms: int
    attempt: int


class Status(msgspec.Struct, tag="status", tag_field="type", frozen=True):
    message: str
    attempt: int


class Error(msgspec.Struct, tag="error", tag_field="type", frozen=True):
    message: str
    retryable: bool
    attempt: int


class Complete(msgspec.Struct, tag="complete", tag_field="type", frozen=True):
    attempt: int
    total_chunks: int
    content_length: int
    elapsed_ms: int
    finish_reason: str | None = None
    usage: Usage | None = None


class Failed(msgspec.Struct, tag="failed", tag_field="type", frozen=True, omit_defaults=True):
    """Terminal: every attempt failed. When the upstream refused the request (a 4xx), its status
    and its error's ``code`` and ``param`` come along, so the front door can answer as it did."""

    message: str
    attempts: int
    upstream_status: int | None = None
    code: str | None = None
    param: str | None = None


class Cancelled(msgspec.Struct, tag="cancelled", tag_field="type", frozen=True):
    pass


class FunctionCall(msgspec.Struct, frozen=True):
    name: str
    arguments: str


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """An assembled tool call, shaped as in an OpenAI `chat.completion` message."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


Event = Started | Content | Reasoning | ToolCallFragment | Progress | Status | Error | Complete | Failed | Cancelled
Terminal = Complete | Failed | Cancelled

TERMINAL_TYPES: Final = frozenset({"complete", "failed", "cancelled"})
EVENT_TYPES: Final = frozenset(
    {"started", "content", "reasoning", "tool_call", "progress", "status", "error", "complete", "failed", "cancelled"}
)

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(Event)


def event_type(event: Event) -> str:
    return cast(str, type(event).__struct_config__.tag)


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes | str) -> Event:
    # Annotated rather than cast: msgspec's stubs type a union's decoder as Any in some
    # releases and exactly in others, and a cast is then redundant.
    event: Event = _decoder.decode(data)
    return event


def is_terminal(event: Event) -> bool:
    return isinstance(event, Complete | Failed | Cancelled)


_E = TypeVar("_E", bound=Content | Reasoning | ToolCallFragment)


def answer_events(events: Iterable[Event], kind: type[_E]) -> list[_E]:
    """The events of one kind from the attempt that completed, by the contract's rule; while no
    attempt has completed, from the latest attempt seen (what a client shows as it streams)."""
    by_attempt: dict[int, list[_E]] = {}
    latest = 0
    for event in events:
        # tuples, not ``X | Y``: isinstance with a union object costs several times more, and a
        # worker runs this three times over every event of each chat it finishes
        if isinstance(event, _OF_ATTEMPT):
            latest = event.attempt
            if isinstance(event, kind):
                by_attempt.setdefault(latest, []).append(event)
            elif isinstance(event, Complete):
                return by_attempt.get(latest, [])
    return by_attempt.get(latest, [])


#: the events that belong to an attempt's answer (each carries the attempt it came from)
_OF_ATTEMPT: Final = (Started, Content, Reasoning, ToolCallFragment, Complete)


def assemble_text(events: Iterable[Event]) -> str:
    """The answer's text: the ``content`` of the attempt that completed (else the latest)."""
    return "".join(event.content for event in answer_events(events, Content))


def assemble_reasoning(events: Iterable[Event]) -> str:
    """The reasoning text of the attempt that completed (else the latest); not part of the answer."""
    return "".join(event.content for event in answer_events(events, Reasoning))


def assemble_tool_calls(events: Iterable[Event]) -> list[ToolCall]:
    """The tool calls of the attempt that completed (else the latest), in ``index`` order.

    Each call's ``arguments`` fragments are joined; its ``id`` and ``name`` are the first ones sent
    (a provider may repeat them on later fragments; joining those would garble them).
    """
    ids: dict[int, str] = {}
    names: dict[int, str] = {}
    arguments: dict[int, list[str]] = {}
    for event in answer_events(events, ToolCallFragment):
        arguments.setdefault(event.index, []).append(event.arguments)
        if event.id and event.index not in ids:
            ids[event.index] = event.id
        if event.name and event.index not in names:
            names[event.index] = event.name
    return [
        ToolCall(id=ids.get(i, ""), function=FunctionCall(name=names.get(i, ""), arguments="".join(arguments[i])))
        for i in sorted(arguments)
    ]
