"""The arq worker: its settings, the job function (glue around ``ChatRunner``), and a graceful stop."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from arq import Worker
from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix as IN_PROGRESS
from arq.constants import job_key_prefix as JOB
from arq.worker import func
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streambridge.shared import keys
from streambridge.shared.redis import pack_with_hiredis
from streambridge.shared.settings import Settings
from streambridge.workers.lease import Lease
from streambridge.workers.llm import make_client
from streambridge.workers.reaper import listen_for_cancels, reap_forever
from streambridge.workers.runner import ChatRunner, Stop

log = logging.getLogger("streambridge.worker")

#: A chat's job may run this long; its own timeouts (first token, idle) end stalls far sooner.
JOB_TIMEOUT = 3600
#: seconds between two of arq's scans of the queue, in a long-running worker
FULL_POLL = 0.5


#: how long a wake-up listener blocks at a time; it looks again whether it may take chats after it
WAKE_WAIT = 0.5


class ChatWorker(Worker):
    """arq's worker, with two changes.

    It starts a chat the moment it is enqueued: the API pushes the job id on ``keys.wake()``, and
    a task of the worker's own blocks on that list (BLPOP) all the while, never held up by arq's
    scan. It starts what it pops in one round trip, one Lua call a chat (:data:`workers.lease.START`):
    arq's in-progress mark, so that arq's scan skips the job, and the lease's claim, which makes the
    run exclusive. arq stays the durable record: its scan of the queue (a round trip per queued or
    running job, hence only every ``poll_delay`` s) starts whatever no wake token reached. And it
    rides out a Redis outage: both retry with backoff, never exit.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.direct: set[asyncio.Task[None]] = set()
        self._waker: asyncio.Task[None] | None = None
        self._outage_delay = 0.0

    async def main(self) -> None:
        try:
            await super().main()
        finally:
            if self._waker is not None:
                self._waker.cancel()
                await asyncio.gather(self._waker, return_exceptions=True)

    async def _poll_iteration(self) -> None:
        if self._waker is None and not self.burst:  # the first iteration comes after on_startup
            self._waker = asyncio.create_task(self._wake_forever(), name="wake")
        try:
            await super()._poll_iteration()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self._outage_delay = await _back_off("polling", exc, self._outage_delay)
        else:
            self._outage_delay = 0.0

    async def _wake_forever(self) -> None:
        delay = 0.0
        while True:
            try:
                await self._wake_once()
            except Exception as exc:  # an outage, or a refusal (OOM, READONLY after a failover): wait
                delay = await _back_off("waiting for chats", exc, delay)
            else:
                delay = 0.0

    async def stop_waking(self) -> None:
        """No more woken chats start here (the worker is stopping)."""
        self.allow_pick_jobs = False
        if self._waker is not None:
            self._waker.cancel()
            await asyncio.gather(self._waker, return_exceptions=True)

    def _stopping(self) -> bool:
        return not self.allow_pick_jobs

    async def _wake_once(self) -> None:
        if self.job_counter >= self.max_jobs or not self.allow_pick_jobs:
            await asyncio.sleep(0.01)  # full, or stopping: leave the wake list to other workers
            return
        popped = await self.pool.blpop([keys.wake()], timeout=WAKE_WAIT)  # type: ignore[arg-type,misc]
        if popped and self._stopping():  # it began stopping meanwhile: that chat is another worker's
            await self.pool.lpush(keys.wake(), popped[1])  # type: ignore[misc]
        elif popped:
            more = await self._start_direct([popped[1].decode()], pop=self.max_jobs - self.job_counter - 1)
            if more:
                await self._start_direct([job_id.decode() for job_id in more])

    async def _start_direct(self, job_ids: list[str], pop: int = 0) -> list[bytes]:
        """Starts the woken jobs no other worker has, in one round trip however many woke.

        With ``pop``, the same round trip takes up to that many more woken ids off the list and
        returns them: a chat that woke alone (the usual case) starts without a round trip spent
        looking for others.
        """
        runner: ChatRunner = self.ctx["runner"]
        leases = [runner.lease(job_id.split(":", 1)[0]) for job_id in job_ids]
        mark_ms = int(self.in_progress_timeout_s * 1000)
        async with self.pool.pipeline(transaction=False) as pipe:
            if pop > 0:
                pipe.lpop(keys.wake(), pop)
            for job_id, lease in zip(job_ids, leases, strict=True):
                lease.start(pipe, job_id, IN_PROGRESS + job_id, self.queue_name, mark_ms)
            answers = await pipe.execute(raise_on_error=False)
        more = answers.pop(0) if pop > 0 else []
        for job_id, lease, answer in zip(job_ids, leases, answers, strict=True):
            if isinstance(answer, Exception):  # not started: arq's scan will find it queued
                log.warning("job %s: Redis refused its start (%s)", job_id, answer)
                continue
            claimed = lease.took(answer)
            if claimed in ("elsewhere", "finished"):
                continue  # running in another worker already, or ended before its wake-up came
            self.job_counter += 1
            task = asyncio.create_task(self._run_direct(job_id, lease, claimed))
            self.direct.add(task)
            task.add_done_callback(self.direct.discard)
        return more if isinstance(more, list) else []

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's scan, less the jobs that already run: the queue holds a job until it ends, and arq
        checks each one with a WATCH/MULTI of its own, so a scan during a burst of 50 running
        chats cost 200 round trips per worker. One pipelined EXISTS each leaves only the rest."""
        if not job_ids:
            return
        async with self.pool.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(IN_PROGRESS + job_id.decode())
            running = await pipe.execute()
        await super().start_jobs([job_id for job_id, busy in zip(job_ids, running, strict=True) if not busy])

    async def _run_direct(self, job_id: str, lease: Lease, claimed: str) -> None:
        runner: ChatRunner = self.ctx["runner"]
        outcome: str | None = None
        try:
            outcome = await runner.run_claimed(lease, claimed)
        except asyncio.CancelledError:
            outcome = "handed_back"
        except Exception:
            log.exception("job %s: chat run failed; arq's scan will retry it", job_id)
        finally:
            self.job_counter -= 1
            async with self.pool.pipeline(transaction=False) as pipe:
                if outcome not in (None, "handed_back"):  # done with: retire arq's record of it
                    pipe.zrem(self.queue_name, job_id)
                    pipe.delete(JOB + job_id)
                pipe.delete(IN_PROGRESS + job_id)
                await asyncio.shield(pipe.execute())


async def _back_off(doing: str, exc: BaseException, delay: float) -> float:
    """Waits out a Redis outage, a little longer each time; returns the delay it waited."""
    delay = min(max(delay * 2, 0.1), 2.0)
    log.warning("Redis unreachable while %s (%s); trying again in %.1f s", doing, exc, delay)
    await asyncio.sleep(delay)
    return delay


async def run_chat(ctx: dict[str, Any], chat_id: str) -> str:
    runner: ChatRunner = ctx["runner"]
    return await runner.run(chat_id, enqueued_at=ctx["enqueue_time"].timestamp())


def make_worker(
    settings: Settings, llm_base_url: str, *, burst: bool = False, poll_delay: float | None = None
) -> Worker:
    """A worker for ``settings``; run ``await worker.main()``, then ``stop_worker``.

    ``poll_delay`` spaces arq's scans of the queue: by default 0.5 s for a long-running worker
    (woken chats start at once regardless), none for a burst worker (it exits once it is empty).
    """
    assert settings.redis_url is not None, "the CLI resolves the embedded Redis first"

    async def startup(ctx: dict[str, Any]) -> None:
        await pack_with_hiredis(ctx["redis"])
        llm = make_client(llm_base_url, settings.llm_api_key)
        runner = ChatRunner(ctx["redis"], llm, settings)
        ctx["llm"], ctx["runner"] = llm, runner
        ctx["background"] = [
            asyncio.create_task(reap_forever(ctx["redis"], settings.lease_ttl / 6), name="reaper"),
            asyncio.create_task(listen_for_cancels(ctx["redis"], runner), name="cancels"),
        ]

    async def shutdown(ctx: dict[str, Any]) -> None:
        for task in ctx.get("background", []):
            task.cancel()
        await asyncio.gather(*ctx.get("background", []), return_exceptions=True)
        if "runner" in ctx:
            await ctx["runner"].appender.close()
        if "llm" in ctx:
            await ctx["llm"].close()

    return ChatWorker(
        functions=[func(run_chat, name="run_chat", max_tries=1000)],
        queue_name=keys.QUEUE_NAME,
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        on_startup=startup,
        on_shutdown=shutdown,
        burst=burst,
        poll_delay=(0 if burst else FULL_POLL) if poll_delay is None else poll_delay,
        max_jobs=settings.worker_concurrency,
        job_timeout=JOB_TIMEOUT,
        keep_result=60,
        handle_signals=False,
    )


async def stop_worker(worker: Worker, main: asyncio.Task[None], grace: float) -> None:
    """Stop taking chats, let running ones finish for ``grace`` seconds, hand the rest back at once."""
    worker.allow_pick_jobs = False
    if isinstance(worker, ChatWorker):
        await worker.stop_waking()  # before the running chats are counted: it starts none after
    runner: ChatRunner | None = worker.ctx.get("runner")
    if runner is not None and runner.active:
        await asyncio.wait([a.task for a in runner.active.values()], timeout=grace)
        for chat_id in list(runner.active):
            runner.stop(chat_id, Stop.HANDBACK)
        if runner.active:
            await asyncio.wait([a.task for a in runner.active.values()], timeout=5)
    main.cancel()
    direct = worker.direct if isinstance(worker, ChatWorker) else set()
    await asyncio.gather(main, *worker.tasks.values(), *direct, return_exceptions=True)
    worker.tasks.clear()  # settled above; arq's close() would re-raise a handed-back job's cancellation
    await worker.close()
