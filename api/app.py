"""The aiohttp application: the API's routes, the edge's, or both on one port (``up``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Middleware
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from streambridge.api import batches, chats, completions, edge, files, models, openapi, ops, page, responses
from streambridge.api.auth import load_secret
from streambridge.api.context import CONTEXT, SETTINGS, Context
from streambridge.api.errors import error_middleware
from streambridge.api.forwarded import forwarded_middleware
from streambridge.api.headers import add_headers, preflight_middleware
from streambridge.api.hub import StreamHub
from streambridge.api.query import single_valued_query_middleware
from streambridge.api.slots import StreamSlots
from streambridge.shared import keys
from streambridge.shared.redis import close_client, connect, connect_feed, connect_streams, is_cluster_url
from streambridge.shared.settings import Settings

SECRET_REFRESH = 10.0


async def keep_secret_fresh(ctx: Context) -> None:
    """Processes converge on Redis's signing key within ``SECRET_REFRESH`` s, even after Redis lost it."""
    if ctx.settings.secret:
        return
    while True:
        await asyncio.sleep(SECRET_REFRESH)
        with contextlib.suppress(RedisError):
            ctx.secret = await load_secret(ctx.redis, None, ctx.secret)


def make_app(settings: Settings, *, serve_api: bool = True, serve_edge: bool = True) -> web.Application:
    assert settings.redis_url is not None, "the CLI resolves the embedded Redis first"
    redis_url = settings.redis_url
    middlewares: list[Middleware] = [error_middleware, preflight_middleware, single_valued_query_middleware]
    if settings.trusted_networks:
        middlewares.insert(0, forwarded_middleware(settings.trusted_networks))
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app.on_response_prepare.append(add_headers)
    app[SETTINGS] = settings
    if serve_api:
        app.add_routes(chats.routes)
        app.add_routes(files.routes)
        app.add_routes(batches.routes)
    else:
        app.router.add_get("/healthz", chats.healthz)
    if serve_edge:
        app.add_routes(edge.routes)
        app.add_routes(completions.routes)  # they stream, as an edge does
        app.add_routes(responses.routes)
    app.add_routes(openapi.routes)
    app.add_routes(page.routes)  # the chat page and the JavaScript client, on every process that serves HTTP
    app.add_routes(models.routes)
    app[models.MODELS] = models.Models(settings)
    app.add_routes(ops.routes)
    readiness = app[ops.READINESS] = ops.Readiness(queue_depths=serve_api)
    app.on_cleanup.append(ops.close_checks)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        # A bounded pool per process: an edge's hub takes one socket for its Pub/Sub feed, and
        # commands share the rest.
        pool_size = settings.redis_max_connections - (1 if serve_edge else 0)
        redis = connect(redis_url, max_connections=pool_size, client_class=ArqRedis)
        redis.default_queue_name = keys.QUEUE_NAME
        streams_url = settings.streams_redis_url
        streams = connect_streams(streams_url, max_connections=pool_size) if streams_url else redis
        ctx = Context(settings=settings, redis=redis, streams=streams, secret=await load_secret(redis, settings.secret))
        background = [asyncio.create_task(keep_secret_fresh(ctx))]
        feed = connect_feed(streams_url or redis_url) if serve_edge and not is_cluster_url(streams_url) else None
        if serve_edge:
            ctx.hub = StreamHub(streams, feed)
            await ctx.hub.start()
            ctx.slots = StreamSlots(redis, settings.max_open_streams_per_ip)
            background.append(asyncio.create_task(ctx.slots.renew_forever()))
        app[CONTEXT] = ctx
        readiness.serving = True
        yield
        readiness.serving = False
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if ctx.hub is not None:
            await ctx.hub.stop()
        # The pools were handed to the clients, so closing a client leaves its pool's sockets open.
        await redis.aclose(close_connection_pool=True)
        if streams is not redis:
            await close_client(streams)
        if feed is not None:
            await feed.aclose(close_connection_pool=True)

    async def close_streams(app: web.Application) -> None:
        # Before aiohttp waits for handlers to finish: open SSE streams end now, not when their chats do.
        readiness.serving = False  # a load balancer sends no one new here
        hub = app[CONTEXT].hub
        if hub is not None:
            hub.close_all()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(close_streams)
    return app
