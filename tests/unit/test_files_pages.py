"""An upload's pages are bounded by bytes as well as by lines."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from streambridge.api.files import PAGE, PAGE_BYTES, Upload
from streambridge.shared.settings import Settings


def _upload() -> Upload:
    ctx: Any = SimpleNamespace(settings=Settings())
    identity: Any = None
    return Upload(ctx, identity, "in.jsonl")


def _line(n: int, size: int) -> bytes:
    # a line the checks refuse (an unknown method) is still kept, and counts toward the page
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * size}]}
    return json.dumps({"custom_id": f"r{n}", "method": "GET", "url": "/v1/chat/completions", "body": body}).encode()


def test_a_page_of_big_lines_is_full_long_before_a_thousand_lines() -> None:
    upload = _upload()
    taken = 0
    while not upload.page_full():
        upload._take(_line(taken, 500_000))
        taken += 1
    assert taken < 10
    assert sum(map(len, upload._raw)) < PAGE_BYTES + 600_000


def test_a_page_of_small_lines_is_full_at_a_thousand_lines() -> None:
    upload = _upload()
    taken = 0
    while not upload.page_full():
        upload._take(_line(taken, 10))
        taken += 1
    assert taken == PAGE
