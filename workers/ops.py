"""A worker's own HTTP port: ``GET /metrics`` (Prometheus) and ``GET /readyz``.

Ready once arq's startup is done (the chat runner exists) and while the worker takes chats and
its loop runs and its batch lane (if any) is up, with Redis answering a PING; 503 otherwise
(starting, stopping, Redis gone, the lane dead and not yet started again).
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from redis.asyncio import Redis

from streambridge.shared import metrics
from streambridge.shared.redis import one_connection_like
from streambridge.workers.worker import ChatWorker

WORKER = web.AppKey("worker", ChatWorker)


class Main:
    """The task that runs ``worker.main()``: none yet while the port is bound before it starts."""

    def __init__(self, task: asyncio.Task[None] | None) -> None:
        self.task = task


MAIN = web.AppKey("main", Main)


class Checks:
    """The checks' own Redis connection (``/readyz``, the queue depths): never behind the worker's pool."""

    def __init__(self) -> None:
        self.redis: Redis | None = None

    def of(self, worker: ChatWorker) -> Redis:
        if self.redis is None:
            self.redis = one_connection_like(worker.pool)
        return self.redis


CHECKS = web.AppKey("checks", Checks)


async def _close_checks(app: web.Application) -> None:
    redis, app[CHECKS].redis = app[CHECKS].redis, None
    if redis is not None:
        await redis.aclose(close_connection_pool=True)


routes = web.RouteTableDef()


@routes.get("/metrics")
async def metrics_page(request: web.Request) -> web.Response:
    return await metrics.metrics_response(request.app[CHECKS].of(request.app[WORKER]))


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    worker, main = request.app[WORKER], request.app[MAIN].task
    if main is not None and main.done():
        problem: str | None = "the worker's loop has ended"
    elif main is None or "runner" not in worker.ctx:
        problem = "starting"
    elif not worker.allow_pick_jobs:
        problem = "stopping: it takes no more chats"
    elif worker.lane is not None and not worker.lane.alive:
        problem = "its batch lane is down (starting again)"
    else:
        problem = None
    return await metrics.readiness_response(request.app[CHECKS].of(worker), problem)


def make_worker_app(worker: ChatWorker, main: asyncio.Task[None] | None = None) -> web.Application:
    """The worker's metrics app, for ``main``, the task that runs ``worker.main()`` (or, if not
    started yet, given later with :func:`started`)."""
    app = web.Application()
    app[WORKER], app[MAIN], app[CHECKS] = worker, Main(main), Checks()
    app.add_routes(routes)
    app.on_cleanup.append(_close_checks)
    return app


def started(app: web.Application, main: asyncio.Task[None]) -> None:
    """The worker's task has started: its ``/readyz`` follows it from now."""
    app[MAIN].task = main
