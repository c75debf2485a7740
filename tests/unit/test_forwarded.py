"""The client's address behind trusted proxies: X-Forwarded-For read from the right, only from a trusted peer."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from streambridge.api.forwarded import MAX_HOPS, client_address, forwarded_middleware, forwarded_proto
from streambridge.shared.errors import SettingsError
from streambridge.shared.settings import load_settings

PROXIES = load_settings({"STREAMBRIDGE_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1, ::1"}).trusted_networks


def test_trusted_proxies_are_addresses_and_networks() -> None:
    assert [str(n) for n in PROXIES] == ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]
    assert load_settings({}).trusted_networks == ()


@pytest.mark.parametrize("value", ["nginx", "10.0.0.0/33", "127.0.0.1,,x"])
def test_a_trusted_proxy_that_is_not_an_address_is_refused(value: str) -> None:
    with pytest.raises(SettingsError, match="STREAMBRIDGE_TRUSTED_PROXIES"):
        load_settings({"STREAMBRIDGE_TRUSTED_PROXIES": value})


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        ("10.1.2.3", ["203.0.113.7"], "203.0.113.7"),  # nginx in front: the client it names
        ("10.1.2.3", ["198.51.100.1, 203.0.113.7, 10.9.9.9"], "203.0.113.7"),  # two proxies; a forged first hop
        ("10.1.2.3", ["198.51.100.1", "203.0.113.7"], "203.0.113.7"),  # the header twice: one list
        ("203.0.113.7", ["198.51.100.1"], "203.0.113.7"),  # not from a proxy: the header is the client's word
        ("10.1.2.3", [], "10.1.2.3"),  # a proxy's own request
        ("10.1.2.3", ["10.2.2.2, 127.0.0.1"], "10.2.2.2"),  # every hop a proxy: the farthest
        ("10.1.2.3", ["garbage"], "10.1.2.3"),  # not an address: the chain ends, as at an empty hop
        ("10.1.2.3", ["203.0.113.7, unknown"], "10.1.2.3"),  # nothing left of a non-address is believed
        ("10.1.2.3", ["203.0.113.7, garbage, 10.2.2.2"], "10.2.2.2"),  # ... the last trusted hop before it is
        ("10.1.2.3", ["203.0.113.7:4711"], "203.0.113.7"),  # a port: the address, one key per client
        ("10.1.2.3", ["[2001:db8::5]:4711"], "2001:db8::5"),
        ("10.1.2.3", ["[2001:db8::5]"], "2001:db8::5"),
        ("10.1.2.3", ["2001:DB8:0::5"], "2001:db8::5"),  # normalized: one client, one key
        ("10.1.2.3", ["::ffff:203.0.113.7"], "203.0.113.7"),  # IPv4-mapped: the IPv4 address
        ("10.1.2.3", ["::ffff:10.2.2.2"], "10.2.2.2"),  # ... which is a trusted proxy's, then the farthest
        ("10.1.2.3", ["203.0.113.7:99999"], "10.1.2.3"),  # not a port
        ("10.1.2.3", ["[2001:db8::5"], "10.1.2.3"),  # an open bracket
        ("10.1.2.3", ["1" * 65], "10.1.2.3"),  # longer than any address
        ("::ffff:10.0.0.5", ["203.0.113.7"], "203.0.113.7"),  # a dual-stack socket's IPv4 proxy is trusted
        ("::ffff:198.51.100.1", ["203.0.113.7"], "::ffff:198.51.100.1"),  # an untrusted one keeps its address
        ("10.1.2.3", ["203.0.113.7, "], "10.1.2.3"),  # an empty hop ends the chain
        ("::1", ["2001:db8::5"], "2001:db8::5"),
    ],
)
def test_the_client_is_the_rightmost_hop_that_is_not_a_trusted_proxy(
    peer: str, forwarded_for: list[str], client: str
) -> None:
    assert client_address(peer, forwarded_for, PROXIES) == client


def test_only_the_rightmost_hops_are_read() -> None:
    forged = ", ".join(["10.2.2.2"] * (MAX_HOPS + 5))
    assert client_address("10.1.2.3", [f"203.0.113.7, {forged}"], PROXIES) == "10.2.2.2"


@pytest.mark.parametrize(
    ("values", "scheme"),
    [(["https"], "https"), ([" HTTP "], "http"), (["ftp"], None), (["https", "http"], None), ([], None)],
)
def test_the_forwarded_proto_is_one_of_http_and_https(values: list[str], scheme: str | None) -> None:
    assert forwarded_proto(values) == scheme


async def through_middleware(peer: str, headers: dict[str, str]) -> web.Request:
    seen: list[web.Request] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        return web.Response()

    transport: Any = type("Transport", (), {"get_extra_info": lambda self, name, default=None: (peer, 5555)})()
    request = make_mocked_request("GET", "/v1/chats", headers={"Host": "chat.example", **headers}, transport=transport)
    await forwarded_middleware(PROXIES)(request, handler)
    return seen[0]


async def test_a_trusted_proxy_sets_the_client_and_the_scheme() -> None:
    headers = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    request = await through_middleware("10.1.2.3", headers)
    assert request.remote == "203.0.113.7"
    assert str(request.url.origin()) == "https://chat.example"  # stream_url says https behind TLS


async def test_anyone_else_sets_neither() -> None:
    headers = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    request = await through_middleware("198.51.100.1", headers)
    assert request.remote == "198.51.100.1"
    assert str(request.url.origin()) == "http://chat.example"
