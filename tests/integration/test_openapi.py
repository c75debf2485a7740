"""``GET /openapi.json`` is served by every kind of process, as JSON, without a token."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer

from streambridge.api import openapi
from streambridge.api.app import make_app
from streambridge.shared.settings import Settings


@pytest.mark.parametrize(
    ("serve_api", "serve_edge"), [(True, True), (True, False), (False, True)], ids=["up", "api", "edge"]
)
async def test_every_process_serves_the_document(settings: Settings, serve_api: bool, serve_edge: bool) -> None:
    async with TestClient(TestServer(make_app(settings, serve_api=serve_api, serve_edge=serve_edge))) as client:
        response = await client.get("/openapi.json")
        assert response.status == 200
        assert response.content_type == "application/json"
        assert await response.read() == openapi.BODY
        head = await client.head("/openapi.json")
        assert head.status == 200


async def test_the_document_is_public_and_read_only(client: TestClient) -> None:  # type: ignore[type-arg]
    response = await client.get("/openapi.json", headers={"Authorization": "Bearer nonsense"})
    assert response.status == 200
    wrong = await client.post("/openapi.json")
    assert wrong.status == 405
    assert (await wrong.json())["error"]["code"] == "method_not_allowed"
