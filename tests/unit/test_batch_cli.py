"""The batch CLI's reading of its input file."""

from __future__ import annotations

import json
from pathlib import Path

from streambridge.batch_cli import Input, validation_errors


def _request(custom_id: str) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def test_a_jsonl_file_with_one_malformed_line_is_sent_as_jsonl_for_the_server_to_refuse(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    raw = "\n".join([_request("a"), _request("b"), '{"custom_id": "c", "body": {', _request("d")]) + "\n"
    path.write_text(raw)
    data = Input(path, None)
    assert data.jsonl == raw.encode()
    assert data.ids == ["a", "b", "d"]


def test_plain_text_is_still_prompts(tmp_path: Path) -> None:
    path = tmp_path / "in.txt"
    path.write_text("what is 2+2?\n\n{not json either}\n")
    data = Input(path, "m")
    assert data.ids == ["line-1", "line-3"]
    assert json.loads(data.jsonl.splitlines()[1])["body"]["messages"][0]["content"] == "{not json either}"


def test_a_failed_validation_names_each_bad_line() -> None:
    batch = {"errors": {"object": "list", "data": [{"code": "invalid_json", "message": "not JSON", "line": 3}]}}
    assert validation_errors(batch) == ["line 3: not JSON"]
    assert validation_errors({"errors": None}) == []
