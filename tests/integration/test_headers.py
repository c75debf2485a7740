"""Browsers: CORS only for allowed origins (never ``*``), and security headers on every answer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from streambridge.api.app import make_app
from streambridge.shared.settings import Settings
from tests.integration.conftest import bearer

APP = "https://app.example"


@pytest.fixture
async def browser_client(settings: Settings) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    allowed = msgspec.structs.replace(settings, cors_origins=f"{APP}, https://other.example/")
    async with TestClient(TestServer(make_app(allowed))) as client:
        yield client


async def test_a_preflight_from_an_allowed_origin_is_answered_before_auth(browser_client: TestClient) -> None:  # type: ignore[type-arg]
    response = await browser_client.options(
        "/v1/chats", headers={"Origin": APP, "Access-Control-Request-Method": "POST"}
    )
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == APP
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    assert "Last-Event-ID" in response.headers["Access-Control-Allow-Headers"]
    assert "POST" in response.headers["Access-Control-Allow-Methods"]


async def test_other_origins_get_no_cors_and_never_a_wildcard(browser_client: TestClient) -> None:  # type: ignore[type-arg]
    preflight = await browser_client.options(
        "/v1/chats", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status == 403
    response = await browser_client.post("/v1/auth/visitor", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_an_allowed_origin_can_read_answers_errors_and_the_event_stream(browser_client: TestClient) -> None:  # type: ignore[type-arg]
    login = await browser_client.post("/v1/auth/visitor", headers={"Origin": APP})
    assert login.headers["Access-Control-Allow-Origin"] == APP
    assert login.headers["Vary"] == "Origin"
    token = (await login.json())["token"]
    chat = await (await browser_client.post("/v1/chats", json={"message": "hi"}, headers=bearer(token))).json()
    error = await browser_client.get("/v1/chats/" + "0" * 32, headers={**bearer(token), "Origin": APP})
    assert error.status == 404
    assert error.headers["Access-Control-Allow-Origin"] == APP
    assert error.headers["Access-Control-Expose-Headers"] == "Retry-After"  # a 429's wait is readable cross-origin
    stream = await browser_client.get("/" + chat["stream_url"].split("/", 3)[3], headers={"Origin": APP})
    assert stream.status == 200
    assert stream.headers["Access-Control-Allow-Origin"] == APP  # an EventSource on another origin works
    stream.close()


async def test_every_answer_carries_security_headers(client: TestClient, token: str) -> None:  # type: ignore[type-arg]
    chat = await (await client.post("/v1/chats", json={"message": "hi"}, headers=bearer(token))).json()
    answers = [
        await client.get("/healthz"),
        await client.get("/v1/nothing"),
        await client.get(f"/v1/chats/{chat['id']}", headers=bearer(token)),
        await client.get(f"/v1/chats/{chat['id']}/events", headers=bearer(token)),
    ]
    for response in answers:
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert "Access-Control-Allow-Origin" not in response.headers  # no origins allowed by default
        response.close()
    assert answers[2].headers["Cache-Control"] == "no-store"  # private text and tokens are not cached
    assert answers[3].headers["Cache-Control"] == "no-cache"  # the SSE stream keeps the contract's header
