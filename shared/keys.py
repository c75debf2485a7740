"""Every Redis key streambridge uses, as a builder function.

The literal strings are a wire contract between api, edge and worker processes of
different versions: ``tests/unit/test_keys.py`` pins them.
"""

from __future__ import annotations

PREFIX = "sb:"

#: arq's queue; kept apart from arq's default so streambridge can share a Redis.
QUEUE_NAME = "sb:queue"


def chat(chat_id: str) -> str:
    """Hash: the chat's owner, request, status and final result."""
    return f"{PREFIX}chat:{chat_id}"


def events(chat_id: str) -> str:
    """Stream: the chat's events, one entry per event, fields ``type`` and ``data``."""
    return f"{PREFIX}chat:{chat_id}:events"


def notify(chat_id: str) -> str:
    """Pub/Sub channel: each appended entry, published atomically with its XADD."""
    return f"{PREFIX}chat:{chat_id}:notify"


def lease(chat_id: str) -> str:
    """String: the fencing token of the attempt allowed to append to the chat's stream."""
    return f"{PREFIX}chat:{chat_id}:lease"


def token(token_hash: str) -> str:
    """String: a visitor token's user, stored under the token's SHA-256 only."""
    return f"{PREFIX}token:{token_hash}"


def secret() -> str:
    """String: the generated signing secret, when ``STREAMBRIDGE_SECRET`` is unset."""
    return f"{PREFIX}secret"


def edges() -> str:
    """Pub/Sub channel every edge subscribes to first, so its hub connection is always live."""
    return f"{PREFIX}edges"


def cancels() -> str:
    """Pub/Sub channel: ids of running chats whose owner asked to cancel them."""
    return f"{PREFIX}cancels"


def running() -> str:
    """Sorted set: running chats, scored by the time (ms) their lease lapses unless renewed."""
    return f"{PREFIX}running"


def wake() -> str:
    """List: the job id of each enqueued chat; idle workers block on it instead of polling."""
    return f"{PREFIX}wake"


def rate(user: str, window: int) -> str:
    """Counter: chats ``user`` created in the minute numbered ``window`` (expires with it)."""
    return f"{PREFIX}rate:{user}:{window}"
