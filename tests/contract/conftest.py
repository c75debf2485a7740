from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from streambridge.shared.redis import connect_streams


@pytest.fixture
async def cluster_client(redis_cluster: Any) -> AsyncIterator[Any]:
    """A client of the session's 6-node cluster (``tests/cluster.py``), as a worker or edge makes it."""
    client = connect_streams(redis_cluster.url, max_connections=8)
    yield client
    await client.aclose()
