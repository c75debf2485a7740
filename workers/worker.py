"""The arq worker: its settings, the job function (glue around ``ChatRunner``), and a graceful stop."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from arq import Worker
from arq.connections import RedisSettings
from arq.worker import func
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import keys
from shared.settings import Settings
from workers.llm import make_client
from workers.reaper import listen_for_cancels, reap_forever
from workers.runner import ChatRunner, Stop

log = logging.getLogger("streambridge.worker")

#: A chat's job may run this long; its own timeouts (first token, idle) end stalls far sooner.
JOB_TIMEOUT = 3600


class ChatWorker(Worker):
    """arq's worker, with two changes.

    It starts a chat the moment it is enqueued: the API pushes the job id on ``keys.wake()``, and
    an idle worker blocks on that list (BLPOP) and starts exactly that job. arq's own scan of the
    queue, which costs a round trip per queued or running job, runs only every ``full_poll`` s
    as the fallback. And it rides out a Redis outage: it polls again with backoff, never exits.
    """

    full_poll = 0.5
    _outage_delay = 0.0
    _next_full_poll = 0.0

    async def _poll_iteration(self) -> None:
        try:
            if self.burst:
                await super()._poll_iteration()
            else:
                await self._wake_or_poll()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self._outage_delay = min(max(self._outage_delay * 2, 0.1), 2.0)
            log.warning("Redis unreachable (%s); polling again in %.1f s", exc, self._outage_delay)
            await asyncio.sleep(self._outage_delay)
        else:
            self._outage_delay = 0.0

    async def _wake_or_poll(self) -> None:
        now = asyncio.get_running_loop().time()
        if now >= self._next_full_poll:
            self._next_full_poll = now + self.full_poll
            await super()._poll_iteration()
        if self.job_counter >= self.max_jobs:
            await asyncio.sleep(0.01)  # full: leave the wake list to workers with room
            return
        wait = max(self._next_full_poll - asyncio.get_running_loop().time(), 0.01)
        popped = await self.pool.blpop([keys.wake()], timeout=wait)  # type: ignore[arg-type,misc]
        if popped:
            room = self.max_jobs - self.job_counter
            more = await self.pool.lpop(keys.wake(), room - 1) if room > 1 else None  # type: ignore[misc]
            await self.start_jobs([popped[1], *(more or [])])


async def run_chat(ctx: dict[str, Any], chat_id: str) -> str:
    runner: ChatRunner = ctx["runner"]
    return await runner.run(chat_id, enqueued_at=ctx["enqueue_time"].timestamp())


def make_worker(settings: Settings, llm_base_url: str, *, burst: bool = False, poll_delay: float = 0) -> Worker:
    """A worker for ``settings``; run ``await worker.main()``, then ``stop_worker``."""
    assert settings.redis_url is not None, "the CLI resolves the embedded Redis first"

    async def startup(ctx: dict[str, Any]) -> None:
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
        if "llm" in ctx:
            await ctx["llm"].close()

    return ChatWorker(
        functions=[func(run_chat, name="run_chat", max_tries=1000)],
        queue_name=keys.QUEUE_NAME,
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        on_startup=startup,
        on_shutdown=shutdown,
        burst=burst,
        poll_delay=poll_delay,
        max_jobs=settings.worker_concurrency,
        job_timeout=JOB_TIMEOUT,
        keep_result=60,
        handle_signals=False,
    )


async def stop_worker(worker: Worker, main: asyncio.Task[None], grace: float) -> None:
    """Stop taking chats, let running ones finish for ``grace`` seconds, hand the rest back at once."""
    worker.allow_pick_jobs = False
    runner: ChatRunner | None = worker.ctx.get("runner")
    if runner is not None and runner.active:
        await asyncio.wait([a.task for a in runner.active.values()], timeout=grace)
        for chat_id in list(runner.active):
            runner.stop(chat_id, Stop.HANDBACK)
        if runner.active:
            await asyncio.wait([a.task for a in runner.active.values()], timeout=5)
    main.cancel()
    await asyncio.gather(main, *worker.tasks.values(), return_exceptions=True)
    worker.tasks.clear()  # settled above; arq's close() would re-raise a handed-back job's cancellation
    await worker.close()
