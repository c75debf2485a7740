"""A Responses API request (``POST /v1/responses``), asked of the upstream as a Chat Completions one.

The upstream only needs Chat Completions (every OpenAI-compatible server has it), so a response's
``input`` items become messages, ``instructions`` a system message first, function tools and
``text.format`` their Chat Completions forms. What cannot be served that way (a stored
conversation, built-in tools) is refused with a 400 naming the field, never ignored.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal

import msgspec

from streambridge.api.chats import CONTROL_FIELDS, chat_request, param_of
from streambridge.api.response_stream import Echo
from streambridge.shared.chats import MAX_TOOLS, REQUEST_FIELDS, VENDOR_FIELD, ChatRequest, Metadata
from streambridge.shared.errors import ApiError, BadRequest

#: OpenAI's fields that a response served from Chat Completions cannot honour
UNSUPPORTED: Final = {
    "previous_response_id": "streambridge keeps no conversations: send the earlier turns in `input`",
    "conversation": "streambridge keeps no conversations: send the earlier turns in `input`",
    "prompt": "stored prompts are not supported: send `instructions` and `input`",
    "background_options": "completion windows are not supported",
    "context_management": "context management is not supported",
    "max_tool_calls": "built-in tool calls are not supported",
}


class InputText(msgspec.Struct, tag="input_text", tag_field="type", forbid_unknown_fields=True):
    text: str


class OutputText(msgspec.Struct, tag="output_text", tag_field="type"):
    text: str  # an earlier answer sent back: its annotations and logprobs are of no use upstream


class InputImage(msgspec.Struct, tag="input_image", tag_field="type", forbid_unknown_fields=True):
    image_url: Annotated[str, msgspec.Meta(min_length=1)]
    detail: Literal["auto", "low", "high"] | None = None


class Refusal(msgspec.Struct, tag="refusal", tag_field="type", forbid_unknown_fields=True):
    refusal: str


InputPart = InputText | OutputText | InputImage | Refusal


class MessageItem(msgspec.Struct, tag="message", tag_field="type"):
    role: Literal["user", "system", "developer", "assistant"]
    content: str | Annotated[list[InputPart], msgspec.Meta(min_length=1)]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(msgspec.Struct, tag="function_call", tag_field="type"):
    call_id: Annotated[str, msgspec.Meta(min_length=1)]
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(msgspec.Struct, tag="function_call_output", tag_field="type"):
    call_id: Annotated[str, msgspec.Meta(min_length=1)]
    output: str | list[InputPart]
    id: str | None = None
    status: str | None = None


class ReasoningItem(msgspec.Struct, tag="reasoning", tag_field="type"):
    """An earlier response's reasoning sent back with its output: not for the upstream (most
    refuse it), so it is dropped."""

    id: str | None = None


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem


class FunctionTool(msgspec.Struct, tag="function", tag_field="type", forbid_unknown_fields=True, omit_defaults=True):
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoice(msgspec.Struct, tag="function", tag_field="type", forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class TextFormat(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextOptions(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningOptions(msgspec.Struct, forbid_unknown_fields=True):
    effort: Annotated[str, msgspec.Meta(pattern=r"^[a-z_]{1,16}$")] | None = None
    summary: str | None = None  # reasoning comes back as its text, not summarised
    generate_summary: str | None = None


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_obfuscation: bool | None = None  # nothing is padded


class ResponsesRequest(msgspec.Struct, forbid_unknown_fields=True):
    input: str | list[Item]
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    instructions: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    background: bool | None = False
    store: bool | None = True
    max_output_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    tools: Annotated[list[FunctionTool], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    metadata: Metadata | None = None
    user: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    safety_identifier: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    prompt_cache_key: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    service_tier: str | None = None
    text: TextOptions | None = None
    reasoning: ReasoningOptions | None = None
    truncation: Literal["disabled"] | None = None
    include: Annotated[list[str], msgspec.Meta(max_length=0)] | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=0)] | None = None


RESPONSES_FIELDS: Final = frozenset(ResponsesRequest.__struct_fields__)
#: what the upstream's Chat Completions request is made of: never a vendor's field here
CHAT_FIELDS: Final = (
    REQUEST_FIELDS
    | CONTROL_FIELDS
    | {"extra", "functions", "function_call", "modalities", "audio", "prediction", "web_search_options", "verbosity"}
) - RESPONSES_FIELDS


def parse_responses(fields: dict[str, Any]) -> tuple[ResponsesRequest, ChatRequest, Echo]:
    """The request, the chat it asks of the upstream, and what its response object repeats of it."""
    for name, why in UNSUPPORTED.items():
        if fields.get(name) is not None:
            raise BadRequest(f"`{name}` is not supported: {why}", code="unsupported_parameter", param=name)
    extra = {k: fields.pop(k) for k in list(fields) if k not in RESPONSES_FIELDS}  # in the body's order: hashed
    extra = {k: v for k, v in extra.items() if v is not None}  # null: not given (the SDK sends a None as null)
    bad = next((k for k in extra if not VENDOR_FIELD.match(k)), None)
    if bad is not None:
        raise BadRequest(f"`{bad[:64]}` is not a field name", code="invalid_request", param=bad[:64])
    shadowing = sorted(extra.keys() & CHAT_FIELDS)
    if shadowing:  # a Chat Completions field sent as a vendor's would go round the checks of its Responses twin
        name = shadowing[0]
        message = (
            f"`{name}` is a Chat Completions field; the Responses API has its own (`input`, `max_output_tokens`, …)"
        )
        raise BadRequest(message, code="unsupported_parameter", param=name)
    if isinstance(fields.get("input"), list):
        # OpenAI's "easy" message, {role, content}, has no type
        fields["input"] = [_typed(item) for item in fields["input"]]
    tools = fields.get("tools")
    for n, tool in enumerate(tools if isinstance(tools, list) else ()):  # not a list: the schema says so
        if isinstance(tool, dict) and tool.get("type") != "function":
            kind = tool.get("type")
            raise BadRequest(
                f"only function tools are supported, not {kind!r}",
                code="unsupported_parameter",
                param=f"tools[{n}].type",
            )
    try:
        request = msgspec.convert(fields, ResponsesRequest)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid request: {exc}", code="invalid_request", param=param_of(exc)) from None
    _check_format(request)
    if request.background and request.store is False:
        raise BadRequest(
            "a background response must be stored: `store` cannot be false", code="invalid_request", param="store"
        )
    try:
        chat = chat_request(_chat_fields(request, extra))
    except ApiError as exc:
        raise renamed(exc) from None
    return request, chat, _echo(request)


#: a field of the Chat Completions request a Responses request is made into, and its name in the
#: latter (a message's index is not its item's: instructions come first, and calls are merged)
RENAMES: Final = (
    (re.compile(r"\Atools\[(\d+)\]\.function\b"), r"tools[\1]"),
    (re.compile(r"\Atool_choice\.function\b"), "tool_choice"),
    (re.compile(r"\Amessages\b.*"), "input"),
    (re.compile(r"\Amax_(completion_)?tokens\Z"), "max_output_tokens"),
    (re.compile(r"\Aresponse_format(\.json_schema)?\b"), "text.format"),
    (re.compile(r"\Areasoning_effort\Z"), "reasoning.effort"),
    (re.compile(r"\Averbosity\Z"), "text.verbosity"),
)


def responses_param(param: str) -> str:
    """``param`` as the Responses request names it: ``tools[0].function.parameters`` is its
    ``tools[0].parameters``."""
    for pattern, name in RENAMES:
        new, found = pattern.subn(name, param, count=1)
        if found:
            return new
    return param


def renamed(exc: ApiError) -> ApiError:
    """An error about the Chat Completions request, naming the Responses request's fields."""
    if exc.param is not None:
        old, name = exc.param, responses_param(exc.param)
        # where the message names the field (quoted, msgspec's `$.path`, or first), not every word
        # that happens to match ("at most 200 messages" stays)
        message = exc.message.replace(f"`{old}`", f"`{name}`").replace(f"`$.{old}`", f"`$.{name}`")
        if message.startswith(f"{old} "):
            message = name + message[len(old) :]
        exc.message, exc.param = message, name
    return exc


def _check_format(request: ResponsesRequest) -> None:
    text_format = request.text.format if request.text is not None else None
    if text_format is not None and text_format.type == "json_schema":
        for name in ("name", "schema"):
            if getattr(text_format, name) is None:
                message = f"a json_schema format needs its `{name}`"
                raise BadRequest(message, code="invalid_request", param=f"text.format.{name}")


def _typed(item: Any) -> Any:
    if isinstance(item, dict) and "type" not in item and "role" in item:
        return {**item, "type": "message"}
    return item


def _chat_fields(request: ResponsesRequest, extra: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {"messages": _messages(request)}
    for name in ("model", "temperature", "top_p", "parallel_tool_calls", "metadata"):
        value = getattr(request, name)
        if value is not None:
            fields[name] = value
    if request.max_output_tokens is not None:
        fields["max_completion_tokens"] = request.max_output_tokens
    if request.user or request.safety_identifier:
        fields["user"] = request.user or request.safety_identifier
    if request.tools:
        fields["tools"] = [{"type": "function", "function": _function(t)} for t in request.tools]
    if isinstance(request.tool_choice, ToolChoice):
        fields["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice.name}}
    elif request.tool_choice is not None:
        fields["tool_choice"] = request.tool_choice
    fields.update(_answer_format(request))
    passed = {k: getattr(request, k) for k in ("prompt_cache_key", "service_tier") if getattr(request, k)}
    if request.text is not None and request.text.verbosity is not None:
        passed["verbosity"] = request.text.verbosity
    if extra or passed:
        fields["extra"] = {**passed, **extra}
    return fields


def _answer_format(request: ResponsesRequest) -> dict[str, Any]:
    """``text.format`` and ``reasoning.effort`` as Chat Completions names them."""
    fields: dict[str, Any] = {}
    text_format = request.text.format if request.text is not None else None
    if text_format is not None and text_format.type == "json_schema":
        schema = {k: v for k, v in msgspec.to_builtins(text_format).items() if k != "type"}
        fields["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif text_format is not None and text_format.type == "json_object":
        fields["response_format"] = {"type": "json_object"}
    if request.reasoning is not None and request.reasoning.effort is not None:
        fields["reasoning_effort"] = request.reasoning.effort
    return fields


def _function(tool: FunctionTool) -> dict[str, Any]:
    return {k: v for k, v in msgspec.to_builtins(tool).items() if k != "type"}


def _messages(request: ResponsesRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    if isinstance(request.input, str):
        return [*messages, {"role": "user", "content": request.input}]
    for n, item in enumerate(request.input):
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": _content(item.content, item.role, f"input[{n}]")})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls: one assistant message, as Chat Completions has it
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else _text(item.output)
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    if not messages:
        raise BadRequest("`input` holds no message", code="invalid_request", param="input")
    return messages


def _content(content: str | list[InputPart], role: str, param: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if role != "user" or not any(isinstance(p, InputImage) for p in content):
        return _text(content)  # only a user's message may hold images, and text alone is what every upstream takes
    parts: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, InputImage):
            image = {"url": part.image_url} | ({"detail": part.detail} if part.detail else {})
            parts.append({"type": "image_url", "image_url": image})
        else:
            parts.append({"type": "text", "text": part.refusal if isinstance(part, Refusal) else part.text})
    return parts


def _text(parts: list[InputPart]) -> str:
    return "".join(p.refusal if isinstance(p, Refusal) else p.text for p in parts if not isinstance(p, InputImage))


def _echo(request: ResponsesRequest) -> Echo:
    echo = Echo(
        model=request.model,
        instructions=request.instructions,
        background=bool(request.background),
        store=request.store is not False,
        max_output_tokens=request.max_output_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        tools=[msgspec.to_builtins(t) for t in request.tools or ()],
        parallel_tool_calls=request.parallel_tool_calls is not False,
        metadata=request.metadata or {},
        user=request.user,
        safety_identifier=request.safety_identifier,
        prompt_cache_key=request.prompt_cache_key,
        service_tier=request.service_tier,
    )
    if request.tool_choice is not None:
        echo.tool_choice = msgspec.to_builtins(request.tool_choice)
    if request.text is not None and request.text.format is not None:
        echo.text = {"format": msgspec.to_builtins(request.text.format)}
    if request.reasoning is not None:
        echo.reasoning = {"effort": request.reasoning.effort, "summary": request.reasoning.summary}
    return echo
