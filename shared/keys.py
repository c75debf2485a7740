"""Every Redis key streambridge uses, as a builder function.

The literal strings are a wire contract between api, edge and worker processes of
different versions: ``tests/unit/test_keys.py`` pins them.

A chat's own keys (:func:`chat`, :func:`events`, :func:`lease`, :func:`notify`) live on the
streams Redis (``STREAMBRIDGE_STREAMS_REDIS_URL``, which may be a Redis Cluster) and carry the
chat's id as a hash tag, ``{id}``: on a cluster they share one slot, so every script over them
runs on one node. Every other key is the control Redis's (``STREAMBRIDGE_REDIS_URL``).
"""

from __future__ import annotations

import hashlib

PREFIX = "sb:"

#: arq's queue; kept apart from arq's default so streambridge can share a Redis.
QUEUE_NAME = "sb:queue"


def queue() -> str:
    """Sorted set (arq's queue): the job id of every chat waiting for a worker, scored by when (ms)
    it was queued. Only waiting chats: a worker takes a chat's job off it as it starts the chat."""
    return QUEUE_NAME


def job(job_id: str) -> str:
    """String: arq's record of a queued job (its own key; ``shared.jobs`` holds arq's layout)."""
    return f"arq:job:{job_id}"


def chat(chat_id: str) -> str:
    """Hash: the chat's owner, request, status and final result."""
    return f"{PREFIX}chat:{{{chat_id}}}"


def events(chat_id: str) -> str:
    """Stream: the chat's events, one entry per event, fields ``type`` and ``data``."""
    return f"{PREFIX}chat:{{{chat_id}}}:events"


def notify(chat_id: str) -> str:
    """Pub/Sub channel: each appended entry, published atomically with its XADD (on a cluster, sharded
    Pub/Sub: SPUBLISH, to the chat's slot)."""
    return f"{PREFIX}chat:{{{chat_id}}}:notify"


def lease(chat_id: str) -> str:
    """Hash: the fencing token of the attempt allowed to append to the chat's stream (``token``), and
    the sequence number of its last batch (``seq``). It has no TTL: the attempt lives as long as its
    worker's heartbeat (:func:`workers`), and a reaper ends it (``shared.machine.REQUEUE``)."""
    return f"{PREFIX}chat:{{{chat_id}}}:lease"


def credential(credential_id: str) -> str:
    """String: a visitor's or API key's record (user, kind, limits, the secret's SHA-256), as JSON."""
    return f"{PREFIX}cred:{credential_id}"


def api_keys() -> str:
    """Set: the ids of every API key, for ``streambridge keys list``."""
    return f"{PREFIX}keys"


def active(user: str) -> str:
    """Sorted set: ``user``'s queued and running chats, scored by the time (ms) they must have ended."""
    return f"{PREFIX}active:{user}"


def user_streams(user: str) -> str:
    """Sorted set: ``user``'s open SSE streams on every edge, scored by when each lapses unless renewed."""
    return f"{PREFIX}streams:user:{user}"


def ip_streams(ip: str) -> str:
    """Sorted set: open SSE streams from one client address, scored as :func:`user_streams`."""
    return f"{PREFIX}streams:ip:{ip}"


def secret() -> str:
    """String: the generated signing secret, when ``STREAMBRIDGE_SECRET`` is unset."""
    return f"{PREFIX}secret"


def edges() -> str:
    """Pub/Sub channel every edge subscribes to first, so its hub connection is always live."""
    return f"{PREFIX}edges"


def cancels() -> str:
    """Pub/Sub channel: ids of running chats whose owner asked to cancel them."""
    return f"{PREFIX}cancels"


def workers() -> str:
    """Sorted set: the id of every worker that runs chats, scored by when (ms, Redis's clock) its
    heartbeat lapses unless renewed: one write per worker per beat, however many chats it runs."""
    return f"{PREFIX}workers"


def reaping(worker_id: str) -> str:
    """String: held (a few seconds) by the one process putting a worker's chats back on the queue."""
    return f"{PREFIX}reaping:{worker_id}"


def worker_chats(worker_id: str) -> str:
    """Hash: the chats a worker started or is starting, each with its attempt's lease token: when
    the worker's heartbeat lapses, a reaper puts each back on the queue."""
    return f"{PREFIX}worker:{worker_id}:chats"


def wake() -> str:
    """List: the job id of each enqueued chat, oldest first; idle workers block on it instead of polling."""
    return f"{PREFIX}wake"


def rate(user: str) -> str:
    """Counter: chats ``user`` created in the minute since its first; it expires with that minute
    (by Redis's clock, so no host's clock decides a window)."""
    return f"{PREFIX}rate:{user}"


def visitor_logins(ip: str) -> str:
    """Counter: visitor logins from one client address in the minute since its first, as :func:`rate`."""
    return f"{PREFIX}logins:{ip}"


def idempotency(user: str, key: str) -> str:
    """Hash: the chat ``user`` created with the ``Idempotency-Key`` ``key``, and its request's SHA-256."""
    return f"{PREFIX}idem:{user}:{hashlib.sha256(key.encode()).hexdigest()}"


def file(file_id: str) -> str:
    """Hash: a file's record (owner, purpose, filename, bytes, lines, created_at; an input's line errors)."""
    return f"{PREFIX}file:{file_id}"


def file_lines(file_id: str) -> str:
    """List: a file's lines, without their newlines, in order (an output file's grow as items finish)."""
    return f"{PREFIX}file:{file_id}:lines"


def file_items(file_id: str) -> str:
    """List: a batch input's lines as the workers run them (``shared.batches.Item``), parsed once at upload."""
    return f"{PREFIX}file:{file_id}:items"


def user_files(user: str) -> str:
    """Sorted set: ``user``'s files, scored by when (ms) each was created."""
    return f"{PREFIX}files:user:{user}"


def user_file_sizes(user: str) -> str:
    """Sorted set: ``user``'s stored files as ``file_id:bytes``, scored by when (ms) each expires:
    the file-bytes quota prunes what has expired from it (``api.files``)."""
    return f"{PREFIX}files:sizes:{user}"


def user_file_bytes(user: str) -> str:
    """Counter: the bytes of ``user``'s files in :func:`user_file_sizes`, summed."""
    return f"{PREFIX}files:bytes:{user}"


def batch(batch_id: str) -> str:
    """Hash: a batch's owner, status, counts, usage, timestamps and files."""
    return f"{PREFIX}batch:{batch_id}"


def batch_events(batch_id: str) -> str:
    """Stream: the batch's progress events (``shared.batches``), one entry per event, fields ``type`` and ``data``."""
    return f"{PREFIX}batch:{batch_id}:events"


def batch_leases(batch_id: str) -> str:
    """Sorted set: the batch's running items (line index), scored by when (ms) their lease lapses."""
    return f"{PREFIX}batch:{batch_id}:leases"


def batch_again(batch_id: str) -> str:
    """List: line indexes to run again (their worker died or handed them back), taken before new ones."""
    return f"{PREFIX}batch:{batch_id}:again"


def batch_done(batch_id: str) -> str:
    """Bitmap: bit N is set once line N has its one result line."""
    return f"{PREFIX}batch:{batch_id}:done"


def user_batches(user: str) -> str:
    """Sorted set: ``user``'s batches, scored by when (ms) each was created."""
    return f"{PREFIX}batches:user:{user}"


def user_batch_items(user: str) -> str:
    """Sorted set: ``user``'s running batch items (``batch_id:index``) across batches, scored by when
    (ms) their lease lapses: the per-user limit counts them."""
    return f"{PREFIX}batches:running:{user}"


def active_batches() -> str:
    """Sorted set: batches with items still to run or running, scored by when (ms) each was created."""
    return f"{PREFIX}batches:active"


def processes() -> str:
    """Sorted set: the id of every process that announces itself (api, edge, worker), scored by when
    (ms) its heartbeat lapses unless renewed (``shared.presence``)."""
    return f"{PREFIX}processes"


def process(process_id: str) -> str:
    """String: a live process's record (``shared.presence``), as JSON; it expires with its heartbeat."""
    return f"{PREFIX}process:{process_id}"
