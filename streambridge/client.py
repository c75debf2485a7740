"""The typed async client: start a chat, then follow its event stream to the end, resuming after drops.

    async with StreambridgeClient("http://127.0.0.1:8000") as client:
        outcome = await client.chat("Hello", on_content=lambda piece, event: print(piece, end=""))

A :class:`ChatStream` reconnects with ``Last-Event-ID`` after a dropped connection, a dead one
(nothing read for ``STREAM_READ_TIMEOUT`` s; the edge sends a heartbeat every 15 s), a 429 or a 5xx,
with exponential backoff and jitter, until ``max_reconnects`` attempts in a row made no progress.
It yields every event once, in order, and stops after the terminal one.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Final, NamedTuple, Self
from urllib.parse import quote

import aiohttp
import msgspec
from yarl import URL

from streambridge.shared.errors import StreambridgeError
from streambridge.shared.events import (
    EVENT_TYPES,
    Cancelled,
    Complete,
    Content,
    Error,
    Event,
    Failed,
    Progress,
    Reasoning,
    Started,
    Status,
    Terminal,
    ToolCall,
    ToolCallFragment,
    Usage,
    assemble_tool_calls,
    decode_event,
)
from streambridge.shared.streams import id_key, is_entry_id
from streambridge.sse import SSEParser

BACKOFF_START: Final = 0.1
BACKOFF_MAX: Final = 2.0
STREAM_READ_TIMEOUT: Final = 45.0
REQUEST_TIMEOUT: Final = 30.0


class ChatCreated(msgspec.Struct, frozen=True):
    id: str
    status: str
    stream_url: str
    created_at: str | float | None = None


class ChatInfo(msgspec.Struct, frozen=True):
    id: str
    status: str
    content: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    attempts: int = 0
    error: str | None = None
    stream_url: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCall] | None = None


class CancelAccepted(msgspec.Struct, frozen=True):
    id: str
    status: str


class Visitor(msgspec.Struct, frozen=True):
    token: str
    user: str = ""


class _ErrorDetail(msgspec.Struct, frozen=True):
    code: str
    message: str


class _ErrorBody(msgspec.Struct, frozen=True):
    error: _ErrorDetail


_encoder: Final = msgspec.json.Encoder()
_created: Final = msgspec.json.Decoder(ChatCreated)
_info: Final = msgspec.json.Decoder(ChatInfo)
_cancel: Final = msgspec.json.Decoder(CancelAccepted)
_visitor: Final = msgspec.json.Decoder(Visitor)
_error: Final = msgspec.json.Decoder(_ErrorBody)


class ClientError(StreambridgeError):
    """The server answered with an error, or the stream could not be resumed.

    ``status`` is the HTTP status, ``None`` when there was no answer (``code`` is then ``stream_lost``).
    """

    def __init__(self, status: int | None, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{status or 'no answer'} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class Received(NamedTuple):
    id: str
    event: Event


class ChatOutcome(NamedTuple):
    chat_id: str
    text: str
    terminal: Terminal
    reconnects: int
    reasoning: str = ""  # the model's reasoning, apart from the answer's text
    tool_calls: tuple[ToolCall, ...] = ()  # the tool calls it made, assembled from their fragments


class StreambridgeClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        session: aiohttp.ClientSession | None = None,
        max_reconnects: int = 20,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.max_reconnects = max_reconnects
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client created it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def login_visitor(self) -> str:
        """Log in as a new anonymous user; the token is kept for later calls and returned."""
        visitor = _visitor.decode(await self._request("POST", "/v1/auth/visitor"))
        self.token = visitor.token
        return visitor.token

    async def create_chat(
        self,
        message: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> ChatCreated:
        if (message is None) == (messages is None):
            raise ValueError("give either message or messages")
        body: dict[str, object] = {"message": message} if messages is None else {"messages": messages}
        options = {"model": model, "temperature": temperature, "max_tokens": max_tokens}
        body.update((name, value) for name, value in options.items() if value is not None)
        return _created.decode(await self._request("POST", "/v1/chats", body))

    async def get_chat(self, chat_id: str) -> ChatInfo:
        return _info.decode(await self._request("GET", f"/v1/chats/{quote(chat_id, safe='')}"))

    async def cancel_chat(self, chat_id: str) -> CancelAccepted:
        return _cancel.decode(await self._request("POST", f"/v1/chats/{quote(chat_id, safe='')}/cancel"))

    def stream(self, chat: ChatCreated | str, *, last_event_id: str | None = None) -> ChatStream:
        """Follow a chat's events: through its ``stream_url``, or by id with the Bearer token.

        With ``last_event_id``, the stream starts after that event (and ``text`` holds only what follows).
        """
        return ChatStream(self, chat, last_event_id=last_event_id)

    async def chat(
        self,
        message: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        on_content: Callable[[str, Content], object] | None = None,
        on_reasoning: Callable[[str, Reasoning], object] | None = None,
        on_tool_call: Callable[[ToolCallFragment], object] | None = None,
        on_progress: Callable[[Progress], object] | None = None,
        on_status: Callable[[Status], object] | None = None,
        on_error: Callable[[Error], object] | None = None,
        on_complete: Callable[[Terminal], object] | None = None,
        on_event: Callable[[Event], object] | None = None,
    ) -> ChatOutcome:
        """Ask, follow the answer to its end and return it. Callbacks may be plain functions or coroutines.

        ``on_content`` gets each piece of the latest attempt (``on_reasoning`` each piece of its reasoning,
        ``on_tool_call`` each fragment of a tool call); when a ``started`` event of a new attempt
        arrives (``on_event``), the pieces shown so far are superseded. ``on_complete`` gets the terminal
        event: ``complete``, ``failed`` or ``cancelled``.
        """
        if self.token is None:
            await self.login_visitor()
        created = await self.create_chat(
            message, messages=messages, model=model, temperature=temperature, max_tokens=max_tokens
        )
        stream = self.stream(created)
        async with stream:
            async for _, event in stream:
                if on_event is not None:
                    await _call(on_event, event)
                if isinstance(event, Content) and on_content is not None:
                    await _call(on_content, event.content, event)
                elif isinstance(event, Reasoning) and on_reasoning is not None:
                    await _call(on_reasoning, event.content, event)
                elif isinstance(event, ToolCallFragment) and on_tool_call is not None:
                    await _call(on_tool_call, event)
                elif isinstance(event, Progress) and on_progress is not None:
                    await _call(on_progress, event)
                elif isinstance(event, Status) and on_status is not None:
                    await _call(on_status, event)
                elif isinstance(event, Error) and on_error is not None:
                    await _call(on_error, event)
        assert stream.terminal is not None
        if on_complete is not None:
            await _call(on_complete, stream.terminal)
        text, reasoning, tool_calls = stream.text, stream.reasoning, tuple(stream.tool_calls)
        return ChatOutcome(created.id, text, stream.terminal, stream.reconnects, reasoning, tool_calls)

    async def _request(self, method: str, path: str, body: object = None) -> bytes:
        headers = {"Accept": "application/json", **self.auth_headers()}
        data = None
        if body is not None:
            data = _encoder.encode(body)
            headers["Content-Type"] = "application/json"
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        url = self.base_url + path
        async with self.session.request(method, url, data=data, headers=headers, timeout=timeout) as response:
            if response.status >= 300:
                raise await _error_from(response)
            return await response.read()


class ChatStream:
    """An async iterator of :class:`Received` events of one chat, resumed after drops, ending at the terminal event.

    Use it in ``async with`` (or call :meth:`aclose`) when you may stop iterating before the end.
    Raises :class:`ClientError` on a 4xx other than 429 (``stream_expired`` when the history is gone:
    the result stays readable with ``get_chat``), or ``stream_lost`` when reconnecting gave up.
    """

    def __init__(self, client: StreambridgeClient, chat: ChatCreated | str, *, last_event_id: str | None) -> None:
        if last_event_id is not None and not is_entry_id(last_event_id):
            raise ValueError(f"not a stream entry id: {last_event_id!r}")
        self.chat_id = chat if isinstance(chat, str) else chat.id
        self.last_event_id = last_event_id
        self.terminal: Terminal | None = None
        self.reconnects = 0
        self._client = client
        self._by_stream_url = not isinstance(chat, str)
        self._url, self._headers = _route(client, self.chat_id, None if isinstance(chat, str) else chat.stream_url)
        self._stale_url = False
        self._parts: dict[int, list[Content | Reasoning | ToolCallFragment]] = {}  # by attempt
        self._attempt = 0
        self._events = self._run()

    @property
    def text(self) -> str:
        """The answer so far: the content of the completed attempt, or of the latest one while running."""
        return "".join(e.content for e in self._parts.get(self._attempt, ()) if isinstance(e, Content))

    @property
    def reasoning(self) -> str:
        """The reasoning so far, of the same attempt as ``text``; not part of the answer."""
        return "".join(e.content for e in self._parts.get(self._attempt, ()) if isinstance(e, Reasoning))

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The tool calls so far, of the same attempt as ``text``, assembled from their fragments."""
        return assemble_tool_calls(self._parts.get(self._attempt, ()))

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Received:
        return await anext(self._events)

    async def aclose(self) -> None:
        await self._events.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _run(self) -> AsyncGenerator[Received, None]:
        failures = 0
        while True:
            retry_after = None
            try:
                if self._stale_url:
                    await self._refresh_url()
                async with aclosing(self._connect()) as events:
                    async for received in events:
                        failures = 0
                        yield received
                if self.terminal is not None:
                    return
                cause: Exception = ConnectionResetError("the stream ended before a terminal event")
            except ClientError as exc:
                if exc.status == 401 and self._can_refresh():
                    self._stale_url = True
                    continue
                if not _retryable(exc.status):
                    raise
                cause, retry_after = exc, exc.retry_after
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                cause = exc
            failures += 1
            if failures > self._client.max_reconnects:
                message = f"gave up after {failures} failed connections in a row: {cause!r}"
                raise ClientError(None, "stream_lost", message) from cause
            self.reconnects += 1
            await asyncio.sleep(max(_backoff(failures), retry_after or 0.0))

    async def _connect(self) -> AsyncGenerator[Received, None]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache", **self._headers}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = self.last_event_id
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=STREAM_READ_TIMEOUT)
        async with self._client.session.get(self._url, headers=headers, timeout=timeout) as response:
            if response.status != 200:
                raise await _error_from(response)
            self._stale_url = False
            parser = SSEParser()
            async for chunk in response.content.iter_any():
                for message in parser.feed(chunk):
                    received = self._accept(message.id, message.event, message.data)
                    if received is not None:
                        yield received
                    if self.terminal is not None:
                        return

    def _accept(self, entry_id: str | None, kind: str, data: str) -> Received | None:
        if entry_id is None or not is_entry_id(entry_id):
            raise ClientError(200, "bad_event_id", f"an event came with the id {entry_id!r}")
        if self.last_event_id is not None and id_key(entry_id) <= id_key(self.last_event_id):
            return None
        self.last_event_id = entry_id
        if kind not in EVENT_TYPES:
            return None  # a type newer than this client: skip it
        event = decode_event(data)
        if isinstance(event, Content | Reasoning | ToolCallFragment):
            self._parts.setdefault(event.attempt, []).append(event)
        if isinstance(event, Started | Content | Reasoning | ToolCallFragment | Complete):
            self._attempt = event.attempt
        if isinstance(event, Complete | Failed | Cancelled):
            self.terminal = event
        return Received(entry_id, event)

    def _can_refresh(self) -> bool:
        return self._by_stream_url and not self._stale_url and self._client.token is not None

    async def _refresh_url(self) -> None:
        """The stream_url's token was refused: ask the API for a fresh one (or fall back to the Bearer route)."""
        info = await self._client.get_chat(self.chat_id)
        self._url, self._headers = _route(self._client, self.chat_id, info.stream_url)


def _route(client: StreambridgeClient, chat_id: str, stream_url: str | None) -> tuple[URL, dict[str, str]]:
    """Where to read a chat's events: its stream_url (which carries a token), else the Bearer route."""
    if stream_url is not None:
        return URL(client.base_url + "/").join(URL(stream_url)), {}
    return URL(f"{client.base_url}/v1/chats/{quote(chat_id, safe='')}/events"), client.auth_headers()


def _retryable(status: int | None) -> bool:
    return status is not None and (status == 429 or status >= 500)


def _backoff(failures: int) -> float:
    delay = min(BACKOFF_MAX, BACKOFF_START * 2 ** (failures - 1))
    return random.uniform(delay / 2, delay)


async def _call(callback: Callable[..., object], *args: object) -> None:
    result = callback(*args)
    if inspect.isawaitable(result):
        await result


async def _error_from(response: aiohttp.ClientResponse) -> ClientError:
    body = await response.read()
    retry_after = _retry_after(response.headers.get("Retry-After"))
    try:
        detail = _error.decode(body).error
    except msgspec.DecodeError:
        text = body.decode(errors="replace").strip()[:200] or response.reason or "no message"
        return ClientError(response.status, f"http_{response.status}", text, retry_after=retry_after)
    return ClientError(response.status, detail.code, detail.message, retry_after=retry_after)


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: a number of seconds or an HTTP date."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
