"""Headers on every answer: security defaults, and CORS for the origins the operator allowed.

CORS is an allowlist (``STREAMBRIDGE_CORS_ORIGINS``, empty by default): an allowed origin is
echoed back, never ``*``, and no credentials are involved (auth is a header or the stream
token in the URL). Preflights are answered before routing, so they never meet auth.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from streambridge.api.context import SETTINGS

SECURITY: Final = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
#: for every answer but the page (which sets its own): JSON and streams load nothing and are never framed
NO_CONTENT_POLICY: Final = "default-src 'none'; frame-ancestors 'none'"
ALLOW_METHODS: Final = "GET, POST, OPTIONS"
ALLOW_HEADERS: Final = "Authorization, Content-Type, Idempotency-Key, Last-Event-ID"
#: answer headers a page on another origin may read: a 429's wait (the browser client honours it)
EXPOSE_HEADERS: Final = "Retry-After"


def allowed_origin(request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    if origin is not None and origin.rstrip("/") in request.app[SETTINGS].allowed_origins:
        return origin
    return None


@web.middleware
async def preflight_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        if allowed_origin(request) is None:
            return web.Response(status=403)
        headers = {"Access-Control-Allow-Methods": ALLOW_METHODS, "Access-Control-Allow-Headers": ALLOW_HEADERS}
        return web.Response(status=204, headers={**headers, "Access-Control-Max-Age": "600"})
    response: web.StreamResponse = await handler(request)
    return response


async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: runs for every answer, SSE streams included, before headers go out."""
    response.headers.update(SECURITY)
    response.headers.setdefault("Content-Security-Policy", NO_CONTENT_POLICY)
    if request.path.startswith("/v1/") and "Cache-Control" not in response.headers:
        response.headers["Cache-Control"] = "no-store"  # answers carry tokens and private text
    origin = allowed_origin(request)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        response.headers["Vary"] = "Origin"
