"""Refusals leave no garbage cycles: an edge answering scanners' 404s must not build up work for a
full GC pass, which pauses every stream of the process at once."""

from __future__ import annotations

import gc

from aiohttp.test_utils import TestClient


async def test_refused_requests_leave_no_reference_cycles(client: TestClient) -> None:  # type: ignore[type-arg]
    async def refusals() -> None:
        for n in range(50):
            (await client.get(f"/no/such/route/{n}")).release()
            (await client.delete("/v1/chats")).release()  # 405
            (await client.post("/v1/chats", json={"message": "hi"})).release()  # 401

    await refusals()  # warm up: first-use caches are not garbage
    gc.collect()
    gc.disable()
    try:
        await refusals()
        collected = gc.collect()
    finally:
        gc.enable()
    # aiohttp's own router errors keep a small cycle (a SystemRoute and its bound handler); ours
    # kept the whole request, its frames and its reader and writer: ~20 objects each, not ~4
    assert collected < 150 * 8, f"{collected} objects in cycles after 150 refusals"
