"""The event stream's types: one msgspec tagged union, encoded once per event.

The JSON of each event carries ``"type"``; the edge sends it verbatim as SSE ``data``.
Fields added later must get defaults so that old entries still decode.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, cast

import msgspec


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Started(msgspec.Struct, tag="started", tag_field="type", frozen=True):
    attempt: int
    model: str


class Content(msgspec.Struct, tag="content", tag_field="type", frozen=True):
    content: str
    index: int
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


class Failed(msgspec.Struct, tag="failed", tag_field="type", frozen=True):
    message: str
    attempts: int


class Cancelled(msgspec.Struct, tag="cancelled", tag_field="type", frozen=True):
    pass


Event = Started | Content | Progress | Status | Error | Complete | Failed | Cancelled
Terminal = Complete | Failed | Cancelled

TERMINAL_TYPES: Final = frozenset({"complete", "failed", "cancelled"})
EVENT_TYPES: Final = frozenset({"started", "content", "progress", "status", "error", "complete", "failed", "cancelled"})

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


def assemble_text(events: Iterable[Event]) -> str:
    """The answer's text, by the contract's rule.

    The concatenation of the ``content`` events of the attempt that completed; while no
    attempt has completed, of the latest attempt seen (what a client shows as it streams).
    """
    parts: dict[int, list[str]] = {}
    latest = 0
    for event in events:
        if isinstance(event, Content):
            parts.setdefault(event.attempt, []).append(event.content)
        if isinstance(event, Started | Content | Complete):
            latest = event.attempt
        if isinstance(event, Complete):
            return "".join(parts.get(event.attempt, ()))
    return "".join(parts.get(latest, ()))
