"""The SSE wire format, as pure functions (tested byte for byte)."""

from __future__ import annotations

from typing import Final

from streambridge.shared.streams import Entry

PING: Final = b": ping\n\n"

HEADERS: Final = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def encode_entry(entry: Entry) -> bytes:
    """``id``/``event``/``data`` lines; ``data`` is the event's one-line JSON as stored."""
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (entry.id.encode(), entry.type.encode(), entry.data)
