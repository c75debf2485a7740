"""How an event sits in a Redis Stream entry and in the notification that announces it.

An entry has two fields, ``type`` and ``data`` (the event's JSON), so the edge can write
SSE without decoding. The worker publishes ``"<id>\\n<type>\\n<data>"`` on the chat's
channel in the same Lua call as the XADD, so notifications arrive in stream order; a batch of
entries appended together is one notification, their three lines each one after another. A
``data`` holds no newline: it is compact JSON, as the SSE ``data:`` line it becomes must be.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import msgspec

from streambridge.shared.events import Started, decode_event

if TYPE_CHECKING:  # the client imports this module, and the client installs without redis
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

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


def successor(entry_id: str) -> tuple[int, int]:
    """The key of the smallest id after ``entry_id``: no entry can sit between the two."""
    ms, seq = id_key(entry_id)
    return (ms, seq + 1) if seq + 1 < U64 else (ms + 1, 0)


def trimmed(info: Mapping[str, Any] | None, last_id: str) -> bool:
    """Whether entries after ``last_id`` left the stream that ``info`` (XINFO STREAM) describes.

    Entries leave a chat's stream only by trimming, oldest first: a reader lost some when its
    position precedes the first entry held, with room for an entry between (the first held is
    not its successor), and something was removed. Redis 7 counts appends, so that is exact; its
    ``max-deleted-entry-id`` would not do, as trimming leaves it be. Redis 6.2 counts none: there
    a stream whose first entry cannot be a chat's first was trimmed, which errs towards a gap.
    A stream that does not exist says nothing here: its expiry is the caller's to tell.
    """
    first = info.get("first-entry") if info else None
    if info is None or not first or id_key(_text(first[0])) <= successor(last_id):
        return False
    added = info.get("entries-added")
    if added is not None:
        return bool(added > info["length"])
    return not _opens_a_chat(first[1])


async def trimmed_after(redis: Redis, key: str, last_id: str) -> bool:
    """:func:`trimmed`, for the stream at ``key`` as it is now."""
    return trimmed(await stream_info(redis, key), last_id)


async def stream_info(redis: Redis | RedisCluster, key: str) -> dict[str, Any] | None:
    """XINFO STREAM, or None when the stream does not exist."""
    from redis.exceptions import ResponseError  # the server extra: see the import above

    try:
        info: dict[str, Any] = await redis.xinfo_stream(key)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    return info


def begins_the_chat(entry: Entry) -> bool:
    """Whether ``entry`` is attempt 1's ``started``: nothing ever sat before it in the chat's
    stream, so a reader whose read begins with it has lost nothing. (A ``failed`` or ``cancelled``
    may open a stream too, but it also ends every other one: alone, it says nothing.)"""
    if entry.type != "started":
        return False
    try:
        event = decode_event(entry.data)
    except msgspec.DecodeError:  # not an event this version reads: Redis will say
        return False
    return isinstance(event, Started) and event.attempt == 1


def _opens_a_chat(fields: Mapping[bytes, bytes]) -> bool:
    """A chat's stream starts with attempt 1's ``started``, or a ``failed`` or ``cancelled``
    before any attempt (a chat past its deadline, or cancelled while queued)."""
    kind = fields.get(b"type")
    if kind == b"started":
        event = decode_event(fields[b"data"])
        return isinstance(event, Started) and event.attempt == 1
    return kind in (b"failed", b"cancelled")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
