"""Operations: ``GET /metrics`` (Prometheus) and ``GET /readyz`` (ready to serve), on the API and the
edge (``/healthz``, liveness, stays with the chats' routes)."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from streambridge.api.context import CONTEXT
from streambridge.shared import metrics

routes = web.RouteTableDef()


@dataclass
class Readiness:
    """Whether the app serves: from the end of its startup until its shutdown begins."""

    serving: bool = False
    #: whether its ``/metrics`` reads the queue depths (the API's does; an edge's has no use for them)
    queue_depths: bool = True


READINESS = web.AppKey("readiness", Readiness)


@routes.get("/metrics")
async def metrics_page(request: web.Request) -> web.Response:
    ctx = request.app.get(CONTEXT)
    redis = ctx.redis if ctx is not None and request.app[READINESS].queue_depths else None
    return await metrics.metrics_response(redis)


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    ctx = request.app.get(CONTEXT)
    serving = request.app[READINESS].serving
    return await metrics.readiness_response(
        ctx.redis if ctx is not None else None, None if serving else "not serving (starting or shutting down)"
    )
