"""An API or edge process's heartbeat record (``shared.presence``): what it serves, its open streams."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp import web

from streambridge.api.context import CONTEXT
from streambridge.shared.presence import ServerRecord, identity, uptime


class ServerDescriber:
    """``describe`` for the heartbeat of a process serving ``app`` on ``port``; ``stopping`` once
    ``stop`` (the process's SIGINT/SIGTERM) has come: its graceful stop has begun.

    ``open_streams`` is the edge's stream slots held (``api.slots``): every SSE response open, and also
    a request between taking its slot and its first byte, and a non-streamed completion or response
    waiting for its answer (each holds a slot while it waits, as a stream would)."""

    def __init__(
        self, app: web.Application, port: int, *, api: bool, edge: bool, stop: asyncio.Future[Any] | None = None
    ) -> None:
        self.app, self.stop = app, stop
        serves = [name for name, on in (("api", api), ("edge", edge)) if on]
        self.template = ServerRecord(**identity("+".join(serves)), port=port, serves=serves)

    def __call__(self) -> ServerRecord:
        ctx = self.app.get(CONTEXT)  # set once the app has started
        slots = ctx.slots if ctx is not None else None
        return msgspec.structs.replace(
            self.template,
            state="stopping" if self.stop is not None and self.stop.done() else "running",
            uptime_s=uptime(),
            open_streams=slots.held if slots is not None else 0,
        )
