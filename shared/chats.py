"""A chat as stored in Redis: the request the API accepted and the result the worker left.

The chat's hash (``keys.chat``) holds ``owner``, ``created_at``, ``status``, ``request``
(JSON of :class:`ChatRequest`) and, once it ended, ``result`` (JSON of :class:`ChatResult`).
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

from streambridge.shared.events import ToolCall, Usage

Status = Literal["queued", "running", "complete", "failed", "cancelled"]
TERMINAL_STATUSES: Final = frozenset({"complete", "failed", "cancelled"})

Role = Literal["system", "user", "assistant"]


class Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: Role
    content: str


class ChatRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None


class ChatResult(msgspec.Struct, frozen=True, omit_defaults=True):
    """Fields added later get defaults, so results stored before them still decode."""

    status: Status
    content: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    attempts: int = 0
    error: str | None = None
    reasoning: str | None = None  # the completing attempt's reasoning text, if it sent any
    tool_calls: list[ToolCall] | None = None  # the completing attempt's tool calls, if it made any


_request_decoder: Final = msgspec.json.Decoder(ChatRequest)
_result_decoder: Final = msgspec.json.Decoder(ChatResult)


def decode_request(data: bytes | str) -> ChatRequest:
    return _request_decoder.decode(data)


def decode_result(data: bytes | str) -> ChatResult:
    return _result_decoder.decode(data)
