"""Unit tests of the batch feeder's pieces that need no Redis."""

from __future__ import annotations

import httpx2 as httpx
import msgspec
import openai

from streambridge.workers.batches import _failed


def _status_error(status: int, content: bytes, content_type: str) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://llm/v1/chat/completions")
    response = httpx.Response(status, content=content, headers={"content-type": content_type}, request=request)
    return openai.APIStatusError("upstream error", response=response, body=None)


def test_a_non_json_upstream_error_body_is_kept_as_a_json_string_in_a_valid_line() -> None:
    exc = _status_error(502, b"<html>Bad Gateway</html>", "text/html")
    line = msgspec.json.decode(_failed("req-1", exc, "bad gateway").line)
    assert line["custom_id"] == "req-1"
    assert line["response"]["status_code"] == 502
    assert line["response"]["body"] == "<html>Bad Gateway</html>"


def test_a_json_upstream_error_body_is_kept_as_json() -> None:
    exc = _status_error(400, b'{"error": {"message": "no"}}', "application/json")
    line = msgspec.json.decode(_failed("req-2", exc, "no").line)
    assert line["response"]["body"] == {"error": {"message": "no"}}
