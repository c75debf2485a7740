"""A deployment's state at a glance, read from Redis alone: what ``streambridge status`` shows.

Everything comes from keys every process already keeps, so one read sees every process of a
deployment, wherever it runs:

- chats waiting: arq's queue (``keys.queue``, waiting chats only); running: the leases in
  ``keys.running`` that have not lapsed (by Redis's clock), whichever worker holds them; orphaned:
  the lapsed ones, whose worker was lost and which no live worker's reaper has taken back yet;
- workers, API and edge processes: their heartbeats (``shared.presence``);
- chats started per minute: what each *live* worker started in the last 60 s, summed (a worker's
  heartbeat counts them in-process: no write per chat). Not a deployment-wide rate: a worker gone
  takes its count with it, a chat started again after a hand-back counts twice, batch items not at all;
- batches: each active batch's hash (its counts) and its item leases (``keys.batch_leases``):
  running are those that have not lapsed; items waiting are the rest that are neither done nor
  running, including orphaned ones (a lapsed lease: its worker was lost; a live worker's tick
  takes it back).

:func:`gather_snapshot` makes at most four round trips however large the deployment (``MAX_BATCHES``
bounds the batches read).
"""

from __future__ import annotations

from typing import Final

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

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
    #: items some live worker runs now (leases that have not lapsed)
    running: int
    #: items neither done nor running: the batch's part of the batch queue (orphaned ones included)
    waiting: int
    #: Unix seconds
    created_at: int
    expires_at: int
    #: items whose lease lapsed (their worker was lost), counted in ``waiting`` too
    orphaned: int = 0


class Snapshot(msgspec.Struct, kw_only=True):
    """One look at the deployment. ``at``: Redis's clock (Unix seconds) when it was taken."""

    at: float
    #: chats waiting for a worker, and chats running (deployment-wide; leases that have not lapsed)
    queued: int
    running: int
    #: batch items waiting to run (orphaned ones included), and running, across the active batches read
    batch_waiting: int
    batch_running: int
    #: chats started in the last 60 s by the workers alive now, summed (see the module's docstring)
    chats_per_minute: int
    workers: list[WorkerRecord]
    servers: list[ServerRecord]
    batches: list[BatchProgress]
    #: active batches beyond ``MAX_BATCHES``, not read: the batch sums then cover only those read
    batches_not_shown: int = 0
    #: chats whose lease lapsed (their worker was lost), not yet taken back by a live worker's reaper
    orphaned: int = 0
    #: batch items whose lease lapsed, across the batches read (counted in ``batch_waiting`` too)
    batch_orphaned: int = 0


_BATCH_FIELDS: Final = ("id", "owner", "status", "total", "completed", "failed", "created_at", "expires_at")


async def gather_snapshot(redis: Redis) -> Snapshot:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.zcard(keys.queue())
        pipe.zcard(keys.active_batches())
        pipe.zrange(keys.active_batches(), 0, MAX_BATCHES - 1)
        (seconds, micros), queued, active, batch_ids = await pipe.execute()
    now_ms = seconds * 1000 + micros // 1000
    records = await read_records(redis)
    workers = [r for r in records if isinstance(r, WorkerRecord)]
    (running, orphaned), batches = await _read_leases(redis, now_ms, [b.decode() for b in batch_ids])
    return Snapshot(
        at=seconds + micros / 1e6,
        queued=queued,
        running=running,
        orphaned=orphaned,
        batch_waiting=sum(b.waiting for b in batches),
        batch_running=sum(b.running for b in batches),
        batch_orphaned=sum(b.orphaned for b in batches),
        chats_per_minute=sum(w.chats_last_minute for w in workers),
        workers=workers,
        servers=[r for r in records if isinstance(r, ServerRecord)],
        batches=batches,
        batches_not_shown=max(0, active - len(batch_ids)),
    )


def _count_leases(pipe: Pipeline, key: str, now_ms: int) -> None:
    """Two answers: the leases of ``key`` that hold at ``now_ms`` (Redis's clock), and those that lapsed."""
    pipe.zcount(key, f"({now_ms}", "+inf")
    pipe.zcount(key, "-inf", now_ms)


async def _read_leases(redis: Redis, now_ms: int, batch_ids: list[str]) -> tuple[tuple[int, int], list[BatchProgress]]:
    """Chats running (listed by a live worker) and orphaned (by a dead one, not yet reaped), and
    each batch's progress: two round trips."""
    chat_workers: list[tuple[bytes, float]] = await redis.zrange(keys.workers(), 0, -1, withscores=True)
    async with redis.pipeline(transaction=False) as pipe:
        for worker_id, _ in chat_workers:
            pipe.hlen(keys.worker_chats(worker_id.decode()))
        for batch_id in batch_ids:
            pipe.hmget(keys.batch(batch_id), list(_BATCH_FIELDS))
            _count_leases(pipe, keys.batch_leases(batch_id), now_ms)
        answers = await pipe.execute()
    listed, answers = answers[: len(chat_workers)], answers[len(chat_workers) :]
    running = sum(n for n, (_, due) in zip(listed, chat_workers, strict=True) if due > now_ms)
    orphaned = sum(n for n, (_, due) in zip(listed, chat_workers, strict=True) if due <= now_ms)
    batches = []
    for fields, leased, lapsed in zip(answers[::3], answers[1::3], answers[2::3], strict=True):
        if fields[0] is None:  # gone (expired) since the index was read
            continue
        b = dict(zip(_BATCH_FIELDS, (f.decode() if f is not None else "" for f in fields), strict=True))
        total, completed, failed = _int(b["total"]), _int(b["completed"]), _int(b["failed"])
        in_progress = b["status"] == "in_progress"
        batches.append(
            BatchProgress(
                id=b["id"],
                owner=b["owner"],
                status=b["status"],
                total=total,
                completed=completed,
                failed=failed,
                running=leased,
                orphaned=lapsed,
                waiting=max(0, total - completed - failed - leased) if in_progress else 0,
                created_at=_int(b["created_at"]),
                expires_at=_int(b["expires_at"]),
            )
        )
    return (running, orphaned), batches


def _int(value: str) -> int:
    return int(value) if value.lstrip("-").isdigit() else 0
