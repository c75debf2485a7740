"""The browser's side: the chat page at ``/`` and the JavaScript client at ``/streambridge.js``.

Served by every process that serves the API or an edge, from files in ``api/static`` (installed
with the package): ``client/`` is the npm package (``streambridge.js``, its ``.d.ts``), ``page/``
the page. They are read once, at import: a handful of small files, answered from memory with an
ETag, and revalidated on each load (``no-cache``) so a new release shows at once.

The page runs under a strict Content-Security-Policy: scripts and styles from this origin only,
no inline code, connections to this origin and the public edge's. Model output is put on the page
as text (``textContent``), so the policy is a second wall, not the first.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Final, NamedTuple
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler

from streambridge.api.context import SETTINGS
from streambridge.shared.settings import Settings

STATIC: Final = Path(__file__).parent / "static"


class Asset(NamedTuple):
    body: bytes
    content_type: str
    etag: str


#: URL path → (file under STATIC, Content-Type, operationId); the paths are stable: pages import the client by them
FILES: Final = {
    "/": ("page/index.html", "text/html", "chat_page"),
    "/page/chat.js": ("page/chat.js", "text/javascript", "page_script"),
    "/page/chat.css": ("page/chat.css", "text/css", "page_style"),
    "/page/icon.svg": ("page/icon.svg", "image/svg+xml", "page_icon"),
    "/streambridge.js": ("client/streambridge.js", "text/javascript", "client_module"),
    "/streambridge.d.ts": ("client/streambridge.d.ts", "application/typescript", "client_types"),
}


def load(relative: str, content_type: str) -> Asset:
    body = (STATIC / relative).read_bytes()
    return Asset(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


ASSETS: Final = {path: load(relative, content_type) for path, (relative, content_type, _) in FILES.items()}


def content_security_policy(settings: Settings) -> str:
    """The page's policy: nothing but this origin, and the public edge's for the event streams."""
    connect = ["'self'"]
    if settings.public_edge_url:
        edge = urlsplit(settings.public_edge_url)
        connect.append(f"{edge.scheme}://{edge.netloc}")
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            f"connect-src {' '.join(connect)}",
            "img-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def serve(path: str, operation_id: str) -> Handler:
    """The handler of one file, named as /openapi.json names its operation."""
    found = ASSETS[path]

    async def handler(request: web.Request) -> web.StreamResponse:
        headers = {"Cache-Control": "no-cache", "ETag": found.etag}
        if found.content_type == "text/html":
            headers["Content-Security-Policy"] = content_security_policy(request.app[SETTINGS])
        if found.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=found.body, content_type=found.content_type, charset="utf-8", headers=headers)

    handler.__name__ = handler.__qualname__ = operation_id
    return handler


routes = web.RouteTableDef()
for _path, (_, _, _operation_id) in FILES.items():
    routes.get(_path)(serve(_path, _operation_id))
