"""The arq worker: its settings and the job function, which is glue around ``ChatRunner``."""

from __future__ import annotations

from typing import Any

from arq import Worker
from arq.connections import RedisSettings
from arq.worker import func

from shared import keys
from shared.settings import Settings
from workers.llm import make_client
from workers.runner import ChatRunner

#: A chat's job may run this long; its own timeouts (first token, idle) end stalls far sooner.
JOB_TIMEOUT = 3600


async def run_chat(ctx: dict[str, Any], chat_id: str) -> str:
    runner: ChatRunner = ctx["runner"]
    return await runner.run(chat_id)


def make_worker(settings: Settings, llm_base_url: str, *, burst: bool = False, poll_delay: float = 0.05) -> Worker:
    """A worker for ``settings``; the caller runs ``await worker.main()`` and ``worker.close()``."""
    assert settings.redis_url is not None, "the CLI resolves the embedded Redis first"

    async def startup(ctx: dict[str, Any]) -> None:
        llm = make_client(llm_base_url, settings.llm_api_key)
        ctx["llm"] = llm
        ctx["runner"] = ChatRunner(ctx["redis"], llm, settings)

    async def shutdown(ctx: dict[str, Any]) -> None:
        if "llm" in ctx:
            await ctx["llm"].close()

    return Worker(
        functions=[func(run_chat, name="run_chat", max_tries=3)],
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
