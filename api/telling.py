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

from typing import Literal

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
    """What a client was shown of one text (the answer, the reasoning, a tool call's arguments),
    matched character by character, so a retry may split it otherwise."""

    def __init__(self) -> None:
        self.text = ""
        self.matched = 0  # how much of it the current attempt has said again

    def again(self) -> None:
        self.matched = 0

    @property
    def behind(self) -> bool:
        return self.matched < len(self.text)

    def new_text(self, text: str) -> str | None:
        """What of ``text`` the client has not seen; None if the attempt said something else."""
        seen = self.text[self.matched : self.matched + len(text)]
        if not text.startswith(seen):
            return None
        self.text += text[len(seen) :]
        self.matched += len(text)
        return text[len(seen) :]


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
        self.content, self.reasoning = Shown(), Shown()
        self.calls: dict[int, Shown] = {}  # each tool call's arguments, by its index
        self.names: dict[int, str] = {}  # and its name

    def feed(self, event: Event) -> Told | None:
        if isinstance(event, Started):
            first = not self.model
            self.model = event.model
            for shown in (self.content, self.reasoning, *self.calls.values()):
                shown.again()
            return Begun(event.model) if first else None
        if isinstance(event, ToolCallFragment):
            return self._called(event)
        if isinstance(event, Content | Reasoning):
            content = isinstance(event, Content)
            new = (self.content if content else self.reasoning).new_text(event.content)
            if new is None:
                return Diverged()
            return Said("content" if content else "reasoning", new) if new else None
        if isinstance(event, Complete):
            if any(shown.behind for shown in (self.content, self.reasoning, *self.calls.values())):
                return Diverged()  # the retry said less than was shown
            return event
        if isinstance(event, Failed | Cancelled):
            return event
        return None  # progress, status, a failed attempt's error: news only to the native stream

    def _called(self, event: ToolCallFragment) -> Told | None:
        """A call's arguments are matched as text, so a retry may split them otherwise; its id is
        not matched (most upstreams make one up afresh on every request), its name is."""
        first = event.index not in self.calls
        shown = self.calls.setdefault(event.index, Shown())
        named = self.names.setdefault(event.index, event.name or "") if event.name else None
        if named is not None and named != event.name:
            return Diverged()
        new = shown.new_text(event.arguments)
        if new is None:
            return Diverged()
        if not first and not new:
            return None
        return Called(msgspec.structs.replace(event, arguments=new), first)
