"""Adapts the openai SDK (any OpenAI-compatible server) to the pipeline's ``Delta`` stream."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any, Final

import aiohttp
import msgspec
import openai
from openai._vendor.httpx_aiohttp.transport import AiohttpTransport as _AiohttpTransport

from streambridge.shared.chats import ChatRequest
from streambridge.shared.events import Usage
from streambridge.workers.pipeline import Delta, Failure, IncompleteStream, ToolCallDelta, UpstreamTimeout

try:  # the SDK's HTTP stack: httpx2 in recent openai releases, httpx before
    import httpx2 as _http
except ImportError:  # pragma: no cover
    import httpx as _http  # type: ignore[no-redef,import-not-found,unused-ignore]

# Statuses worth another attempt; every other 4xx is the request's fault and fails at once.
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429})


def make_client(base_url: str, api_key: str | None) -> openai.AsyncOpenAI:
    """The SDK's client on its aiohttp transport (``openai[aiohttp]``).

    On the default transport (httpx over h11, pure Python) every chunk of a streamed body was an
    h11 event passed up through five async iterators: a third of a worker's CPU at full speed.
    aiohttp parses the body in C and hands over whatever arrived at once (docs/benchmarks.md).
    Retries are ours (announced as events), so the SDK's own are off; its per-read timeout would
    cut long generations, so the pipeline's stall timeouts govern instead.
    """
    timeout = _http.Timeout(None, connect=10.0)
    return openai.AsyncOpenAI(
        base_url=base_url,
        api_key=api_key or "unused",
        max_retries=0,
        timeout=timeout,
        http_client=openai.DefaultAioHttpClient(timeout=timeout),
    )


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    refusal: str | None = None
    # DeepSeek and vLLM name the reasoning text ``reasoning_content``, OpenRouter and newer vLLM ``reasoning``
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    prompt_tokens_details: dict[str, Any] | None = None
    completion_tokens_details: dict[str, Any] | None = None


class _Chunk(msgspec.Struct):
    """The parts of a ``chat.completion.chunk`` the pipeline uses; everything else is skipped."""

    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: dict[str, Any] | None = None


_chunk_decoder: Final = msgspec.json.Decoder(_Chunk)


async def stream_deltas(
    client: openai.AsyncOpenAI, request: ChatRequest, model: str, headers: Mapping[str, str] | None = None
) -> AsyncGenerator[Delta, None]:
    """The completion as deltas. The SDK makes the request (auth, base URL, status errors mapped
    to its exceptions); the body is split into lines here and each chunk decoded with msgspec.

    The request goes through ``client.post``, the SDK's documented way to send a body as given:
    ``chat.completions.create`` first walks every parameter through its TypedDict transform,
    which half of the SDK's 2 ms of CPU per request went to, for a body that is already plain
    JSON (docs/benchmarks.md). Likewise, the SDK's pydantic model per chunk and httpx's line
    decoding each cost a large share of a worker's CPU. ``headers`` go with the request (a
    ``traceparent``: ``shared.trace``).
    """
    body: dict[str, Any] = msgspec.to_builtins(request)
    # a vendor's own fields, at the top level as they came; never in place of a field that was checked
    body = {**(body.pop("extra", None) or {}), **body}
    for message in body["messages"]:  # an earlier reply's reasoning, sent back: upstreams refuse it
        message.pop("reasoning_content", None)
        message.pop("reasoning", None)
    body.update(model=model, stream=True, stream_options={"include_usage": True})
    session = _aiohttp_session(client)
    if session is not None:
        async with await _post(client, session, body, headers) as direct:
            async for data in sse_data(direct.content.iter_any()):
                if data == b"[DONE]":
                    return
                yield delta_from_chunk(data)
        return
    options: openai.RequestOptions = {"headers": dict(headers)} if headers else {}
    response = await client.post("/chat/completions", cast_to=_http.Response, body=body, options=options, stream=True)
    try:
        async for data in sse_data(response.aiter_bytes()):
            if data == b"[DONE]":
                return
            yield delta_from_chunk(data, response.request)
    finally:
        await response.aclose()


def _aiohttp_session(client: openai.AsyncOpenAI) -> aiohttp.ClientSession | None:
    """The aiohttp session under the SDK's aiohttp transport (``make_client``'s), else None.

    Through the SDK, a request cost a worker 1.5 ms of CPU (its options, httpx's request and
    client layers, the transport's adapter), plain aiohttp on the same session 0.44 ms
    (``python -m bench.llm_request``): a tenth of a chat's CPU in the worker (issue 18). The
    session is the SDK's own, made as its transport makes it, so ``client.close()`` still closes
    it. Any other transport (a test's mock, httpx) keeps the SDK's path.
    """
    transport = getattr(client._client, "_transport", None)
    if not isinstance(transport, _AiohttpTransport):
        return None
    if not isinstance(transport.client, aiohttp.ClientSession):
        transport.client = transport.get_client()
    return transport.client


async def _post(
    client: openai.AsyncOpenAI, session: aiohttp.ClientSession, body: dict[str, Any], headers: Mapping[str, str] | None
) -> aiohttp.ClientResponse:
    """The streamed response to ``body``, as the SDK would ask for it; a refusal or an unreachable
    server raise the SDK's own exceptions (``classify`` reads them), made as the SDK makes them."""
    url = f"{client.base_url}chat/completions"
    sent = {**_sdk_headers(client), **(headers or {})}
    try:
        response = await session.post(
            url, data=msgspec.json.encode(body), headers=sent, timeout=_TIMEOUT, auto_decompress=False
        )
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise openai.APITimeoutError(request=_http.Request("POST", url)) from exc
    except aiohttp.ClientError as exc:
        raise openai.APIConnectionError(request=_http.Request("POST", url)) from exc
    if response.status >= 300:
        async with response:
            content = await response.read()
        request = _http.Request("POST", url, headers=sent)
        raise client._make_status_error_from_response(
            _http.Response(response.status, headers=list(response.raw_headers), content=content, request=request)
        )
    return response


#: no limit on a response's length (generations are long), 10 s to connect, as ``make_client``'s
_TIMEOUT: Final = aiohttp.ClientTimeout(total=None, sock_connect=10.0)


def _sdk_headers(client: openai.AsyncOpenAI) -> dict[str, str]:
    """The headers the SDK sends with every request of ``client`` (its auth among them)."""
    found: dict[str, str] = {}
    for name, value in {**client.default_headers, **client.auth_headers}.items():
        if isinstance(value, str):  # not the SDK's ``Omit`` markers
            found[name] = value
    return found


async def sse_data(body: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """The payload of each ``data:`` line of an SSE body, whatever pieces the body arrives in.

    Lines end at CR, LF or CRLF, as the SSE format says, and nowhere else: a chunk's JSON may
    hold U+2028 or U+0085 unescaped, which ``str.splitlines`` (and so httpx's ``aiter_lines``)
    would take for line ends. A CRLF cut between two reads leaves an empty line, which is skipped
    like every line that is not ``data:``.
    """
    tail = b""
    async for piece in body:
        if tail:
            piece = tail + piece
        lines = piece.splitlines()
        tail = b"" if piece.endswith((b"\n", b"\r")) else lines.pop()
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()
    if tail.startswith(b"data:"):
        yield tail[5:].strip()


def delta_from_chunk(data: str | bytes, request: Any = None) -> Delta:
    """One chunk's JSON as a ``Delta``: role-only chunks, empty ``choices`` and usage-only chunks too;
    reasoning (under either name a server uses) and tool call fragments ride along."""
    try:
        chunk = _chunk_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        # msgspec refuses a lone UTF-16 surrogate ("\ud83d"), which servers that split emoji send;
        # the json module keeps it, and the pipeline re-pairs the halves. Bytes that are not
        # UTF-8 become U+FFFD, as a text decoder would make them.
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        chunk = msgspec.convert(json.loads(text), _Chunk)
    if chunk.error is not None:
        # An error the server sent inside the stream (OpenAI, vLLM, LiteLLM do): the stream broke.
        # openai >= 3.60 reads the error's request (its headers): one is needed even where none was sent
        request = request if request is not None else _http.Request("POST", "http://llm/v1/chat/completions")
        raise openai.APIError(str(chunk.error.get("message", chunk.error)), request, body=chunk.error)
    text, reasoning, finish_reason = "", "", None
    tool_calls: tuple[ToolCallDelta, ...] = ()
    for choice in chunk.choices:
        if choice.index == 0:
            finish_reason = choice.finish_reason
            if (delta := choice.delta) is None:
                continue
            # A refusal is the model's answer too; dropping it would "complete" with no text.
            text = delta.content or delta.refusal or ""
            reasoning = delta.reasoning_content or delta.reasoning or ""
            if delta.tool_calls:
                tool_calls = tuple(_tool_call_delta(call) for call in delta.tool_calls)
    usage = None
    if chunk.usage is not None:
        u = chunk.usage
        usage = Usage(
            prompt_tokens=u.prompt_tokens or 0,
            completion_tokens=u.completion_tokens or 0,
            total_tokens=u.total_tokens or 0,
            prompt_tokens_details=_counts(u.prompt_tokens_details),
            completion_tokens_details=_counts(u.completion_tokens_details),
        )
    return Delta(text, finish_reason, usage, reasoning, tool_calls)


def _counts(details: dict[str, Any] | None) -> dict[str, int] | None:
    """A usage breakdown's counts (some upstreams send nulls, or more than counts, in it)."""
    counts = {k: v for k, v in (details or {}).items() if isinstance(v, int) and not isinstance(v, bool)}
    return counts or None


def _tool_call_delta(call: _ToolCall) -> ToolCallDelta:
    function = call.function or _Function()
    return ToolCallDelta(call.index, call.id, function.name, function.arguments or "")


def classify(exc: BaseException) -> Failure:
    """Retryable: connection trouble, timeouts, 5xx, 429 (with ``Retry-After``), a broken stream."""
    if isinstance(exc, openai.APIStatusError):
        retryable = exc.status_code >= 500 or exc.status_code in RETRYABLE_STATUSES
        message = f"LLM answered {exc.status_code}: {_provider_message(exc)}"
        code, param = _error_field(exc, "code"), _error_field(exc, "param")
        return Failure(message, retryable, _retry_after(exc.response.headers), exc.status_code, code, param)
    if isinstance(exc, openai.APIConnectionError):
        unreachable = _connector_error(exc)
        if isinstance(exc, openai.APITimeoutError) and unreachable is None:
            return Failure("LLM request timed out", True)
        return Failure(f"cannot reach the LLM: {unreachable or exc.__cause__ or exc}", True)
    if isinstance(exc, openai.APIError):
        # An error the server sent inside the stream (OpenAI, vLLM and LiteLLM do): a broken stream.
        return Failure(f"the LLM's stream failed: {exc.message}", True)
    if isinstance(exc, UpstreamTimeout | IncompleteStream):
        return Failure(str(exc), True)
    if isinstance(exc, _http.TransportError | aiohttp.ClientError | OSError):
        return Failure(f"the LLM's stream broke: {exc or type(exc).__name__}", True)
    return Failure(f"unexpected error: {type(exc).__name__}: {exc}", False)


def failure_cause(exc: BaseException) -> str:
    """Why an attempt failed, as one of ``shared.metrics.CAUSES``: a bounded label, unlike its message."""
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code == 429:
            return "rate_limited"
        return "server_error" if exc.status_code >= 500 else "client_error"
    if isinstance(exc, UpstreamTimeout | TimeoutError) or (
        isinstance(exc, openai.APITimeoutError) and _connector_error(exc) is None
    ):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, openai.APIError | IncompleteStream | _http.TransportError | aiohttp.ClientError | OSError):
        return "broken_stream"
    return "other"


def _connector_error(exc: BaseException) -> BaseException | None:
    """The refused connection or unknown host behind an SDK error, if that is what it was.

    The SDK's aiohttp transport reports these as a connect *timeout*; the cause it keeps tells.
    """
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, aiohttp.ClientConnectorError):
            return cause
        cause = cause.__cause__
    return None


def _error_field(exc: openai.APIStatusError, name: str) -> str | None:
    """A short string field of the upstream's error body (``code``, ``param``), if it has one."""
    body = exc.body if isinstance(exc.body, dict) else {}
    inner = body.get("error", body)
    value = inner.get(name) if isinstance(inner, dict) else None
    return value[:200] if isinstance(value, str) else None


def _provider_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return exc.message


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    return None
