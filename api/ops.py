"""Operations: ``GET /metrics`` (Prometheus) and ``GET /readyz`` (ready to serve), on the API and the
edge (``/healthz``, liveness, stays with the chats' routes)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiohttp import web
from redis.asyncio import Redis

from streambridge.api.context import CONTEXT
from streambridge.shared import metrics
from streambridge.shared.machine import Store
from streambridge.shared.redis import one_connection_like

log = logging.getLogger("streambridge.api")

routes = web.RouteTableDef()


@dataclass
class Readiness:
    """Whether the app serves: from the end of its startup until its shutdown begins."""

    serving: bool = False
    #: whether its ``/metrics`` reads the queue depths (the API's does; an edge's has no use for them)
    queue_depths: bool = True
    #: the checks' own Redis connection (``/readyz``, the queue depths): never behind the pool's queue
    checks: Redis | None = None

    def checks_for(self, redis: Redis) -> Redis:
        if self.checks is None:
            self.checks = one_connection_like(redis)
        return self.checks


async def close_checks(app: web.Application) -> None:
    checks = app[READINESS].checks
    if checks is not None:
        app[READINESS].checks = None
        await checks.aclose(close_connection_pool=True)


READINESS = web.AppKey("readiness", Readiness)


@routes.get("/metrics")
async def metrics_page(request: web.Request) -> web.Response:
    ctx, readiness = request.app.get(CONTEXT), request.app[READINESS]
    redis = readiness.checks_for(ctx.redis) if ctx is not None and readiness.queue_depths else None
    return await metrics.metrics_response(redis)


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    ctx, readiness = request.app.get(CONTEXT), request.app[READINESS]
    more: dict[str, str] = {}
    if ctx is not None and ctx.hub is not None:  # an edge: live entries come over its Pub/Sub feed
        more["feed"] = "ok" if ctx.hub.feed_connected() else "Pub/Sub feed disconnected (reconnecting)"
    if ctx is not None and ctx.streams is not ctx.redis:  # the chats' own keys are on another Redis
        more["streams_redis"] = await _answers(ctx.streams)
    return await metrics.readiness_response(
        readiness.checks_for(ctx.redis) if ctx is not None else None,
        None if readiness.serving else "not serving (starting or shutting down)",
        more,
    )


async def _answers(streams: Store) -> str:
    try:
        async with asyncio.timeout(metrics.READY_PING_TIMEOUT):
            await streams.ping()
    except Exception as exc:  # its type only, as for the control Redis: the text names hosts
        log.warning("readiness: the streams Redis is unreachable: %s: %s", type(exc).__name__, exc)
        return f"unreachable: {type(exc).__name__}"
    return "ok"
