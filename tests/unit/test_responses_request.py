"""A Responses request's errors name its own fields, not those of the Chat Completions request it is made into."""

from __future__ import annotations

import pytest

from streambridge.api.responses_request import responses_param


@pytest.mark.parametrize(
    ("chat_param", "param"),
    [
        ("tools[0].function.parameters", "tools[0].parameters"),
        ("tools[12].function", "tools[12]"),
        ("tool_choice.function.name", "tool_choice.name"),
        ("messages[3].content", "input"),
        ("messages", "input"),
        ("max_completion_tokens", "max_output_tokens"),
        ("max_tokens", "max_output_tokens"),
        ("response_format.json_schema", "text.format"),
        ("reasoning_effort", "reasoning.effort"),
        ("temperature", "temperature"),
        ("top_k", "top_k"),  # a vendor's, named as it was sent
        ("messages_extra", "messages_extra"),
    ],
)
def test_a_chat_completions_param_is_named_as_the_responses_request_names_it(chat_param: str, param: str) -> None:
    assert responses_param(chat_param) == param
