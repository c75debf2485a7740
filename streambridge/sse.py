"""An incremental Server-Sent Events parser, as the WHATWG EventSource spec reads a stream.

Bytes may be split anywhere: inside a UTF-8 character, between ``\\r`` and ``\\n``. Lines end
in ``\\n``, ``\\r\\n`` or ``\\r``; a blank line dispatches the event being built; an event
still open when the stream ends is discarded, as the spec says.
"""

from __future__ import annotations

import codecs
import re
from typing import Final, NamedTuple

_EOL: Final = re.compile(r"\r\n|\r|\n")


class SSEMessage(NamedTuple):
    id: str | None
    """The last event id the stream set (it carries over to later events), or ``None``."""
    event: str
    data: str


class SSEParser:
    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False
        self._skip_lf = False
        self._partial = ""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self.retry: int | None = None
        """The reconnection time in ms the server asked for, if it did."""

    def feed(self, chunk: bytes) -> list[SSEMessage]:
        text = self._decoder.decode(chunk)
        if not text:
            return []
        if not self._started:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._skip_lf:
            self._skip_lf = False
            text = text.removeprefix("\n")
        # A "\r" that ends the chunk ends a line; a "\n" that may follow it belongs to it.
        self._skip_lf = text.endswith("\r")
        *lines, rest = _EOL.split(text)
        if not lines:
            self._partial += rest
            return []
        lines[0] = self._partial + lines[0]
        self._partial = rest
        messages = []
        for line in lines:
            message = self._line(line)
            if message is not None:
                messages.append(message)
        return messages

    def _line(self, line: str) -> SSEMessage | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> SSEMessage | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return SSEMessage(self._id, event or "message", "\n".join(data))
