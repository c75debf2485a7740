"""Everything streambridge knows of arq's internals, in one place.

streambridge keeps arq's queue layout, so that arq's own tools see the chats waiting: a job
record under arq's key in arq's format, and arq's queue (a sorted set of job ids scored by when
they were queued). It starts jobs itself, though (``shared.machine.START``, one atomic call that
takes the job off the queue and claims the chat's lease), so of arq's ``Worker`` it keeps the main
loop, the startup and shutdown hooks and the health record, and replaces two private pieces: the
scan of the queue (``_poll_iteration``) and the start of a job (``start_jobs``).

``tests/unit/test_arq_canary.py`` pins what this module relies on, for the arq versions named in
:data:`ARQ_VERSIONS`: an arq upgrade that changes any of it fails there, loudly, in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

from arq.connections import ArqRedis
from arq.constants import expires_extra_ms, job_key_prefix
from arq.jobs import serialize_job
from arq.typing import StartupShutdown
from arq.utils import timestamp_ms
from arq.worker import Worker, func
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streambridge.shared import keys, metrics

log = logging.getLogger("streambridge.worker")

#: the arq releases whose internals this module was written against
ARQ_VERSIONS: Final = ("0.28",)
#: the function a chat's job names; arq never calls it (see :class:`QueueWorker`)
JOB_FUNCTION: Final = "run_chat"
#: how long a job record lives unless its chat starts first (arq's own default)
JOB_EXPIRES_MS: Final = expires_extra_ms

assert keys.job("") == job_key_prefix, "shared.keys.job must build arq's job key"


def job_record(chat_id: str) -> bytes:
    """The chat's job record, as ``ArqRedis.enqueue_job(JOB_FUNCTION, chat_id)`` would write it now."""
    return serialize_job(JOB_FUNCTION, (chat_id,), {}, None, timestamp_ms())


async def _never_run(ctx: dict[str, Any], chat_id: str) -> None:
    raise AssertionError("streambridge starts chats itself; arq's run_job is never used")


class QueueWorker(Worker):
    """arq's worker, whose jobs a subclass starts in :meth:`start`.

    Its scan reads the oldest jobs in the queue, as many as it has room for (the queue holds only
    waiting chats, and none is ever deferred, so no clock is read), and hands them to
    :meth:`start`. A subclass tracks each chat it runs with :meth:`track`; ``busy`` counts them.
    A Redis outage during a scan is waited out with backoff: arq's loop would end on it.
    """

    def __init__(
        self,
        *,
        pool: ArqRedis,
        concurrency: int,
        burst: bool,
        poll_delay: float,
        on_startup: StartupShutdown | None = None,
        on_shutdown: StartupShutdown | None = None,
    ) -> None:
        pool.default_queue_name = keys.queue()
        super().__init__(
            functions=[func(_never_run, name=JOB_FUNCTION)],
            queue_name=keys.queue(),
            redis_pool=pool,
            burst=burst,
            poll_delay=poll_delay,
            max_jobs=concurrency,
            on_startup=on_startup,
            on_shutdown=on_shutdown,
            handle_signals=False,
        )
        self.busy = 0
        self.chats_started = 0  # chats started since the worker began (its heartbeat reports the rate)
        self.reserved = 0  # slots held for starts in flight (:meth:`reserve`)
        self._began = False
        self._outage_delay = 0.0

    async def start(self, job_ids: list[str]) -> None:
        """Start these jobs, oldest first (each may have been started elsewhere meanwhile)."""
        raise NotImplementedError

    async def began(self) -> None:
        """Called once, before the first scan: startup is done and ``ctx`` is filled in."""

    def reserve(self, want: int) -> int:
        """Up to ``want`` free slots, held for starts about to be sent (give them back with
        :meth:`unreserve` once the answers are in and the started chats tracked): the scan and
        a subclass's own starts share the slots, so together they never start more than ``max_jobs``."""
        n = max(0, min(want, self.max_jobs - self.busy - self.reserved))
        self.reserved += n
        return n

    def unreserve(self, n: int) -> None:
        self.reserved -= n

    def track(self, job_id: str, task: asyncio.Task[None]) -> None:
        """Counts a running chat while its task runs; arq's burst mode and ``close`` wait for it."""
        self.busy += 1
        self.chats_started += 1
        self.tasks[job_id] = task
        task.add_done_callback(self._untrack)

    def _untrack(self, task: asyncio.Task[None]) -> None:
        self.busy -= 1

    async def _poll_iteration(self) -> None:  # arq's scan, replaced
        if not self._began:
            self._began = True
            await self.began()
        free = self.reserve(self.max_jobs) if self.allow_pick_jobs else 0
        try:
            try:
                if free > 0:
                    waiting = await self.pool.zrange(self.queue_name, 0, free - 1)
                    if waiting:
                        await self.start([job_id.decode() for job_id in waiting])
            finally:
                self.unreserve(free)
            await self.heart_beat()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self._outage_delay = await back_off("scanning the queue", exc, self._outage_delay)
        else:
            self._outage_delay = 0.0
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]

    async def start_jobs(self, job_ids: list[bytes]) -> None:  # arq's start of a job: never used
        raise AssertionError("QueueWorker starts jobs in start()")

    async def close(self) -> None:
        """arq's ``close`` without its waits: the chats' tasks were settled by their owner, and a
        frozen Redis must not hold the process (the health record lapses by itself)."""
        if self._pool is None:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                await self.pool.delete(self.health_check_key)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        await self.pool.aclose(close_connection_pool=True)  # closes sockets: no round trip
        self._pool = None


async def back_off(doing: str, exc: BaseException, delay: float) -> float:
    """Waits out a Redis outage, a little longer each time; returns the delay it waited."""
    delay = min(max(delay * 2, 0.1), 2.0)
    metrics.REDIS_ERRORS_WORKER.inc()
    log.warning("Redis unreachable while %s (%s); trying again in %.1f s", doing, exc, delay)
    await asyncio.sleep(delay)
    return delay
