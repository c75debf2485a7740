"""Baseline: a plain aiohttp proxy with no queue: POST /v1/chat/completions relayed to the LLM as it streams."""

from __future__ import annotations

import sys

import aiohttp
import uvloop
from aiohttp import web


def make_proxy(upstream: str) -> web.Application:
    async def relay(request: web.Request) -> web.StreamResponse:
        session: aiohttp.ClientSession = request.app["session"]
        async with session.post(f"{upstream}/chat/completions", data=await request.read()) as upstream_response:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app["session"].close()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", relay)
    app.cleanup_ctx.append(session_ctx)
    return app


if __name__ == "__main__":
    # on uvloop, as our processes and the simulated LLM are: one hop measured on the same loop as ours
    web.run_app(
        make_proxy(sys.argv[1]),
        host="127.0.0.1",
        port=int(sys.argv[2]),
        print=None,
        access_log=None,
        loop=uvloop.new_event_loop(),
    )
