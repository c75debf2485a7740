"""The client's address behind trusted proxies: X-Forwarded-For read from the right, only from a trusted peer."""

from __future__ import annotations

import pytest

from streambridge.api.forwarded import client_address
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
        ("10.1.2.3", ["garbage"], "garbage"),  # what the proxy said, as it said it: a key, not an address
        ("10.1.2.3", ["203.0.113.7, "], "10.1.2.3"),  # an empty hop ends the chain
        ("::1", ["2001:db8::5"], "2001:db8::5"),
    ],
)
def test_the_client_is_the_rightmost_hop_that_is_not_a_trusted_proxy(
    peer: str, forwarded_for: list[str], client: str
) -> None:
    assert client_address(peer, forwarded_for, PROXIES) == client
