"""A Responses request's errors name its own fields, not those of the Chat Completions request it is made into."""

from __future__ import annotations

import json

import pytest

from streambridge.api.completions import refused
from streambridge.api.responses_request import parse_responses, renamed, responses_param
from streambridge.shared.errors import BadRequest, Unprocessable
from streambridge.shared.events import Failed


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
        ("verbosity", "text.verbosity"),
        ("reasoning_effort", "reasoning.effort"),
        ("temperature", "temperature"),
        ("top_k", "top_k"),  # a vendor's, named as it was sent
        ("messages_extra", "messages_extra"),
    ],
)
def test_a_chat_completions_param_is_named_as_the_responses_request_names_it(chat_param: str, param: str) -> None:
    assert responses_param(chat_param) == param


def test_an_upstreams_refusal_reaches_a_responses_client_under_the_responses_names() -> None:
    # the upstream refused the Chat Completions request streambridge made: its param is that request's
    end = Failed("bad schema", attempts=1, upstream_status=400, code="invalid_schema", param="response_format")
    answer = json.loads(refused(end, responses_param).text or "")
    assert answer["error"]["param"] == "text.format"
    end = Failed("bad tool", attempts=1, upstream_status=400, param="tools[1].function.parameters")
    assert json.loads(refused(end, responses_param).text or "")["error"]["param"] == "tools[1].parameters"
    assert json.loads(refused(end).text or "")["error"]["param"] == "tools[1].function.parameters"  # chat completions


@pytest.mark.parametrize(
    ("message", "param", "said"),
    [
        ("a chat may have at most 200 messages, not 201", "messages", "a chat may have at most 200 messages, not 201"),
        ("max_tokens may be at most 10, not 11", "max_tokens", "max_output_tokens may be at most 10, not 11"),
        ("`response_format` is nested too deep", "response_format", "`text.format` is nested too deep"),
        (
            "Expected `int` - at `$.max_completion_tokens`",
            "max_completion_tokens",
            "Expected `int` - at `$.max_output_tokens`",
        ),
    ],
)
def test_an_errors_message_names_the_responses_field_where_it_names_the_field(
    message: str, param: str, said: str
) -> None:
    error = renamed(Unprocessable(message, param=param))
    assert (error.message, error.param) == (said, responses_param(param))


def test_verbosity_at_the_top_is_refused_not_laid_over_text_verbosity() -> None:
    with pytest.raises(BadRequest) as refused:
        parse_responses({"input": "hi", "text": {"verbosity": "low"}, "verbosity": "high"})
    assert refused.value.param == "verbosity"
