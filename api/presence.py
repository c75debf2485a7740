"""An API or edge process's heartbeat record (``shared.presence``): what it serves, its open streams."""

from __future__ import annotations

import msgspec
from aiohttp import web

from streambridge.api.context import CONTEXT
from streambridge.shared.presence import ServerRecord, identity


class ServerDescriber:
    """``describe`` for the heartbeat of a process serving ``app`` on ``port``."""

    def __init__(self, app: web.Application, port: int, *, api: bool, edge: bool) -> None:
        self.app = app
        serves = [name for name, on in (("api", api), ("edge", edge)) if on]
        self.template = ServerRecord(**identity("+".join(serves)), port=port, serves=serves)

    def __call__(self) -> ServerRecord:
        ctx = self.app.get(CONTEXT)  # set once the app has started
        slots = ctx.slots if ctx is not None else None
        return msgspec.structs.replace(self.template, open_streams=slots.held if slots is not None else 0)
