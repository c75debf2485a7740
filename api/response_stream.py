"""A chat told as OpenAI's Responses API tells a response: its streaming events and its object.

:class:`ResponseStream` is fed a chat's events in stream order and gives the Responses events
each one makes, numbered from 0 (``response.created``) by ``sequence_number``. Like the chunk
stream it is a pure function of the chat's stream, so every replay numbers every event the same:
``starting_after=N`` is "replay, and send what is numbered above N", on any edge. Output items
follow OpenAI's order (``output_item.added``, ``content_part.added``, deltas, ``….done``); a
message or reasoning item is done when the next item begins, function calls when the response
ends (an upstream may interleave parallel calls' fragments).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from streambridge.api.telling import Begun, Called, Diverged, Said, Telling
from streambridge.shared.events import Cancelled, Complete, Event, Failed, Usage

#: why a response stopped short, by the upstream's ``finish_reason``
INCOMPLETE: Final = {"length": "max_output_tokens", "content_filter": "content_filter"}


class Echo(msgspec.Struct, kw_only=True):
    """What a response object repeats of the request that made it (kept in the chat's hash)."""

    model: str | None = None
    instructions: str | None = None
    background: bool = False
    store: bool = True
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] = []
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] = msgspec.field(default_factory=lambda: {"format": {"type": "text"}})
    reasoning: dict[str, Any] = msgspec.field(default_factory=lambda: {"effort": None, "summary": None})
    metadata: dict[str, str] = {}
    user: str | None = None
    truncation: str = "disabled"
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None


def response_id(chat_id: str) -> str:
    return f"resp_{chat_id}"


class ResponseStream:
    """One response's events and its object as they stand after the events fed so far."""

    def __init__(self, chat_id: str, echo: Echo, created_at: int, model: str) -> None:
        self.chat_id, self.echo, self.created_at = chat_id, echo, created_at
        self.model = model
        self.telling = Telling()
        self.seq = -1
        self.status = "queued"
        self.output: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None  # the open message or reasoning item
        self.calls: dict[int, dict[str, Any]] = {}  # open function calls, by the upstream's index
        self.usage: Usage | None = None
        self.error: dict[str, Any] | None = None
        self.incomplete: dict[str, str] | None = None
        self.ended = False

    def begin(self) -> list[dict[str, Any]]:
        created = [self._lifecycle("response.created")]
        return [*created, self._lifecycle("response.queued")] if self.echo.background else created

    def feed(self, event: Event) -> list[dict[str, Any]]:
        if self.ended:
            return []
        told = self.telling.feed(event)
        if isinstance(told, Begun):
            self.model, self.status = told.model, "in_progress"
            return [self._lifecycle("response.in_progress")]
        if isinstance(told, Said):
            return self._said(told)
        if isinstance(told, Called):
            return self._called(told)
        if isinstance(told, Complete):
            return self._complete(told)
        if isinstance(told, Failed):
            return self._end("failed", {"code": told.code or "server_error", "message": told.message})
        if isinstance(told, Cancelled):
            # OpenAI has no event for it, and the SDK types an unknown one wrong: the event of a
            # response that stopped short, its status `cancelled`
            return self._end("cancelled", None, "response.incomplete")
        if isinstance(told, Diverged):
            message = "the upstream failed mid-answer and its retry answered differently; ask again"
            return self._end("failed", {"code": "retry_diverged", "message": message})
        return []

    def snapshot(self) -> dict[str, Any]:
        """The response object as it stands."""
        echo = self.echo
        return {
            "id": response_id(self.chat_id),
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "background": echo.background,
            "error": self.error,
            "incomplete_details": self.incomplete,
            "instructions": echo.instructions,
            "max_output_tokens": echo.max_output_tokens,
            "model": self.model,
            "output": [public(item) for item in self.output],
            "parallel_tool_calls": echo.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": echo.reasoning,
            "store": echo.store,
            "temperature": echo.temperature,
            "text": echo.text,
            "tool_choice": echo.tool_choice,
            "tools": echo.tools,
            "top_p": echo.top_p,
            "truncation": echo.truncation,
            "usage": responses_usage(self.usage) if self.usage is not None else None,
            "user": echo.user,
            "safety_identifier": echo.safety_identifier,
            "prompt_cache_key": echo.prompt_cache_key,
            "service_tier": echo.service_tier,
            "metadata": echo.metadata,
            "streambridge": {"chat_id": self.chat_id},
        }

    def keepalive(self) -> dict[str, Any]:
        """A keepalive, numbered as the last event: numbers are the stream's, a heartbeat takes none."""
        return {"type": "keepalive", "sequence_number": max(self.seq, 0)}

    def interrupted(self) -> dict[str, Any]:
        """An error for a stream cut short, naming where to resume (numbered as the last event)."""
        message = (
            f"the stream was interrupted; resume with GET /v1/responses/{response_id(self.chat_id)}"
            f"?stream=true&starting_after={self.seq}"
        )
        return {"type": "error", "code": "stream_interrupted", "message": message, "param": None, **self._number()}

    def expired(self) -> dict[str, Any]:
        """An error for a stream that was trimmed past its start: it cannot be told again."""
        message = f"the events were trimmed; GET /v1/responses/{response_id(self.chat_id)} has the response"
        return {"type": "error", "code": "stream_expired", "message": message, "param": None, **self._number()}

    def _said(self, told: Said) -> list[dict[str, Any]]:
        kind = "message" if told.kind == "content" else "reasoning"
        events = [] if self.current is not None and self.current["type"] == kind else self._open(kind)
        item = self.current
        assert item is not None
        part = item["content"][0]
        part["text"] += told.text
        delta = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
        events.append(
            self._event(
                delta, item_id=item["id"], output_index=item["index"], content_index=0, delta=told.text, **extra
            )
        )
        return events

    def _open(self, kind: str) -> list[dict[str, Any]]:
        events = self._close_current()
        n = sum(1 for item in self.output if item["type"] == kind)
        prefix = "msg" if kind == "message" else "rs"
        item_id = f"{prefix}_{self.chat_id}" + (f"_{n}" if n else "")
        if kind == "message":
            item: dict[str, Any] = {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant"}
            part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = {"id": item_id, "type": "reasoning", "summary": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        index = len(self.output)
        events.append(self._event("response.output_item.added", output_index=index, item={**item, "content": []}))
        events.append(
            self._event(
                "response.content_part.added", item_id=item_id, output_index=index, content_index=0, part=dict(part)
            )
        )
        item["content"] = [part]
        self.output.append(item)
        self.current = item
        item["index"] = index
        return events

    def _close_current(self) -> list[dict[str, Any]]:
        item, self.current = self.current, None
        if item is None:
            return []
        item["status"] = "completed"
        part, index = item["content"][0], item["index"]
        if item["type"] == "message":
            done = self._event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=part["text"],
                logprobs=[],
            )
        else:
            done = self._event(
                "response.reasoning_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=part["text"],
            )
        return [
            done,
            self._event(
                "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=dict(part)
            ),
            self._event("response.output_item.done", output_index=index, item=public(item)),
        ]

    def _called(self, told: Called) -> list[dict[str, Any]]:
        fragment = told.fragment
        events = []
        call = self.calls.get(fragment.index)
        if call is None:
            events += self._close_current()
            index = len(self.output)
            call = {
                "id": f"fc_{self.chat_id}_{fragment.index}",
                "type": "function_call",
                "status": "in_progress",
                "call_id": fragment.id or f"call_{fragment.index}",
                "name": fragment.name or "",
                "arguments": "",
                "index": index,
            }
            self.output.append(call)
            self.calls[fragment.index] = call
            events.append(self._event("response.output_item.added", output_index=index, item=public(call)))
        call["arguments"] += fragment.arguments
        if fragment.arguments:
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=call["id"],
                    output_index=call["index"],
                    delta=fragment.arguments,
                )
            )
        return events

    def _complete(self, event: Complete) -> list[dict[str, Any]]:
        events = self._close_current()
        for call in self.calls.values():
            call["status"] = "completed"
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=call["id"],
                    output_index=call["index"],
                    name=call["name"],
                    arguments=call["arguments"],
                )
            )
            events.append(self._event("response.output_item.done", output_index=call["index"], item=public(call)))
        self.calls.clear()
        self.usage = event.usage
        reason = INCOMPLETE.get(event.finish_reason or "")
        if reason is not None:
            self.incomplete = {"reason": reason}
            return events + self._end("incomplete", None)
        return events + self._end("completed", None)

    def _end(self, status: str, error: dict[str, Any] | None, kind: str | None = None) -> list[dict[str, Any]]:
        self.ended, self.status, self.error = True, status, error
        for item in self.output:
            if item["status"] == "in_progress":
                item["status"] = "incomplete"
        return [self._lifecycle(kind or f"response.{status}")]

    def _lifecycle(self, kind: str) -> dict[str, Any]:
        return self._event(kind, response=self.snapshot())

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, **fields, "sequence_number": self.seq}

    def _number(self) -> dict[str, int]:
        return {"sequence_number": max(self.seq, 0)}


def public(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as the client sees it: a copy, without the bookkeeping."""
    shown = {k: v for k, v in item.items() if k != "index"}
    if "content" in shown:
        shown["content"] = [dict(part) for part in shown["content"]]
    return shown


def responses_usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": (usage.prompt_tokens_details or {}).get("cached_tokens", 0)},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {
            "reasoning_tokens": (usage.completion_tokens_details or {}).get("reasoning_tokens", 0)
        },
        "total_tokens": usage.total_tokens,
    }
