"""The client's address behind trusted proxies (``STREAMBRIDGE_TRUSTED_PROXIES``), from X-Forwarded-For.

Each proxy appends the address it was reached from, so the header is read from the right: the
first address that is not a trusted proxy is the client. A request that did not come from a
trusted proxy keeps its peer's address, whatever the header says, so clients cannot choose theirs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from streambridge.shared.settings import IPNetwork


def trusted(address: str, networks: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(peer: str, forwarded_for: Iterable[str], networks: Sequence[IPNetwork]) -> str:
    """``peer``, or the rightmost hop of ``forwarded_for`` (the headers' values) that is not a trusted proxy."""
    if not trusted(peer, networks):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    client = peer
    for hop in reversed(hops):
        if not hop:
            break
        client = hop
        if not trusted(hop, networks):
            break
    return client


def forwarded_middleware(networks: Sequence[IPNetwork]) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = request.remote
        if peer is not None:
            client = client_address(peer, request.headers.getall("X-Forwarded-For", ()), networks)
            if client != peer:
                request = request.clone(remote=client)
        return await handler(request)

    return middleware
