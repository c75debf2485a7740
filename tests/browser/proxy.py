"""A reverse proxy in front of the system, as a deployment has one: one origin for the page.

Event streams go to an edge (the first that takes the connection, so a SIGKILLed edge is passed
over), everything else to the API. ``cut()`` is a network cut: every open connection is dropped
and new ones are refused until ``restore()``. (Chromium's emulated offline mode leaves open
connections streaming, so it cannot cut a stream by itself.) ``requests`` holds the method and
path (with query) of every request it was sent, in order, for tests that check what a browser
asked for (``last_event_ids``: each with its ``Last-Event-ID`` header). It also serves the test
page of the JavaScript client under ``/_test/``.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final, TypeVar

import aiohttp
from aiohttp import web

EVENTS: Final = re.compile(r"^/v1/chats/[^/]+/events$")
# not passed on: they describe one hop's connection and framing, which the proxy makes anew
HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}
    | {"content-encoding"}
)
TEST_PAGE: Final = Path(__file__).parent / "client_page"
T = TypeVar("T")


class Proxy:
    def __init__(self) -> None:
        self.api = ""
        self.edges: list[str] = []
        self.url = ""
        self._cut = False
        self.requests: list[str] = []
        #: the same requests, each with the Last-Event-ID header it carried (None without one)
        self.last_event_ids: list[tuple[str, str | None]] = []
        self._open: set[asyncio.Transport] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._runner = self._call(self._start)

    def cut(self) -> None:
        self._call(self._drop_all)

    def restore(self) -> None:
        self._cut = False

    def stop(self) -> None:
        self._call(self._stop)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _call(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result(20)

    async def _start(self) -> web.AppRunner:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        app = web.Application()
        app.router.add_static("/_test/", TEST_PAGE)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return runner

    async def _stop(self) -> None:
        await self._drop_all()
        await self._runner.cleanup()
        await self._session.close()

    async def _drop_all(self) -> None:
        self._cut = True
        for transport in list(self._open):
            transport.abort()
        self._open.clear()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        self.requests.append(f"{request.method} {request.path_qs}")
        self.last_event_ids.append((f"{request.method} {request.path_qs}", request.headers.get("Last-Event-ID")))
        if self._cut or transport is None:
            if transport is not None:
                transport.abort()  # no answer at all, as on a dead network
            raise ConnectionResetError
        self._open.add(transport)
        try:
            return await self._relay(request)
        finally:
            self._open.discard(transport)

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read()
        upstreams = self.edges if EVENTS.match(request.path) else [self.api]
        for upstream in upstreams:
            try:
                upstream_response = await self._session.request(
                    request.method, upstream + request.path_qs, headers=headers, data=body, allow_redirects=False
                )
                break
            except aiohttp.ClientConnectorError:
                continue  # a dead edge: the next one
        else:
            return web.json_response({"error": {"code": "bad_gateway", "message": "no upstream"}}, status=502)
        async with upstream_response:
            response = web.StreamResponse(status=upstream_response.status)
            for name, value in upstream_response.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            try:
                async for chunk in upstream_response.content.iter_any():
                    await response.write(chunk)
            except (aiohttp.ClientError, ConnectionResetError):
                # the upstream died mid-answer (a SIGKILLed edge): the client sees its connection drop
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write_eof()
            return response
