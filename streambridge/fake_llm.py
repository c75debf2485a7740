"""A simulated OpenAI-compatible LLM server: deterministic answers, scriptable failures.

``streambridge up`` runs it when no LLM is configured; tests and benchmarks drive it too.

Per-request behaviour rides in the model name, so one process can script many cases:
``"fake?words=5&fail=drop:3&fail_times=1&delay_ms=1"`` overrides those fields of the base
``FakeLLMConfig`` for that request. The answer to a prompt is always ``expected_text(prompt,
words)``, cut into chunks of 1..6 units that split words, ZWJ sequences, letters from their
combining marks and (with ``split="utf16"``) surrogate pairs. With ``reasoning=N`` it first
streams ``expected_reasoning(prompt, N)`` as ``delta.reasoning_content``; with ``tool=NAME``, or
``tools`` in the request, it answers with one tool call, ``expected_tool_call(prompt, name)``, its
arguments in fragments, and ``finish_reason: "tool_calls"``, in place of the text. With
``echo=1`` the answer is the prompt itself, so a test can choose its text. Made with
``make_app(record=True)`` (tests only: never the CLI's, which ``up`` embeds, since it would keep
users' prompts), ``GET /_requests`` gives the last bodies it was sent (newest last), so a test can
check what reached the upstream.

Chunks are encoded with the stdlib ``json``: msgspec refuses the lone surrogates that the
utf16 mode sends on purpose as ``\\udXXX`` escapes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
import uuid
from collections import deque
from typing import Annotated, Any, Final, NamedTuple, TypeVar
from urllib.parse import parse_qsl

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from streambridge.shared.events import FunctionCall, ToolCall


class FakeLLMConfig(msgspec.Struct, frozen=True, kw_only=True):
    ttft_ms: float = 50.0  # delay before the first chunk of reasoning, text or a tool call
    delay_ms: float = 20.0  # delay between those chunks
    words: int = 40  # length of the answer in words
    # None | "500" | "429" | "400" | "404"
    # | "drop:K" (close the connection after K chunks of reasoning, text or tool call)
    # | "stall" (the role chunk, then nothing) | "stall:K" (stall after K such chunks)
    fail: str | None = None
    fail_times: int = 0  # fail only the first N requests per (fail, prompt); 0 = every request
    split: str = "codepoints"  # "codepoints" | "utf16" (surrogate pairs may be split)
    retry_after: float | None = None  # Retry-After header value for 429
    reasoning: int = 0  # words of reasoning streamed before the answer
    tool: str | None = None  # call this tool in place of answering, as if the request offered it
    # answer with the prompt itself, verbatim: lets a test choose the text (markup a page must not run)
    echo: bool = False
    # each text chunk is "@<epoch seconds> ", the time it is written: a benchmark's client measures
    # upstream → client lag with it (bench/load.py), which the stream ids' clock does not see
    stamp: bool = False


DEFAULT_CONFIG: Final = FakeLLMConfig()

_FAIL: Final = re.compile(r"500|429|400|404|(drop|stall):\d+|stall")
_TOOL_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
_SPLITS: Final = ("codepoints", "utf16")
# Chunk sizes in units (code points or UTF-16 code units), cycled; the same for every prompt.
_SIZES: Final = (3, 1, 4, 1, 5, 2, 6, 2, 1, 3)
_PLAIN: Final = (
    "the", "stream", "bridge", "answer", "token", "river", "quiet", "signal",
    "paper", "light", "north", "window", "resume", "edge", "worker", "queue",
)  # fmt: skip
_AWKWARD: Final = (
    "café",  # precomposed é
    "Straße",  # ß
    "cafe\u0301",  # e + combining acute accent
    "東京",  # CJK
    "数据流",
    "👩\u200d💻",  # ZWJ sequence
    "🇯🇵",  # flag: two regional indicators
    "👍🏽",  # emoji + skin-tone modifier
    "naïve😀",
    "Ωmega",
)
_POLL_S: Final = 0.05
#: how many request bodies ``/_requests`` keeps: a test's few, bounded for a long-running fake
_KEPT_REQUESTS: Final = 50
_Units = TypeVar("_Units", str, bytes)


def expected_text(prompt: str, words: int) -> str:
    """The exact answer to ``prompt``: ``words`` words joined by single spaces; every third is awkward."""
    digest = hashlib.shake_256(prompt.encode("utf-8", "surrogatepass")).digest(words + 1)
    out = []
    for i in range(words):
        if i % 3 == 1:
            out.append(_AWKWARD[(digest[0] + i // 3) % len(_AWKWARD)])
        else:
            out.append(_PLAIN[digest[i + 1] % len(_PLAIN)])
    return " ".join(out)


def expected_reasoning(prompt: str, words: int) -> str:
    """The exact reasoning sent before the answer to ``prompt``: like the answer, but other words."""
    return expected_text(f"reasoning about {prompt}", words)


def expected_tool_call(prompt: str, name: str) -> ToolCall:
    """The exact tool call made for ``prompt`` when offered the tool ``name``: its arguments are the prompt."""
    digest = hashlib.sha256(f"{name}\0{prompt}".encode("utf-8", "surrogatepass")).hexdigest()
    arguments = json.dumps({"query": prompt}, ensure_ascii=False, separators=(",", ":"))
    return ToolCall(id=f"call_{digest[:24]}", function=FunctionCall(name=name, arguments=arguments))


def split_text(text: str, split: str = "codepoints") -> list[str]:
    """Cut ``text`` into the chunks the server sends; ``"".join`` of them gives ``text`` back.

    With ``split="utf16"`` a chunk may end with a lone high surrogate and the next begin with
    the low one; such a join only equals ``text`` after ``.encode("utf-16", "surrogatepass")
    .decode("utf-16")``, just as a client has to do.
    """
    if split == "utf16":
        raw = text.encode("utf-16-le", "surrogatepass")
        return [piece.decode("utf-16-le", "surrogatepass") for piece in _cut(raw, 2)]
    return _cut(text, 1)


def _cut(units: _Units, width: int) -> list[_Units]:
    pieces: list[_Units] = []
    start = 0
    while start < len(units):
        end = start + _SIZES[len(pieces) % len(_SIZES)] * width
        pieces.append(units[start:end])
        start = end
    return pieces


def config_from_model(base: FakeLLMConfig, model: str | None) -> FakeLLMConfig:
    """Apply the ``?key=value&…`` overrides in a model name; raises ValueError on bad ones."""
    if not model or "?" not in model:
        return base
    overrides: dict[str, Any] = {}
    for key, value in parse_qsl(model.partition("?")[2], keep_blank_values=True):
        if key not in FakeLLMConfig.__struct_fields__:
            raise ValueError(f"unknown fake model option {key!r}")
        overrides[key] = value or None
    try:
        config = msgspec.convert(msgspec.structs.asdict(base) | overrides, FakeLLMConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"bad fake model option: {exc}") from None
    check_config(config)
    return config


def check_config(config: FakeLLMConfig) -> None:
    if config.fail is not None and not _FAIL.fullmatch(config.fail):
        raise ValueError(f"fail must be 500, 429, 400, 404, drop:K, stall or stall:K, not {config.fail!r}")
    if config.split not in _SPLITS:
        raise ValueError(f"split must be codepoints or utf16, not {config.split!r}")
    if config.tool is not None and not _TOOL_NAME.fullmatch(config.tool):
        raise ValueError(f"tool must be 1 to 64 letters, digits, _ or -, not {config.tool!r}")
    numbers = (
        config.ttft_ms,
        config.delay_ms,
        config.words,
        config.reasoning,
        config.fail_times,
        config.retry_after or 0,
    )
    if not all(0 <= number < math.inf for number in numbers):
        raise ValueError("numeric fake model options must be finite and not negative")


# The request body, as far as the fake reads it; other fields are ignored.
class _Part(msgspec.Struct):
    type: str
    text: str = ""


class _Message(msgspec.Struct):
    role: str
    content: str | list[_Part] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Function(msgspec.Struct):
    name: str


class _Tool(msgspec.Struct):
    type: str = "function"
    function: _Function | None = None


class _ChatRequest(msgspec.Struct):
    messages: Annotated[list[_Message], msgspec.Meta(min_length=1)]
    model: str = "fake"
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    tools: list[_Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def prompt(self) -> str:
        return next((m.text() for m in reversed(self.messages) if m.role == "user"), "")

    def tool(self) -> str | None:
        """The function tool to call: the first one offered, unless ``tool_choice`` is ``"none"``."""
        if self.tool_choice == "none":
            return None
        return next((t.function.name for t in self.tools or () if t.function is not None), None)

    def usage(self, deltas: list[dict[str, object]]) -> dict[str, object]:
        """A chunk a token, the reasoning's among them, as OpenAI counts them."""
        prompt_tokens = sum(len(m.text().split()) for m in self.messages)
        reasoning = sum("reasoning_content" in delta for delta in deltas)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(deltas),
            "total_tokens": prompt_tokens + len(deltas),
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": None},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }


_decode_request: Final = msgspec.json.Decoder(_ChatRequest)


def _error(
    status: int,
    message: str,
    type_: str,
    headers: dict[str, str] | None = None,
    code: str | None = None,
    param: str | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _sse(data: object, *, ascii_only: bool) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=ascii_only, separators=(',', ':'))}\n\n".encode()


async def _wait_for_disconnect(request: web.Request) -> None:
    # aiohttp offers no disconnect event; polling ends a stall even without handler_cancellation.
    while request.transport is not None and not request.transport.is_closing():  # noqa: ASYNC110
        await asyncio.sleep(_POLL_S)


class _FakeLLM:
    def __init__(self, config: FakeLLMConfig, record: bool) -> None:
        self.config = config
        self.record = record
        self.requests = 0
        self.streams_open = 0
        self.paths: dict[str, int] = {}
        self.attempts: dict[tuple[str, str], int] = {}
        self.bodies: deque[bytes] = deque(maxlen=_KEPT_REQUESTS)

    @web.middleware
    async def count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in {"/_stats", "/_requests"}:
            self.requests += 1
            self.paths[request.path] = self.paths.get(request.path, 0) + 1
        return await handler(request)

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.requests, "streams_open": self.streams_open, "paths": self.paths})

    async def requests_seen(self, request: web.Request) -> web.Response:
        seen = []
        for body in self.bodies:
            try:
                seen.append(json.loads(body))
            except (ValueError, RecursionError):  # not JSON, or nested too deep to show: refused when sent
                seen.append(None)
        return web.json_response(seen)

    async def models(self, request: web.Request) -> web.Response:
        model = {"id": "fake", "object": "model", "created": 0, "owned_by": "streambridge"}
        return web.json_response({"object": "list", "data": [model]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if self.record:
            self.bodies.append(body)
        try:
            chat = _decode_request.decode(body)
            config = config_from_model(self.config, chat.model)
        except (msgspec.DecodeError, ValueError) as exc:
            return _error(400, f"Invalid request: {exc}", "invalid_request_error")
        prompt = chat.prompt()
        fail = self._failure(config, prompt)
        if fail == "500":
            return _error(500, "The fake LLM failed as asked (fail=500).", "server_error")
        if fail == "400":  # a refusal of the request itself, as a prompt too long gets it
            message = "The fake LLM refused the request as asked (fail=400)."
            return _error(400, message, "invalid_request_error", code="context_length_exceeded", param="messages")
        if fail == "404":  # an unknown model, as OpenAI refuses it
            message = "The fake LLM does not know the model, as asked (fail=404)."
            return _error(404, message, "invalid_request_error", code="model_not_found", param="model")
        if fail == "429":
            headers = {} if config.retry_after is None else {"Retry-After": f"{config.retry_after:g}"}
            return _error(429, "The fake LLM is rate limiting as asked (fail=429).", "rate_limit_error", headers)
        answer = _answer(chat, config, prompt)
        if chat.stream:
            return await self._stream(request, chat, config, fail, answer)
        return await self._complete(request, chat, config, fail, answer)

    def _failure(self, config: FakeLLMConfig, prompt: str) -> str | None:
        """The failure this request should show, counting attempts per (fail, prompt)."""
        if config.fail is None:
            return None
        key = (config.fail, prompt)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        if config.fail_times and self.attempts[key] > config.fail_times:
            return None
        return config.fail

    async def _complete(
        self,
        request: web.Request,
        chat: _ChatRequest,
        config: FakeLLMConfig,
        fail: str | None,
        answer: _Answer,
    ) -> web.StreamResponse:
        await asyncio.sleep((config.ttft_ms + config.delay_ms * max(len(answer.deltas) - 1, 0)) / 1000)
        if fail is not None and fail.startswith("stall"):
            await _wait_for_disconnect(request)
            return web.Response()  # never read: the client is gone
        if fail is not None and fail.startswith("drop") and request.transport is not None:
            request.transport.close()
            return web.Response()
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.model,
            "choices": [
                {"index": 0, "message": answer.message, "logprobs": None, "finish_reason": answer.finish_reason}
            ],
            "usage": chat.usage(answer.deltas),
        }
        return web.Response(
            body=json.dumps(body, ensure_ascii=config.split == "utf16"), content_type="application/json"
        )

    async def _stream(
        self,
        request: web.Request,
        chat: _ChatRequest,
        config: FakeLLMConfig,
        fail: str | None,
        answer: _Answer,
    ) -> web.StreamResponse:
        ascii_only = config.split == "utf16"
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": chat.model,
        }

        def chunk(delta: dict[str, object], reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return _sse(base | {"choices": [choice]}, ascii_only=ascii_only)

        deltas = answer.deltas
        fail_kind, _, fail_at = (fail or "").partition(":")
        if fail_kind in ("drop", "stall"):
            deltas = deltas[: int(fail_at or 0)]
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        )
        self.streams_open += 1
        try:
            await response.prepare(request)
            # OpenAI's first chunk: content "" before a text, null before tool calls
            empty = None if answer.finish_reason == "tool_calls" else ""
            await response.write(chunk({"role": "assistant", "content": empty}))
            for index, delta in enumerate(deltas):
                await asyncio.sleep((config.delay_ms if index else config.ttft_ms) / 1000)
                if config.stamp and "content" in delta:
                    delta = {"content": f"@{time.time():.6f} "}
                await response.write(chunk(delta))
            if fail_kind == "drop" and request.transport is not None:
                request.transport.close()  # the client sees a chunked body that never ends properly
            elif fail_kind == "stall":
                await _wait_for_disconnect(request)
            else:
                await response.write(chunk({}, answer.finish_reason))
                if chat.stream_options is not None and chat.stream_options.include_usage:
                    usage = base | {"choices": [], "usage": chat.usage(deltas)}
                    await response.write(_sse(usage, ascii_only=ascii_only))
                await response.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            pass  # the client went away; aiohttp sees the dead transport and moves on
        finally:
            self.streams_open -= 1
        return response


class _Answer(NamedTuple):
    deltas: list[dict[str, object]]  # what the stream sends after the role chunk, one chunk each
    message: dict[str, object]  # the same, as the message of a response that is not streamed
    finish_reason: str


def _answer(chat: _ChatRequest, config: FakeLLMConfig, prompt: str) -> _Answer:
    """Reasoning (if asked for), then the text cut into chunks, or one tool call in fragments."""
    reasoning = expected_reasoning(prompt, config.reasoning)
    deltas: list[dict[str, object]] = [{"reasoning_content": r} for r in split_text(reasoning, config.split)]
    message: dict[str, object] = {"role": "assistant", "content": None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool := config.tool or chat.tool():
        call = expected_tool_call(prompt, tool)
        first = {"index": 0, "id": call.id, "type": "function", "function": {"name": tool, "arguments": ""}}
        deltas.append({"content": None, "tool_calls": [first]})
        for part in split_text(call.function.arguments):
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
        return _Answer(deltas, message | {"tool_calls": [msgspec.to_builtins(call)]}, "tool_calls")
    text = prompt if config.echo else expected_text(prompt, config.words)
    chunks = split_text(text, config.split)
    limit = chat.max_tokens or chat.max_completion_tokens
    finish_reason = "stop"
    if limit is not None and limit < len(chunks):
        chunks, finish_reason = chunks[:limit], "length"
    deltas += ({"content": text} for text in chunks)
    return _Answer(deltas, message | {"content": "".join(chunks)}, finish_reason)


def make_app(config: FakeLLMConfig = DEFAULT_CONFIG, *, record: bool = False) -> web.Application:
    """The simulated LLM; ``record``: it keeps the last request bodies, for ``GET /_requests``."""
    check_config(config)
    fake = _FakeLLM(config, record)
    app = web.Application(middlewares=[fake.count])
    app.router.add_post("/v1/chat/completions", fake.completions)
    app.router.add_get("/v1/models", fake.models)
    app.router.add_get("/_stats", fake.stats)
    if record:
        app.router.add_get("/_requests", fake.requests_seen)
    return app
