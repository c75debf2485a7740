"""Query strings: a parameter the API takes once may not come twice."""

from __future__ import annotations

from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from streambridge.api.openapi import DOCUMENT
from streambridge.shared.errors import BadRequest

#: every query parameter a route reads as one value (``include`` is an array; a name no route
#: reads is ignored however often it comes, as any unknown parameter is where a route allows it)
SINGLE_VALUED: Final = frozenset(
    {
        parameter["name"]
        for item in DOCUMENT["paths"].values()
        for method, operation in item.items()
        if method != "parameters"
        for parameter in operation.get("parameters", [])
        if parameter["in"] == "query" and parameter.get("schema", {}).get("type") != "array"
    }
    | {DOCUMENT["components"]["securitySchemes"]["streamToken"]["name"]}
)


@web.middleware
async def single_valued_query_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``?limit=5&limit=500`` is a 400 naming ``limit``, never whichever value a route reads first."""
    names = [name for name, _ in request.query.items() if name in SINGLE_VALUED]  # once a value
    if len(names) != len(set(names)):
        name = next(n for n in names if names.count(n) > 1)
        raise BadRequest(f"query parameter `{name}` given more than once", code="invalid_request", param=name)
    return await handler(request)
