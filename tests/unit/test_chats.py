"""The stored result: what it holds, and that results stored by earlier releases still decode."""

import os
import subprocess
import sys
from typing import Literal

import msgspec
import pytest

from streambridge.api.chats import completion_request, param_of
from streambridge.api.credentials import Credential, Identity, Limits, quota
from streambridge.api.limits import check_prompt
from streambridge.shared.chats import ChatRequest, ChatResult, Message, decode_result
from streambridge.shared.errors import Unprocessable
from streambridge.shared.events import FunctionCall, ToolCall
from streambridge.shared.settings import Settings, SettingsError


def test_a_result_stored_before_tool_calls_and_reasoning_still_decodes() -> None:
    old = b'{"status":"complete","content":"hi","finish_reason":"stop","usage":null,"attempts":1,"error":null}'
    assert decode_result(old) == ChatResult(status="complete", content="hi", finish_reason="stop", attempts=1)


def test_tool_calls_and_reasoning_are_stored_when_there_are_some_and_left_out_when_not() -> None:
    call = ToolCall(id="call_1", function=FunctionCall(name="f", arguments='{"a":1}'))
    result = ChatResult(status="complete", finish_reason="tool_calls", attempts=1, reasoning="hmm", tool_calls=[call])
    assert msgspec.json.decode(msgspec.json.encode(result)) == {
        "status": "complete",
        "finish_reason": "tool_calls",
        "attempts": 1,
        "reasoning": "hmm",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}],
    }
    assert decode_result(msgspec.json.encode(result)) == result
    plain = msgspec.json.decode(msgspec.json.encode(ChatResult(status="complete", content="hi")))
    assert "reasoning" not in plain
    assert "tool_calls" not in plain


def test_a_validation_error_names_the_field_as_openais_param_does() -> None:
    def param(value: dict[str, object]) -> str | None:
        try:
            msgspec.convert(value, ChatRequest)
        except msgspec.ValidationError as exc:
            return param_of(exc)
        raise AssertionError("valid")

    assert param({}) == "messages"
    assert param({"messages": [{"content": "x"}]}) == "messages[0].role"
    assert param({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}) == "temperature"


def test_vendor_fields_are_kept_in_the_bodys_order_whatever_the_processs_string_hashing() -> None:
    # A retried create is matched to its first try by the hash of the request as stored: taken
    # through a set, the vendor fields came out in an order each process's hash seed chose, and a
    # retry that reached another process was refused as a reused idempotency key.
    script = (
        "from streambridge.api.chats import completion_request;"
        "import msgspec, sys;"
        "body = {'messages': [{'role': 'user', 'content': 'hi'}], 'top_k': 1, 'min_p': 0.1,"
        " 'repetition_penalty': 1.1, 'seed': 3, 'typical_p': 0.5};"
        "sys.stdout.write(msgspec.json.encode(completion_request(body)[1]).decode())"
    )
    encodings = {
        subprocess.run(
            [sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, check=True
        ).stdout
        for seed in ("1", "2", "3", "4")
    }
    assert len(encodings) == 1
    assert list(msgspec.json.decode(encodings.pop())["extra"]) == ["top_k", "min_p", "repetition_penalty", "typical_p"]


def quota_of(kind: Literal["visitor", "key"], **settings: str) -> Identity:
    credential = Credential("c1", "someone", kind, "hash", "2026-12-03T00:00:00Z", Limits())
    return Identity("someone", "c1", quota(Settings(redis_url="redis://x", **settings), credential))  # type: ignore[arg-type]


def test_vendor_fields_pass_as_the_operator_allows_them() -> None:
    tuned = ChatRequest(messages=[Message(role="user", content="hi")], extra={"top_k": 1, "service_tier": "priority"})
    check_prompt(tuned, quota_of("key"))  # keys: any well-formed name by default
    with pytest.raises(Unprocessable) as refused:
        check_prompt(tuned, quota_of("visitor"))  # visitors: none by default
    assert refused.value.param == "top_k"
    check_prompt(tuned, quota_of("visitor", visitor_vendor_fields="*"))
    with pytest.raises(Unprocessable) as refused:
        check_prompt(tuned, quota_of("key", vendor_fields="top_k, min_p"))
    assert refused.value.param == "service_tier"


def test_a_vendor_field_sent_as_null_is_not_sent() -> None:
    # the SDK sends a keyword given as None as null: not given, so no allowlist refuses it either
    _, chat = completion_request({"messages": [{"role": "user", "content": "hi"}], "service_tier": None, "top_k": 2})
    assert chat.extra == {"top_k": 2}


@pytest.mark.parametrize("listed", ["top_k min_p", "top-k", "top_k,,*,min_p "])
def test_a_vendor_allowlist_is_names_or_star(listed: str) -> None:
    if listed.endswith(" "):  # empty entries and spaces around names are fine
        assert quota_of("key", vendor_fields=listed).quota.vendor_fields is None
        return
    with pytest.raises(SettingsError, match="STREAMBRIDGE_VENDOR_FIELDS"):
        Settings(redis_url="redis://x", vendor_fields=listed)
