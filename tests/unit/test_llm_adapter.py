"""The LLM adapter: chunks as OpenAI-compatible servers send them become ``Delta``s, SDK errors ``Failure``s."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx2
import openai
import pytest

from streambridge.shared.chats import ChatRequest, Message
from streambridge.shared.events import Usage
from streambridge.workers.llm import classify, delta_from_chunk, make_client, sse_data, stream_deltas
from streambridge.workers.pipeline import Delta, Failure, IncompleteStream, ToolCallDelta, UpstreamTimeout

REQUEST = httpx2.Request("POST", "http://x/v1/chat/completions")


def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
    """A chunk's JSON, as an OpenAI-compatible server sends it on a ``data:`` line."""
    return json.dumps(
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": choices} | extra
    )


def choice(delta: dict[str, Any], *, index: int = 0, finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}


# --- delta_from_chunk ---------------------------------------------------------------------------


def test_text_chunk_yields_its_content() -> None:
    assert delta_from_chunk(chunk([choice({"content": "Hel"})])) == Delta(text="Hel")


def test_role_only_first_chunk_yields_no_content() -> None:
    assert delta_from_chunk(chunk([choice({"role": "assistant", "content": ""})])) == Delta()


def test_null_content_yields_empty_text() -> None:
    assert delta_from_chunk(chunk([choice({"role": "assistant", "content": None})])) == Delta()


def test_chunk_with_empty_choices_yields_nothing() -> None:
    # Azure sends content-filter results in chunks like this one.
    azure_filter_chunk = chunk(
        [], prompt_filter_results=[{"prompt_index": 0, "content_filter_results": {"hate": {"filtered": False}}}]
    )
    assert delta_from_chunk(azure_filter_chunk) == Delta()


def test_finish_reason_in_a_chunk_of_its_own() -> None:
    assert delta_from_chunk(chunk([choice({}, finish_reason="stop")])) == Delta(finish_reason="stop")


def test_usage_only_last_chunk_yields_usage() -> None:
    last = chunk([], usage={"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21})
    assert delta_from_chunk(last) == Delta(usage=Usage(prompt_tokens=9, completion_tokens=12, total_tokens=21))


@pytest.mark.parametrize("name", ["reasoning_content", "reasoning"])
def test_reasoning_under_either_name_servers_use_is_kept_apart_from_the_text(name: str) -> None:
    # DeepSeek and vLLM send ``reasoning_content``, OpenRouter and newer vLLM ``reasoning``; both with content null
    assert delta_from_chunk(chunk([choice({name: "Let me see", "content": None})])) == Delta(reasoning="Let me see")


def test_tool_call_fragments_are_read_as_openai_streams_them() -> None:
    first = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    assert delta_from_chunk(chunk([choice({"role": "assistant", "content": None, "tool_calls": [first]})])) == Delta(
        tool_calls=(ToolCallDelta(0, "call_a", "get_weather", ""),)
    )
    later = [{"index": 0, "function": {"arguments": '{"city":'}}, {"index": 1, "id": "call_b", "function": {}}]
    assert delta_from_chunk(chunk([choice({"tool_calls": later})])) == Delta(
        tool_calls=(ToolCallDelta(0, None, None, '{"city":'), ToolCallDelta(1, "call_b", None, ""))
    )


def test_choices_other_than_index_0_are_ignored() -> None:
    assert delta_from_chunk(chunk([choice({"content": "other"}, index=1, finish_reason="stop")])) == Delta()
    both = chunk([choice({"content": "mine"}), choice({"content": "other"}, index=1, finish_reason="length")])
    assert delta_from_chunk(both) == Delta(text="mine")


# --- classify -----------------------------------------------------------------------------------


def status_error(
    cls: type[openai.APIStatusError],
    status: int,
    body: object = None,
    headers: dict[str, str] | None = None,
) -> openai.APIStatusError:
    """The exception as the SDK raises it: the JSON body, the real response, the SDK's own message."""
    if body is None:
        body = {"error": {"message": "bad model", "type": "invalid_request_error"}}
    response = httpx2.Response(status, headers=headers, json=body, request=REQUEST)
    return cls(f"Error code: {status}", response=response, body=body)


@pytest.mark.parametrize(
    ("cls", "status"),
    [
        (openai.InternalServerError, 500),
        (openai.InternalServerError, 502),
        (openai.InternalServerError, 503),
        (openai.RateLimitError, 429),
        (openai.APIStatusError, 408),
    ],
)
def test_server_errors_and_rate_limits_are_retryable(cls: type[openai.APIStatusError], status: int) -> None:
    failure = classify(status_error(cls, status))
    assert failure.retryable
    assert str(status) in failure.message


def test_rate_limit_retry_after_is_honoured() -> None:
    failure = classify(status_error(openai.RateLimitError, 429, headers={"Retry-After": "7"}))
    assert failure.retryable
    assert failure.retry_after == 7.0


def test_retry_after_as_an_http_date_is_ignored_rather_than_fatal() -> None:
    headers = {"Retry-After": "Wed, 21 Oct 2037 07:28:00 GMT"}
    failure = classify(status_error(openai.RateLimitError, 429, headers=headers))
    assert failure.retryable
    assert failure.retry_after is None


@pytest.mark.parametrize(
    ("cls", "status"),
    [
        (openai.BadRequestError, 400),
        (openai.AuthenticationError, 401),
        (openai.PermissionDeniedError, 403),
        (openai.NotFoundError, 404),
        (openai.UnprocessableEntityError, 422),
    ],
)
def test_request_errors_fail_at_once_with_the_providers_message(cls: type[openai.APIStatusError], status: int) -> None:
    failure = classify(status_error(cls, status))
    assert not failure.retryable
    assert "bad model" in failure.message
    assert str(status) in failure.message


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"error": {"message": "bad model"}}, id="openai-wrapped"),
        pytest.param({"message": "bad model", "type": "invalid_request_error"}, id="sdk-unwrapped"),
        pytest.param({"object": "error", "message": "bad model", "code": 400}, id="vllm-top-level"),
    ],
)
def test_providers_message_is_found_in_every_body_shape(body: dict[str, Any]) -> None:
    assert "bad model" in classify(status_error(openai.BadRequestError, 400, body)).message


def test_non_json_error_body_falls_back_to_the_sdks_message() -> None:
    response = httpx2.Response(502, text="<html>Bad Gateway</html>", request=REQUEST)
    exc = openai.InternalServerError("Error code: 502", response=response, body="<html>Bad Gateway</html>")
    failure = classify(exc)
    assert failure.retryable
    assert "502" in failure.message


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(openai.APIConnectionError(request=REQUEST), id="connection"),
        pytest.param(openai.APITimeoutError(request=REQUEST), id="timeout"),
        pytest.param(UpstreamTimeout("no first token from the LLM within 30 s"), id="upstream-timeout"),
        pytest.param(IncompleteStream("the LLM's stream ended without a finish_reason"), id="incomplete"),
        pytest.param(httpx2.RemoteProtocolError("peer closed"), id="remote-protocol"),
    ],
)
def test_transport_trouble_is_retryable(exc: BaseException) -> None:
    failure = classify(exc)
    assert failure.retryable
    assert failure.message


def test_pipeline_timeouts_keep_their_message() -> None:
    assert classify(UpstreamTimeout("no chunk from the LLM within 5 s")).message == "no chunk from the LLM within 5 s"


def test_unexpected_exception_is_not_retryable() -> None:
    failure = classify(ValueError("boom"))
    assert not failure.retryable
    assert "ValueError" in failure.message
    assert "boom" in failure.message


# An error the server sends inside the stream (OpenAI, vLLM, LiteLLM) surfaces as a plain APIError.
def test_mid_stream_server_error_is_retryable() -> None:
    body = {"message": "The server had an error while processing your request.", "type": "server_error"}
    exc = openai.APIError("The server had an error while processing your request.", REQUEST, body=body)
    failure = classify(exc)
    assert failure.retryable
    assert "The server had an error" in failure.message


def test_a_lone_surrogate_a_server_sent_is_kept_for_the_pipeline_to_rejoin() -> None:
    first = '{"choices": [{"index": 0, "delta": {"content": "a\\ud83d"}, "finish_reason": null}]}'
    assert delta_from_chunk(first) == Delta(text="a\ud83d")


def test_an_error_inside_the_stream_raises_a_retryable_api_error() -> None:
    with pytest.raises(openai.APIError) as caught:
        delta_from_chunk('{"error": {"message": "overloaded", "type": "server_error"}}')
    assert classify(caught.value).retryable


# --- sse_data: the body split into lines at the bytes level -------------------------------------


async def pieces(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def data_of(*parts: bytes) -> list[bytes]:
    return [data async for data in sse_data(pieces(*parts))]


async def test_data_lines_are_found_whatever_pieces_the_body_arrives_in() -> None:
    body = b'data: {"a":1}\n\n: keep-alive\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'
    whole = await data_of(body)
    assert whole == [b'{"a":1}', b'{"b":2}', b"[DONE]"]
    assert await data_of(*(body[i : i + 1] for i in range(len(body)))) == whole  # a byte at a time
    assert await data_of(body[:9], body[9:23], body[23:]) == whole


@pytest.mark.parametrize("end", [b"\r\n", b"\r", b"\n"])
async def test_lines_end_at_crlf_cr_or_lf_even_when_a_crlf_is_cut_in_two(end: bytes) -> None:
    body = b"data: 1" + end + end + b"event: x" + end + b"data: 2" + end + end
    assert await data_of(body) == [b"1", b"2"]
    cut = body.index(end) + 1
    assert await data_of(body[:cut], body[cut:]) == [b"1", b"2"]


async def test_a_last_line_without_its_line_end_still_counts() -> None:
    assert await data_of(b"data: 1\n\ndata: 2") == [b"1", b"2"]


async def test_unicode_line_separators_inside_a_chunk_do_not_end_its_line() -> None:
    # JSON may carry U+2028, U+2029 and U+0085 unescaped; str.splitlines (httpx's aiter_lines)
    # would cut the chunk's line there and lose the chunk.
    text = "one\u2028two\u2029three\x85four\x1cfive"
    line = b"data: " + json.dumps({"choices": [choice({"content": text})]}, ensure_ascii=False).encode() + b"\n\n"
    [data] = await data_of(line)
    assert delta_from_chunk(data) == Delta(text=text)


def test_a_chunk_as_bytes_decodes_like_the_same_chunk_as_text() -> None:
    text = chunk([choice({"content": "café 東京 👍🏽"}, finish_reason="stop")])
    assert delta_from_chunk(text.encode()) == delta_from_chunk(text) == Delta("café 東京 👍🏽", "stop")


def test_bytes_that_are_not_utf8_become_replacement_characters() -> None:
    data = b'{"choices": [{"index": 0, "delta": {"content": "a\xffb"}, "finish_reason": null}]}'
    assert delta_from_chunk(data) == Delta(text="a\ufffdb")


def test_a_lone_surrogate_in_bytes_is_kept_for_the_pipeline_to_rejoin() -> None:
    data = b'{"choices": [{"index": 0, "delta": {"content": "a\\ud83d"}, "finish_reason": null}]}'
    assert delta_from_chunk(data) == Delta(text="a\ud83d")


# --- classify: the SDK's aiohttp transport ------------------------------------------------------


def sdk_error(cls: type[openai.APIConnectionError], *chain: BaseException) -> openai.APIConnectionError:
    """``cls`` raised from ``chain[0]``, raised from ``chain[1]``…, as the SDK and its transport chain them."""
    exc = cls(request=REQUEST)
    outer: BaseException = exc
    for cause in chain:
        outer.__cause__ = cause
        outer = cause
    return exc


async def test_a_refused_connection_is_told_as_unreachable_not_as_a_timeout() -> None:
    # The SDK's aiohttp transport reports every aiohttp connection error as httpx's ConnectTimeout.
    async with make_client("http://127.0.0.1:1/v1", None) as client:
        with pytest.raises(openai.APIConnectionError) as caught:
            await anext(stream_deltas(client, ChatRequest(messages=[Message(role="user", content="hi")]), "m"))
    failure = classify(caught.value)
    assert failure.retryable
    assert failure.message.startswith("cannot reach the LLM: Cannot connect to host 127.0.0.1:1")


def test_a_real_connect_timeout_stays_a_timeout() -> None:
    exc = sdk_error(openai.APITimeoutError, httpx2.ConnectTimeout("timed out"), aiohttp.ConnectionTimeoutError())
    assert classify(exc) == Failure("LLM request timed out", True)


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(httpx2.ReadError("Response payload is not completed"), id="mapped-payload-error"),
        pytest.param(aiohttp.ClientPayloadError("Response payload is not completed"), id="payload-error"),
        pytest.param(aiohttp.ServerDisconnectedError(), id="server-disconnected"),
    ],
)
def test_a_body_the_aiohttp_transport_could_not_finish_is_a_broken_stream(exc: BaseException) -> None:
    failure = classify(exc)
    assert failure.retryable
    assert failure.message.startswith("the LLM's stream broke")
