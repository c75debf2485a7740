"""A chat told as one attempt that said it all at once: from its result once it ended (the result
outlives the stream), or from its latest attempt so far. For answers that are one object (a
``chat.completion``, a ``response``), which show what the chat says now, never what an earlier
attempt said before it failed."""

from __future__ import annotations

import msgspec

from streambridge.shared.chats import ChatResult
from streambridge.shared.events import (
    Cancelled,
    Complete,
    Content,
    Event,
    Failed,
    Reasoning,
    Started,
    ToolCall,
    ToolCallFragment,
    assemble_reasoning,
    assemble_text,
    assemble_tool_calls,
)


def said(model: str, content: str, reasoning: str | None, tool_calls: list[ToolCall] | None) -> list[Event]:
    events: list[Event] = [Started(attempt=1, model=model)]
    if reasoning:
        events.append(Reasoning(reasoning, 1, 1))
    if content:
        events.append(Content(content, 1, 1))
    for n, call in enumerate(tool_calls or ()):
        events.append(ToolCallFragment(n, call.id, call.function.name, call.function.arguments, 1))
    return events


def from_result(model: str, result: ChatResult) -> list[Event]:
    """A finished chat: what its last attempt said, and how it ended."""
    events = said(model, result.content, result.reasoning, result.tool_calls)
    if result.status == "cancelled":
        return [*events, Cancelled()]
    if result.status == "failed":
        failed = Failed(result.error or "the chat failed", result.attempts, result.upstream_status, result.error_code)
        return [*events, msgspec.structs.replace(failed, param=result.error_param)]
    return [*events, Complete(1, 1, len(result.content), 0, result.finish_reason, result.usage)]


def so_far(events: list[Event]) -> list[Event]:
    """A running chat: what its latest attempt has said (nothing before an attempt starts)."""
    started = next((e for e in reversed(events) if isinstance(e, Started)), None)
    if started is None:
        return []
    return said(started.model, assemble_text(events), assemble_reasoning(events), assemble_tool_calls(events))
