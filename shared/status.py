"""A deployment's state at a glance, read from Redis alone: what ``streambridge status`` shows.

Everything comes from keys every process already keeps, so one read sees every process of a
deployment, wherever it runs:

- chats waiting: arq's queue (``keys.queue``, waiting chats only); running: ``keys.running``
  (every running chat's lease, whichever worker holds it);
- workers, API and edge processes: their heartbeats (``shared.presence``);
- chats per minute: the chats each live worker started in the last 60 s, summed (a worker's
  heartbeat counts them in-process: no write per chat);
- batches: each active batch's hash (its counts) and its running items (``keys.batch_leases``);
  items waiting are the rest: neither done nor running.

:func:`gather_snapshot` makes at most four round trips however large the deployment (``MAX_BATCHES``
bounds the batches read).
"""

from __future__ import annotations

from typing import Final

import msgspec
from redis.asyncio import Redis

from streambridge.shared import keys
from streambridge.shared.presence import ServerRecord, WorkerRecord, read_records

#: active batches read, oldest first; the rest are counted but not shown
MAX_BATCHES: Final = 100


class BatchProgress(msgspec.Struct, kw_only=True):
    id: str
    owner: str
    status: str
    total: int
    completed: int
    failed: int
    #: items some worker runs now
    running: int
    #: items neither done nor running: the batch's part of the batch queue
    waiting: int
    #: Unix seconds
    created_at: int
    expires_at: int


class Snapshot(msgspec.Struct, kw_only=True):
    """One look at the deployment. ``at``: Redis's clock (Unix seconds) when it was taken."""

    at: float
    #: chats waiting for a worker, and chats running (deployment-wide)
    queued: int
    running: int
    #: batch items waiting to run, and running, across the active batches read
    batch_waiting: int
    batch_running: int
    #: chats started in the last 60 s, summed over the live workers
    chats_per_minute: int
    workers: list[WorkerRecord]
    servers: list[ServerRecord]
    batches: list[BatchProgress]
    #: active batches beyond ``MAX_BATCHES``, not read
    batches_not_shown: int = 0


_BATCH_FIELDS: Final = ("id", "owner", "status", "total", "completed", "failed", "created_at", "expires_at")


async def gather_snapshot(redis: Redis) -> Snapshot:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.zcard(keys.queue())
        pipe.zcard(keys.running())
        pipe.zcard(keys.active_batches())
        pipe.zrange(keys.active_batches(), 0, MAX_BATCHES - 1)
        (seconds, micros), queued, running, active, batch_ids = await pipe.execute()
    records = await read_records(redis)
    workers = [r for r in records if isinstance(r, WorkerRecord)]
    batches = await _read_batches(redis, [b.decode() for b in batch_ids])
    return Snapshot(
        at=seconds + micros / 1e6,
        queued=queued,
        running=running,
        batch_waiting=sum(b.waiting for b in batches),
        batch_running=sum(b.running for b in batches),
        chats_per_minute=sum(w.chats_last_minute for w in workers),
        workers=workers,
        servers=[r for r in records if isinstance(r, ServerRecord)],
        batches=batches,
        batches_not_shown=max(0, active - len(batch_ids)),
    )


async def _read_batches(redis: Redis, batch_ids: list[str]) -> list[BatchProgress]:
    if not batch_ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for batch_id in batch_ids:
            pipe.hmget(keys.batch(batch_id), list(_BATCH_FIELDS))
            pipe.zcard(keys.batch_leases(batch_id))
        answers = await pipe.execute()
    batches = []
    for fields, running in zip(answers[::2], answers[1::2], strict=True):
        if fields[0] is None:  # gone (expired) since the index was read
            continue
        b = dict(zip(_BATCH_FIELDS, (f.decode() if f is not None else "" for f in fields), strict=True))
        total, completed, failed = _int(b["total"]), _int(b["completed"]), _int(b["failed"])
        batches.append(
            BatchProgress(
                id=b["id"],
                owner=b["owner"],
                status=b["status"],
                total=total,
                completed=completed,
                failed=failed,
                running=running,
                waiting=max(0, total - completed - failed - running) if b["status"] == "in_progress" else 0,
                created_at=_int(b["created_at"]),
                expires_at=_int(b["expires_at"]),
            )
        )
    return batches


def _int(value: str) -> int:
    return int(value) if value.lstrip("-").isdigit() else 0
