"""A worker's own HTTP port: ``GET /metrics`` (Prometheus) and ``GET /readyz``.

Ready once arq's startup is done (the chat runner exists) and while the worker takes chats and
its loop runs and its batch lane (if any) is up, with Redis answering a PING; 503 otherwise
(starting, stopping, Redis gone, the lane dead and not yet started again).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from streambridge.shared import metrics
from streambridge.workers.worker import ChatWorker

WORKER = web.AppKey("worker", ChatWorker)
MAIN = web.AppKey("main", asyncio.Task[None])

routes = web.RouteTableDef()


@routes.get("/metrics")
async def metrics_page(request: web.Request) -> web.Response:
    return await metrics.metrics_response(request.app[WORKER].pool)


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    worker, main = request.app[WORKER], request.app[MAIN]
    if main.done():
        problem: str | None = "the worker's loop has ended"
    elif "runner" not in worker.ctx:
        problem = "starting"
    elif not worker.allow_pick_jobs:
        problem = "stopping: it takes no more chats"
    elif worker.lane is not None and not worker.lane.alive:
        problem = "its batch lane is down (starting again)"
    else:
        problem = None
    return await metrics.readiness_response(worker.pool, problem)


def make_worker_app(worker: ChatWorker, main: asyncio.Task[None]) -> web.Application:
    """The worker's metrics app, for ``main``, the task that runs ``worker.main()``."""
    app = web.Application()
    app[WORKER], app[MAIN] = worker, main
    app.add_routes(routes)
    return app
