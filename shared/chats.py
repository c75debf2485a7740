"""A chat as stored in Redis: the request the API accepted and the result the worker left.

The chat's hash (``keys.chat``) holds ``owner``, ``created_at``, ``status``, ``request``
(JSON of :class:`ChatRequest`), ``trace`` (its W3C trace context, ``shared.trace``) and, once it
ended, ``result`` (JSON of :class:`ChatResult`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal

import msgspec

from streambridge.shared.events import ToolCall, Usage

Status = Literal["queued", "running", "complete", "failed", "cancelled"]
TERMINAL_STATUSES: Final = frozenset({"complete", "failed", "cancelled"})

Role = Literal["system", "developer", "user", "assistant", "tool"]

#: the most tools, stop sequences and metadata pairs a request may carry (OpenAI's own limits)
MAX_TOOLS: Final = 128
MAX_STOP: Final = 4
MAX_METADATA: Final = 16
MAX_LOGIT_BIAS: Final = 1024

#: OpenAI's metadata: up to 16 pairs, keys of at most 64 characters, values of at most 512
Metadata = Annotated[
    dict[Annotated[str, msgspec.Meta(max_length=64)], Annotated[str, msgspec.Meta(max_length=512)]],
    msgspec.Meta(max_length=MAX_METADATA),
]


class TextPart(msgspec.Struct, tag="text", tag_field="type", frozen=True, forbid_unknown_fields=True):
    text: str


class ImageURL(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    url: Annotated[str, msgspec.Meta(min_length=1)]
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(msgspec.Struct, tag="image_url", tag_field="type", frozen=True, forbid_unknown_fields=True):
    image_url: ImageURL


class AudioPart(msgspec.Struct, tag="input_audio", tag_field="type", frozen=True, forbid_unknown_fields=True):
    input_audio: dict[str, str]


class FilePart(msgspec.Struct, tag="file", tag_field="type", frozen=True, forbid_unknown_fields=True):
    file: dict[str, str]


class RefusalPart(msgspec.Struct, tag="refusal", tag_field="type", frozen=True, forbid_unknown_fields=True):
    refusal: str


Part = TextPart | ImagePart | AudioPart | FilePart | RefusalPart


class Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    role: Role
    content: str | list[Part] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an earlier assistant message's, sent back with their answers
    tool_call_id: str | None = None
    # what an assistant message the SDK sends back may carry besides (``messages.append(reply)``)
    refusal: str | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None
    reasoning_content: str | None = None  # not sent upstream: most refuse it in a request
    reasoning: str | None = None  # likewise

    def text(self) -> str:
        """What the message says in text: its string, or its text parts."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content or () if isinstance(p, TextPart))


class Function(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    function: Function
    type: Literal["function"] = "function"


class ResponseFormat(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """A chat as the upstream will be asked it: OpenAI's Chat Completions request, whichever route
    it came in by. ``extra`` holds the fields of a vendor's own (vLLM's ``top_k``, …), which go to
    the upstream as they came."""

    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    stop: str | Annotated[list[str], msgspec.Meta(max_length=MAX_STOP)] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    logit_bias: (
        Annotated[dict[str, Annotated[float, msgspec.Meta(ge=-100, le=100)]], msgspec.Meta(max_length=MAX_LOGIT_BIAS)]
        | None
    ) = None
    logprobs: bool | None = None  # false or null: streambridge does not return them
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=0)] | None = None
    # OpenAI's levels grow ("none", "xhigh", …) and vendors have their own: a short word
    reasoning_effort: Annotated[str, msgspec.Meta(pattern=r"^[a-z_]{1,16}$")] | None = None
    user: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    metadata: Metadata | None = None
    tools: Annotated[list[Tool], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    extra: dict[str, Any] | None = None


#: a vendor's own field (vLLM's ``top_k``, …): a name like OpenAI's own, passed to the upstream
VENDOR_FIELD: Final = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]{0,63}\Z")

#: the fields a request may carry besides ``extra``'s
REQUEST_FIELDS: Final = frozenset(ChatRequest.__struct_fields__) - {"extra"}


class ChatResult(msgspec.Struct, frozen=True, omit_defaults=True):
    """Fields added later get defaults, so results stored before them still decode."""

    status: Status
    content: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    attempts: int = 0
    error: str | None = None
    reasoning: str | None = None  # the completing attempt's reasoning text, if it sent any
    tool_calls: list[ToolCall] | None = None  # the completing attempt's tool calls, if it made any
    # a failed chat's, when the upstream refused the request: its status, and its error's code and param
    upstream_status: int | None = None
    error_code: str | None = None
    error_param: str | None = None


_request_decoder: Final = msgspec.json.Decoder(ChatRequest)
_result_decoder: Final = msgspec.json.Decoder(ChatResult)


def decode_request(data: bytes | str) -> ChatRequest:
    return _request_decoder.decode(data)


def decode_result(data: bytes | str) -> ChatResult:
    return _result_decoder.decode(data)
