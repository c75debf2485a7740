"""``GET /`` and ``/streambridge.js``: served by every kind of process, under a strict policy, from the package."""

from __future__ import annotations

import json

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from streambridge.api import page
from streambridge.api.app import make_app
from streambridge.shared.settings import Settings

PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@pytest.mark.parametrize(
    ("serve_api", "serve_edge"), [(True, True), (True, False), (False, True)], ids=["up", "api", "edge"]
)
async def test_every_process_serves_the_page_and_the_client(
    settings: Settings, serve_api: bool, serve_edge: bool
) -> None:
    async with TestClient(TestServer(make_app(settings, serve_api=serve_api, serve_edge=serve_edge))) as client:
        for path, (relative, content_type, _) in page.FILES.items():
            response = await client.get(path)
            assert response.status == 200, path
            assert response.content_type == content_type
            assert await response.read() == (page.STATIC / relative).read_bytes()
            assert response.headers["Cache-Control"] == "no-cache"
            assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_the_page_runs_under_a_strict_policy_with_no_inline_code(client: TestClient) -> None:  # type: ignore[type-arg]
    response = await client.get("/")
    assert response.headers["Content-Security-Policy"] == PAGE_POLICY
    assert response.headers["X-Frame-Options"] == "DENY"
    html = await response.text()
    assert "<script>" not in html  # scripts are files (script-src 'self' forbids inline ones)
    assert "style=" not in html
    assert "<style" not in html
    assert "http://" not in html  # nothing from outside the deployment
    assert "https://" not in html


async def test_the_public_edge_may_be_connected_to(settings: Settings) -> None:
    edge = msgspec.structs.replace(settings, public_edge_url="https://edge.example:8443/base")
    async with TestClient(TestServer(make_app(edge))) as client:
        policy = (await client.get("/")).headers["Content-Security-Policy"]
    assert "connect-src 'self' https://edge.example:8443;" in policy


async def test_other_answers_load_nothing(client: TestClient) -> None:  # type: ignore[type-arg]
    for path in ("/healthz", "/v1/chats/nope", "/nowhere"):
        response = await client.get(path)
        assert response.headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"


async def test_an_unchanged_file_is_not_sent_again(client: TestClient) -> None:  # type: ignore[type-arg]
    first = await client.get("/streambridge.js")
    again = await client.get("/streambridge.js", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status == 304
    assert await again.read() == b""
    head = await client.head("/")
    assert head.status == 200


async def test_only_get_and_head(client: TestClient) -> None:  # type: ignore[type-arg]
    response = await client.post("/streambridge.js")
    assert response.status == 405
    assert (await response.json())["error"]["code"] == "method_not_allowed"


def test_the_npm_package_points_at_its_files() -> None:
    manifest = json.loads((page.STATIC / "client" / "package.json").read_text())
    assert manifest["type"] == "module"
    exported = manifest["exports"]["."]
    for relative in (manifest["main"], manifest["types"], exported["default"], exported["types"]):
        assert (page.STATIC / "client" / relative).is_file()
    assert set(manifest["files"]) == {"streambridge.js", "streambridge.d.ts"}
