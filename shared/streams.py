"""How an event sits in a Redis Stream entry and in the notification that announces it.

An entry has two fields, ``type`` and ``data`` (the event's JSON), so the edge can write
SSE without decoding. The worker publishes ``"<id>\\n<type>\\n<data>"`` on the chat's
channel in the same Lua call as the XADD, so notifications arrive in stream order; a batch of
entries appended together is one notification, their three lines each one after another. A
``data`` holds no newline: it is compact JSON, as the SSE ``data:`` line it becomes must be.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

ENTRY_ID: Final = re.compile(r"\A[0-9]{1,20}-[0-9]{1,20}\Z")
U64: Final = 2**64


class Entry(NamedTuple):
    id: str
    type: str
    data: bytes


def entry_from_fields(entry_id: bytes | str, fields: dict[bytes, bytes]) -> Entry:
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return Entry(eid, fields[b"type"].decode(), fields[b"data"])


def parse_notification(payload: bytes) -> list[Entry]:
    """The entries one notification announces, in stream order."""
    lines = payload.split(b"\n")
    if len(lines) % 3:
        raise ValueError(f"a notification holds whole entries, three lines each; this one has {len(lines)}")
    return [Entry(lines[n].decode(), lines[n + 1].decode(), lines[n + 2]) for n in range(0, len(lines), 3)]


def id_key(entry_id: str) -> tuple[int, int]:
    """A sortable form of a stream id: ``"12-3"`` → ``(12, 3)``."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


def is_entry_id(value: str) -> bool:
    """A well-formed stream id: ASCII digits, both parts within Redis's unsigned 64 bits."""
    if ENTRY_ID.match(value) is None:
        return False
    ms, seq = id_key(value)
    return ms < U64 and seq < U64
