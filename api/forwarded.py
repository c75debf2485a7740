"""The client's address behind trusted proxies (``STREAMBRIDGE_TRUSTED_PROXIES``), from X-Forwarded-For.

Each proxy appends the address it was reached from, so the header is read from the right: the
first address that is not a trusted proxy is the client. A request that did not come from a
trusted proxy keeps its peer's address, whatever the header says, so clients cannot choose theirs.

Hops are addresses: ``203.0.113.7``, ``2001:db8::5``, also with a port (``203.0.113.7:4711``,
``[2001:db8::5]:4711``) as some proxies write them, and IPv4-mapped IPv6 (``::ffff:203.0.113.7``)
as a dual-stack socket reports an IPv4 peer. Each is normalized to its plain form, so one client
is one key in the limits however it was written. Anything else (a name, ``unknown``, a hop longer
than any address) ends the chain, as an empty hop does: the client is then the last trusted hop.

From a trusted proxy, ``X-Forwarded-Proto: https`` (or ``http``) also sets the request's scheme, so
URLs built from the request (a chat's ``stream_url``) say https when TLS ends in front of the proxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from streambridge.shared.settings import IPNetwork

#: the longest hop read: ``[`` an IPv6 address with an IPv4 tail and a zone ``]:65535``, with room to spare
MAX_HOP = 64
#: hops read from the right of X-Forwarded-For at most: more proxies than that is a forged header
MAX_HOPS = 16

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(hop: str) -> IPAddress | None:
    """The address a hop names, IPv4-mapped IPv6 as IPv4, a port dropped; ``None`` when it names none."""
    hop = hop.strip()
    if not hop or len(hop) > MAX_HOP:
        return None
    if hop.startswith("["):  # [v6] or [v6]:port
        end = hop.find("]")
        if end < 0 or (hop[end + 1 :] and not _is_port(hop[end + 1 :])):
            return None
        hop = hop[1:end]
    elif hop.count(":") == 1:  # v4:port (a bare IPv6 address has two colons at least)
        hop, _, port = hop.partition(":")
        if not _is_port(":" + port):
            return None
    try:
        ip = ipaddress.ip_address(hop)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_port(text: str) -> bool:
    return text.startswith(":") and text[1:].isdigit() and 0 < len(text) <= 6 and int(text[1:]) <= 65535


def trusted(address: str, networks: Sequence[IPNetwork]) -> bool:
    ip = parse_address(address)
    return ip is not None and any(ip in network for network in networks)


def client_address(peer: str, forwarded_for: Iterable[str], networks: Sequence[IPNetwork]) -> str:
    """``peer``, or the rightmost hop of ``forwarded_for`` (the headers' values) that is not a trusted proxy."""
    if not trusted(peer, networks):
        return peer
    hops = [hop for value in forwarded_for for hop in value.split(",")][-MAX_HOPS:]
    client = peer
    for hop in reversed(hops):
        ip = parse_address(hop)
        if ip is None:
            break
        client = str(ip)
        if not any(ip in network for network in networks):
            break
    return client


def forwarded_proto(values: Iterable[str]) -> str | None:
    """``http`` or ``https`` when the header says exactly one of them; ``None`` otherwise."""
    found = [value.strip().lower() for value in values]
    if len(found) == 1 and found[0] in {"http", "https"}:
        return found[0]
    return None


def forwarded_middleware(networks: Sequence[IPNetwork]) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = request.remote
        if peer is not None and trusted(peer, networks):
            client = client_address(peer, request.headers.getall("X-Forwarded-For", ()), networks)
            scheme = forwarded_proto(request.headers.getall("X-Forwarded-Proto", ()))
            scheme = scheme or request.scheme
            if client != peer or scheme != request.scheme:
                request = request.clone(remote=client, scheme=scheme)  # one clone: a clone keeps neither
        return await handler(request)

    return middleware
