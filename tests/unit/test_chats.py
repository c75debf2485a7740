"""The stored result: what it holds, and that results stored by earlier releases still decode."""

import msgspec

from streambridge.api.chats import param_of
from streambridge.shared.chats import ChatRequest, ChatResult, decode_result
from streambridge.shared.events import FunctionCall, ToolCall


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
