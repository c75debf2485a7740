"""``GET /v1/models``: the upstream's models, as OpenAI lists them (``client.models.list()``)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

import aiohttp
import msgspec
from aiohttp import web

from streambridge.api.auth import authenticate
from streambridge.api.context import context
from streambridge.shared.errors import NotFound
from streambridge.shared.settings import Settings

log = logging.getLogger("streambridge.api")

routes = web.RouteTableDef()

#: how long a fetched list is served before the upstream is asked again
CACHE_FOR: Final = 60.0
FETCH_TIMEOUT: Final = 3.0


class Model(msgspec.Struct):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "streambridge"


class ModelList(msgspec.Struct):
    data: list[Model]
    object: str = "list"


class Models:
    """The upstream's list, fetched at most once a minute; the configured model when there is no
    upstream to ask or it does not answer (llama.cpp and some proxies have no such route)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._list: ModelList | None = None
        self._until = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> ModelList:
        async with self._lock:  # one fetch however many ask at once
            if self._list is None or time.monotonic() >= self._until:
                self._list = await self._fetch() or ModelList([Model(self._settings.llm_model)])
                self._until = time.monotonic() + CACHE_FOR
            return self._list

    async def _fetch(self) -> ModelList | None:
        base = self._settings.llm_base_url
        if base is None:
            return None
        key = self._settings.llm_api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(f"{base.rstrip('/')}/models", headers=headers) as response:
                    response.raise_for_status()
                    listed: Any = msgspec.json.decode(await response.read())
            models = [msgspec.convert(m, Model) for m in listed["data"]]
        except (aiohttp.ClientError, TimeoutError, msgspec.MsgspecError, KeyError, TypeError) as exc:
            log.warning("the upstream's model list is unavailable (%s); listing %s", exc, self._settings.llm_model)
            return None
        return ModelList(models) if models else None


MODELS: Final = web.AppKey("models", Models)


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    ctx = context(request)
    await authenticate(request, ctx.redis, ctx.settings)
    listed = await request.app[MODELS].get()
    return web.Response(body=msgspec.json.encode(listed), content_type="application/json")


@routes.get("/v1/models/{model:.+}")
async def read_model(request: web.Request) -> web.Response:
    """One model of the list (``client.models.retrieve(id)``); ids may hold slashes (``org/name``)."""
    ctx = context(request)
    await authenticate(request, ctx.redis, ctx.settings)
    wanted = request.match_info["model"]
    listed = await request.app[MODELS].get()
    found = next((m for m in listed.data if m.id == wanted), None)
    if found is None:
        raise NotFound(f"the model `{wanted[:200]}` does not exist", code="model_not_found", param="model")
    return web.Response(body=msgspec.json.encode(found), content_type="application/json")
