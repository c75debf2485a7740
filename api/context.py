"""What every handler of one process shares, stored on the aiohttp app under one typed key."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web
from arq.connections import ArqRedis

from streambridge.api.credentials import Known
from streambridge.api.hub import StreamHub
from streambridge.api.slots import StreamSlots
from streambridge.shared.machine import Store
from streambridge.shared.settings import Settings


@dataclass
class Context:
    settings: Settings
    #: the control Redis: queue, credentials, limits
    redis: ArqRedis
    #: the chats' own keys (``shared.keys``): ``redis`` itself, unless ``STREAMBRIDGE_STREAMS_REDIS_URL`` is set
    streams: Store
    secret: bytes
    hub: StreamHub | None = None
    slots: StreamSlots | None = None
    #: the credentials an edge has seen, by id, with their identities (see ``api.edge.admit``)
    credentials: dict[str, Known] = field(default_factory=dict)


CONTEXT = web.AppKey("context", Context)
SETTINGS = web.AppKey("settings", Settings)


def context(request: web.Request) -> Context:
    return request.app[CONTEXT]
