"""Cancelling a queued chat: it never runs, its stream ends with ``cancelled``, and it stays cancelled."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from streambridge.shared.events import Cancelled
from tests.integration.conftest import RunWorker, bearer, events_of, read_sse


async def test_a_cancelled_queued_chat_never_runs(client: TestClient, token: str, run_worker: RunWorker) -> None:  # type: ignore[type-arg]
    chat_id = (await (await client.post("/v1/chats", json={"message": "hi"}, headers=bearer(token))).json())["id"]
    response = await client.post(f"/v1/chats/{chat_id}/cancel", headers=bearer(token))
    assert response.status == 202
    assert await response.json() == {"id": chat_id, "status": "cancelled"}
    await run_worker()
    events = events_of(await read_sse(await client.get(f"/v1/chats/{chat_id}/events", headers=bearer(token))))
    assert events == [Cancelled()]
    result = await (await client.get(f"/v1/chats/{chat_id}", headers=bearer(token))).json()
    assert result["status"] == "cancelled"


async def test_cancel_is_idempotent_and_a_finished_chat_keeps_its_status(
    client: TestClient,  # type: ignore[type-arg]
    token: str,
    run_worker: RunWorker,
) -> None:
    chat_id = (await (await client.post("/v1/chats", json={"message": "hi"}, headers=bearer(token))).json())["id"]
    await run_worker()
    for _ in range(2):
        response = await client.post(f"/v1/chats/{chat_id}/cancel", headers=bearer(token))
        assert response.status == 202
        assert await response.json() == {"id": chat_id, "status": "complete"}
    result = await (await client.get(f"/v1/chats/{chat_id}", headers=bearer(token))).json()
    assert result["status"] == "complete"
