"""What a client was told of a chat, for the OpenAI-shaped streams, which cannot take anything back.

A chat's stream may hold several attempts: one that failed part-way is followed by another that
starts over. The native event stream says so (``started`` with a new ``attempt``); a Chat
Completions or Responses stream has no way to, so an attempt that follows one whose output was
shown must say the same again. :class:`Said` matches each attempt's content, reasoning and tool
call fragments against what was shown and passes on only what goes beyond it. A retry that says
something else is :class:`Diverged` (a deterministic upstream, or one that failed before
answering, never does). Pure: the same events give the same outputs, so a resume that replays the
stream from its start tells the same story and skips what the client already has.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from streambridge.shared.events import (
    Cancelled,
    Complete,
    Content,
    Event,
    Failed,
    Reasoning,
    Started,
    ToolCallFragment,
)


class Shown:
    """What a client was shown of one kind of output. Text is matched character by character,
    tool call fragments one by one."""

    def __init__(self) -> None:
        self.text = ""
        self.pieces: list[Any] = []
        self.matched = 0  # how much of it the current attempt has said again

    def again(self) -> None:
        self.matched = 0

    @property
    def behind(self) -> bool:
        return self.matched < max(len(self.text), len(self.pieces))

    def new_text(self, text: str) -> str | None:
        """What of ``text`` the client has not seen; None if the attempt said something else."""
        seen = self.text[self.matched : self.matched + len(text)]
        if not text.startswith(seen):
            return None
        self.text += text[len(seen) :]
        self.matched += len(text)
        return text[len(seen) :]

    def new_piece(self, piece: Any) -> bool | None:
        """Whether the client has yet to see ``piece``; None if the attempt said something else."""
        if self.matched < len(self.pieces):
            if self.pieces[self.matched] != piece:
                return None
            self.matched += 1
            return False
        self.pieces.append(piece)
        self.matched += 1
        return True


class Begun(msgspec.Struct, frozen=True):
    """The first attempt started (later ones are not news to the client)."""

    model: str


class Said(msgspec.Struct, frozen=True):
    """Text the client has not seen: the answer's (``content``) or the model's reasoning."""

    kind: Literal["content", "reasoning"]
    text: str


class Called(msgspec.Struct, frozen=True):
    """A tool call fragment the client has not seen; ``first`` for its call's first fragment."""

    fragment: ToolCallFragment
    first: bool


class Diverged(msgspec.Struct, frozen=True):
    """A retry said something other than what was shown, or less of it."""


Told = Begun | Said | Called | Diverged | Complete | Failed | Cancelled


class Telling:
    """Feeds a chat's events, in stream order, and gives what the client is to be told of each."""

    def __init__(self) -> None:
        self.model = ""
        self.content, self.reasoning, self.tools = Shown(), Shown(), Shown()
        self.named: set[int] = set()  # tool calls whose first fragment was told

    def feed(self, event: Event) -> Told | None:
        if isinstance(event, Started):
            first = not self.model
            self.model = event.model
            for shown in (self.content, self.reasoning, self.tools):
                shown.again()
            return Begun(event.model) if first else None
        if isinstance(event, ToolCallFragment):
            # ids are made up afresh by most upstreams on every request: a retry is matched without them
            fresh = self.tools.new_piece((event.index, event.name, event.arguments))
            if fresh is None:
                return Diverged()
            if not fresh:
                return None
            first = event.index not in self.named
            self.named.add(event.index)
            return Called(event, first)
        if isinstance(event, Content | Reasoning):
            content = isinstance(event, Content)
            new = (self.content if content else self.reasoning).new_text(event.content)
            if new is None:
                return Diverged()
            return Said("content" if content else "reasoning", new) if new else None
        if isinstance(event, Complete):
            if self.content.behind or self.reasoning.behind or self.tools.behind:
                return Diverged()  # the retry said less than was shown
            return event
        if isinstance(event, Failed | Cancelled):
            return event
        return None  # progress, status, a failed attempt's error: news only to the native stream
