"""``GET /openapi.json``: an OpenAPI 3.1 document of every route, its answers and its errors.

The bodies' schemas come from the msgspec Structs that encode and decode them (``api.chats``,
``api.errors``, ``shared.events``), so the document cannot disagree with the wire. The document
is built and encoded once, at import. It describes the whole system: a process started with
``streambridge api`` serves the API's routes, ``streambridge edge`` the event stream, and
``streambridge up`` both on one port; every process serves ``/healthz`` and this document.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final, get_args

import msgspec
from aiohttp import web

from streambridge.api import openapi_batches
from streambridge.api.chats import ChatView, Created, StatusView, Visitor
from streambridge.api.errors import ErrorAnswer
from streambridge.api.page import FILES
from streambridge.api.responses_request import ResponsesRequest
from streambridge.shared.chats import ChatRequest
from streambridge.shared.events import Event

routes = web.RouteTableDef()

Json = dict[str, Any]

OPENAPI_VERSION: Final = "3.1.0"
REF: Final = "#/components/schemas/{name}"
CHAT_ID_PATTERN: Final = "^[0-9a-f]{32}$"
STREAM_ID_PATTERN: Final = "^[0-9]{1,20}-[0-9]{1,20}$"

DESCRIPTION: Final = """\
Reliable, resumable delivery of LLM output. `POST /v1/chats` queues a chat; a worker streams the
completion into the chat's event stream; `GET /v1/chats/{id}/events` (an SSE edge) delivers it,
resumable with `Last-Event-ID` on any edge.

`streambridge api` serves the API's routes, `streambridge edge` the event stream, and
`streambridge up` both on one port. Every process serves `GET /healthz` and this document.

Every error, on every route, is `{"error": {"code": "snake_case", "message": "a sentence", "type": …,
"param": …}}` (`ErrorAnswer`): `type` as OpenAI's error body has it (`invalid_request_error`,
`authentication_error`, `not_found_error`, `rate_limit_error`, `server_error`, …) and `param` the
request field at fault, or null. Never HTML or a traceback. Besides the answers each operation
lists, any path that is not a route answers 404 `not_found`, and a method a route does not take
answers 405 `method_not_allowed` with `Allow`. A 429 or an `overloaded` 503 carries `Retry-After` (seconds)."""


def _package_version() -> str:
    try:
        return version("streambridge")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0.0.0"


def ref(name: str) -> Json:
    return {"$ref": REF.format(name=name)}


def json_content(schema: Json, **extra: Any) -> Json:
    return {"application/json": {"schema": schema, **extra}}


RETRY_AFTER: Final = {
    "description": "Seconds to wait before trying again.",
    "schema": {"type": "integer", "minimum": 0},
}


def error(description: str, codes: dict[str, str], *, retry_after: bool | None = None, upstream: bool = False) -> Json:
    """An error answer: ``ErrorAnswer``, its ``code`` one of ``codes`` (code → when it is sent), or
    with ``upstream`` also the upstream's own code, passed on as it gave it.

    ``retry_after``: ``True`` if every such answer has ``Retry-After``, ``False`` if some do.
    """
    lines = "\n".join(f"- `{code}`: {when}" for code, when in codes.items())
    if upstream:
        lines += "\n- any other code: the upstream's own, with its `param`, as it refused the request"
    code = {"type": "string", "examples": list(codes)} if upstream else {"enum": list(codes)}
    narrowed = {
        "type": "object",
        "properties": {"error": {"type": "object", "properties": {"code": code}}},
    }
    answer: Json = {
        "description": f"{description}\n\n{lines}",
        "content": json_content({"allOf": [ref("ErrorAnswer"), narrowed]}),
    }
    if retry_after is not None:
        answer["headers"] = {"Retry-After": {**RETRY_AFTER, "required": retry_after}}
    return answer


IDEMPOTENCY_KEY: Final = {
    "name": "Idempotency-Key",
    "in": "header",
    "description": "Makes the create safe to retry: the same key from the same user within 24 h "
    "(or `STREAMBRIDGE_RESULT_TTL`, if shorter) answers with the chat the first request made.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x21-\\x7e]+$"},
}
UNAUTHORIZED: Final = error(
    "No valid credentials.",
    {"unauthorized": "no `Authorization: Bearer` token, or one that is unknown, expired or revoked"},
)
NOT_FOUND: Final = error(
    "No such chat for this caller.",
    {
        "not_found": "the chat does not exist or belongs to another user (both look the same); an `id` that is "
        "not 32 lowercase hex characters names no chat"
    },
)
REDIS_UNAVAILABLE: Final = {"redis_unavailable": "the service's Redis is unreachable; retry shortly"}
UNAVAILABLE: Final = error("The service cannot answer now.", REDIS_UNAVAILABLE)

CHAT_ID: Final = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "The chat's id, as `POST /v1/chats` returned it: 32 lowercase hex characters.",
    "schema": {"type": "string", "pattern": CHAT_ID_PATTERN},
}

RESPONSE_ID_PATTERN: Final = "^resp_[0-9a-f]{32}$"
RESPONSE_ID: Final = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "The response's id, `resp_` and its chat's id (any chat can be read as a response).",
    "schema": {"type": "string", "pattern": RESPONSE_ID_PATTERN},
}

BEARER: Final[list[Json]] = [{"bearer": []}]
PUBLIC: Final[list[Json]] = []


def healthz() -> Json:
    return {
        "get": {
            "operationId": "healthz",
            "summary": "Health: whether this process reaches Redis",
            "description": "Served by every process (api, edge, `up`).",
            "tags": ["meta"],
            "security": PUBLIC,
            "responses": {
                "200": {"description": "Redis answers.", "content": json_content(ref("Health"))},
                "503": UNAVAILABLE,
            },
        }
    }


def readyz() -> Json:
    return {
        "get": {
            "operationId": "readyz",
            "summary": "Readiness: whether this process serves, and reaches Redis",
            "description": "Served by every process (api, edge, `up`, and a worker on its metrics port). 503 while "
            "the process starts or shuts down, or when Redis does not answer a PING within a second; `/healthz` "
            "is the liveness check.",
            "tags": ["meta"],
            "security": PUBLIC,
            "responses": {
                "200": {"description": "Ready.", "content": json_content(ref("Readiness"))},
                "503": error(
                    "Not ready: the answer also has `status` (`not_ready`) and `checks`, what each check found.",
                    {"not_ready": "starting, shutting down, or Redis unreachable"},
                ),
            },
        }
    }


def metrics_path() -> Json:
    return {
        "get": {
            "operationId": "metrics_page",
            "summary": "Prometheus metrics",
            "description": "Prometheus's text format (`text/plain; version=0.0.4`); the README lists every metric. "
            "Served by every process (api, edge, `up`, and a worker on its metrics port).",
            "tags": ["meta"],
            "security": PUBLIC,
            "responses": {
                "200": {
                    "description": "This process's metrics.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "404": error(
                    "Metrics are off.", {"metrics_disabled": "the process runs with `STREAMBRIDGE_METRICS=false`"}
                ),
            },
        }
    }


def visitor() -> Json:
    return {
        "post": {
            "operationId": "visitor_login",
            "summary": "Create an anonymous user (a guest login)",
            "description": "No body. The token (`sbv_…`) is valid for `STREAMBRIDGE_VISITOR_TOKEN_TTL` seconds "
            "and goes in `Authorization: Bearer` on every other `/v1/` route.",
            "tags": ["auth"],
            "security": PUBLIC,
            "responses": {
                "201": {"description": "A new visitor and its token.", "content": json_content(ref("Visitor"))},
                "429": error(
                    "Too many logins from this address; `Retry-After` says when to try again.",
                    {
                        "rate_limited": "the client's address made `STREAMBRIDGE_VISITOR_LOGINS_PER_MINUTE` visitor "
                        "logins this minute already"
                    },
                    retry_after=True,
                ),
                "503": UNAVAILABLE,
            },
        }
    }


def chat_links() -> Json:
    by_id = {"id": "$response.body#/id"}
    return {
        "read_chat": {"operationId": "read_chat", "parameters": by_id, "description": "The chat's state."},
        "cancel_chat": {"operationId": "cancel_chat", "parameters": by_id, "description": "Cancel the chat."},
        "chat_events": {"operationId": "chat_events", "parameters": by_id, "description": "The chat's events."},
    }


def create_chat_schema(request: Json) -> Json:
    """``ChatRequest`` as ``POST /v1/chats`` takes it: the body ``POST /v1/chat/completions`` takes,
    ``messages`` or the shorthand ``message``, with ``stream`` true or left out (the answer is always
    a stream, at ``GET /v1/chats/{id}/events``)."""
    properties = completion_request_schema(request)["properties"]
    properties["stream"] = {
        "enum": [True, None],
        "description": "Taken, and needless: the chat's events always stream (false is refused).",
    }
    properties["stream_options"] = {
        **properties["stream_options"],
        "description": "Taken and ignored: the `complete` event always carries `usage`.",
    }
    properties["message"] = {"type": "string", "minLength": 1, "description": "Shorthand: one user message."}
    return {**request, "title": "CreateChat", "properties": properties, "required": []}


def completion_request_schema(request: Json) -> Json:
    """``ChatRequest`` as ``POST /v1/chat/completions`` takes it: OpenAI's fields, the answer's
    (``stream``, ``stream_options``, ``n``), and any other field, for the upstream."""
    properties = {k: v for k, v in request["properties"].items() if k != "extra"}
    properties["stream"] = {"type": ["boolean", "null"]}
    properties["stream_options"] = {
        "type": ["object", "null"],
        "properties": {
            "include_usage": {"type": ["boolean", "null"]},
            "include_obfuscation": {"type": ["boolean", "null"]},
        },
        "additionalProperties": False,
    }
    properties["n"] = {"enum": [1, None]}
    return {**request, "title": "ChatCompletionRequest", "properties": properties}


def create_chat_body() -> Json:
    # CreateChat's fields are each optional; exactly one of `messages` and `message` must be sent.
    one_of = [
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
        {"required": ["message"], "properties": {"message": {"type": "string"}}},
    ]
    examples = {
        "shorthand": {"value": {"message": "Tell me about rivers."}},
        "messages": {
            "value": {
                "messages": [
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "Tell me about rivers."},
                ],
                "temperature": 0.2,
                "max_tokens": 256,
            }
        },
    }
    return {
        "required": True,
        "description": "A Chat Completions request as OpenAI's API takes it, the same body as "
        "`POST /v1/chat/completions` (`messages`, `model`, `temperature`, `max_tokens`, `tools`, `response_format`, "
        "…; any field that is not OpenAI's goes to the upstream as a vendor's, so it must be named like one), or "
        "the shorthand `message` (one user message) in place of `messages`. Limits beyond this schema "
        "(`STREAMBRIDGE_MAX_MESSAGES`, `STREAMBRIDGE_MAX_PROMPT_CHARS`, `STREAMBRIDGE_MAX_TOKENS_CAP`, "
        "`STREAMBRIDGE_MAX_BODY_BYTES`) are the operator's and answer 422 or 413.",
        "content": json_content({"allOf": [ref("CreateChat")], "oneOf": one_of}, examples=examples),
    }


def chats() -> Json:
    return {
        "post": {
            "operationId": "create_chat",
            "summary": "Queue a chat",
            "description": "Answers at once; the chat runs on a worker. Follow `stream_url` (it carries a token "
            "scoped to this chat, for clients such as `EventSource` that cannot set headers) or "
            "`GET /v1/chats/{id}/events` with the bearer token.",
            "tags": ["chats"],
            "security": BEARER,
            "parameters": [IDEMPOTENCY_KEY],
            "requestBody": create_chat_body(),
            "responses": {
                "202": {
                    "description": "Queued; or, for a repeated `Idempotency-Key`, the chat its first request made.",
                    "headers": {
                        "Idempotent-Replayed": {
                            "description": "`true` when the answer is an earlier request's chat",
                            "schema": {"const": "true"},
                        }
                    },
                    "content": json_content(ref("Created")),
                    "links": chat_links(),
                },
                "400": error(
                    "The body is not JSON, or the `Idempotency-Key` is malformed.",
                    {
                        "malformed_json": "the body is not UTF-8 JSON",
                        "bad_idempotency_key": "`Idempotency-Key` is empty, over 255 characters or not printable ASCII",
                    },
                ),
                "401": UNAUTHORIZED,
                "408": error(
                    "The body came too slowly.",
                    {"request_timeout": "the body was not received within `STREAMBRIDGE_BODY_TIMEOUT` seconds"},
                ),
                "413": error(
                    "The body is too large.",
                    {"payload_too_large": "the body is larger than `STREAMBRIDGE_MAX_BODY_BYTES`"},
                ),
                "422": error(
                    "Valid JSON of the wrong shape.",
                    {
                        "invalid_request": "not the shape above (a wrong type, a field not named like one, both or "
                        "neither of `messages` and `message`, `n` other than 1), or over a prompt limit (the "
                        "credential's, by default "
                        "`STREAMBRIDGE_MAX_MESSAGES`, `STREAMBRIDGE_MAX_PROMPT_CHARS`, "
                        "`STREAMBRIDGE_MAX_TOKENS_CAP`)",
                        "unsupported_parameter": "`logprobs`: streambridge does not return them; `stream: false`: "
                        "the answer is always a stream here (`POST /v1/chat/completions` waits for it whole)",
                        "idempotency_key_reused": "the `Idempotency-Key` was used by this user for a different request",
                    },
                ),
                "429": error(
                    "Over a per-user limit; `Retry-After` says when to try again.",
                    {
                        "rate_limited": "the user created its chats-per-minute already (the credential's limit; "
                        "by default `STREAMBRIDGE_CHATS_PER_MINUTE` for API keys, "
                        "`STREAMBRIDGE_VISITOR_CHATS_PER_MINUTE` for visitors)",
                        "too_many_chats": "the user has its most chats queued or running at once (the "
                        "credential's limit; by default `STREAMBRIDGE_MAX_RUNNING_CHATS`, "
                        "`STREAMBRIDGE_VISITOR_MAX_RUNNING_CHATS` for visitors)",
                    },
                    retry_after=True,
                ),
                "503": error(
                    "The service cannot take the chat now.",
                    {
                        **REDIS_UNAVAILABLE,
                        "overloaded": "`STREAMBRIDGE_MAX_QUEUE_DEPTH` chats wait for a worker; sent with `Retry-After`",
                    },
                    retry_after=False,
                ),
            },
        }
    }


def chat() -> Json:
    return {
        "parameters": [ref_parameter("ChatId")],
        "get": {
            "operationId": "read_chat",
            "summary": "A chat's state and result",
            "description": "While the chat runs, `content` is the text streamed so far (and `reasoning` and "
            "`tool_calls` what the model sent of them, when it sent any); while it waits, "
            "`queue_position` is its place in the queue (1: the next to start). Every answer carries a "
            "fresh `stream_url`, so a client whose stream token expired gets a new one. Answers for "
            "`STREAMBRIDGE_RESULT_TTL` seconds after the chat ended.",
            "tags": ["chats"],
            "security": BEARER,
            "responses": {
                "200": {"description": "The chat.", "content": json_content(ref("ChatView"))},
                "401": UNAUTHORIZED,
                "404": NOT_FOUND,
                "503": UNAVAILABLE,
            },
        },
    }


def cancel() -> Json:
    return {
        "parameters": [ref_parameter("ChatId")],
        "post": {
            "operationId": "cancel_chat",
            "summary": "Cancel a chat (idempotent)",
            "description": "No body. A queued chat never runs; a running one ends with a `cancelled` event. "
            "`status` is the chat's status when the request arrived; cancelling an ended chat changes nothing.",
            "tags": ["chats"],
            "security": BEARER,
            "responses": {
                "202": {"description": "Cancelling, or already ended.", "content": json_content(ref("StatusView"))},
                "401": UNAUTHORIZED,
                "404": NOT_FOUND,
                "503": UNAVAILABLE,
            },
        },
    }


EVENTS_DESCRIPTION: Final = """\
Served by the edge. `Content-Type: text/event-stream`; each event is

    id: <the Redis stream entry id, e.g. 1732400000000-0>
    event: <type>
    data: <one line of JSON whose "type" equals the event's type>

followed by an empty line (`SSEEvent`; `data` is an `Event`). The history comes first, then live
events; the response ends after a terminal event (`complete`, `failed` or `cancelled`), so a client
that connects after the end gets the whole history, then the close. An idle stream gets a comment
line `: ping` every `STREAMBRIDGE_HEARTBEAT_INTERVAL` (≤ 15) seconds. A response also ends, after a
comment line saying why, once open `STREAMBRIDGE_STREAM_MAX_LIFETIME` seconds or without an event for
`STREAMBRIDGE_STREAM_IDLE_TIMEOUT` seconds: the client resumes where it was.

Resume with `Last-Event-ID: <id>` (or `?last_event_id=<id>` for clients that cannot set headers):
exactly the events after that id, on any edge. Without either, the stream starts at the beginning.

Auth: the `token` query parameter of `stream_url` (scoped to this chat, short-lived), or the owner's
`Authorization: Bearer` token (which wins when both are sent)."""


RESUME_AT: Final = {"anyOf": [ref("StreamId"), {"const": ""}]}
#: a finish chunk's cursor, where a usage chunk of the same entry follows it
FINISH_CURSOR: Final = {"type": "string", "pattern": STREAM_ID_PATTERN.removesuffix("$") + ":finish$"}


def events() -> Json:
    return {
        "parameters": [ref_parameter("ChatId")],
        "get": {
            "operationId": "chat_events",
            "summary": "The chat's event stream (SSE), resumable",
            "description": EVENTS_DESCRIPTION,
            "tags": ["events"],
            "security": [{"bearer": []}, {"streamToken": []}],
            "parameters": [
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "description": "Resume after this event id (what the browser's `EventSource` sends by itself); "
                    "empty: from the start.",
                    "schema": RESUME_AT,
                },
                {
                    "name": "last_event_id",
                    "in": "query",
                    "description": "Resume after this event id; the header wins when both are sent. Empty: "
                    "from the start.",
                    "schema": RESUME_AT,
                },
            ],
            "responses": {
                "200": {
                    "description": "The stream: history, then live events, closed after the terminal event.",
                    "headers": {
                        "Cache-Control": {"schema": {"const": "no-cache"}, "required": True},
                        "X-Accel-Buffering": {"schema": {"const": "no"}, "required": True},
                    },
                    "content": {"text/event-stream": {"schema": ref("SSEEvent")}},
                },
                "400": error(
                    "A resume position this chat's stream does not have.",
                    {
                        "bad_last_event_id": "`Last-Event-ID` / `last_event_id` is not a stream id of this chat "
                        "(malformed, beyond 64 bits, or ahead of its stream)",
                        "invalid_request": "`last_event_id` or `token` given more than once",
                    },
                ),
                "401": error(
                    "No valid credentials.",
                    {
                        "unauthorized": "no bearer token or stream token; a bearer token that is unknown, expired "
                        "or revoked; a stream token that is forged, expired, for another chat or issued to a "
                        "credential since revoked"
                    },
                ),
                "404": NOT_FOUND,
                "410": error(
                    "The events are gone; `GET /v1/chats/{id}` still has the result.",
                    {
                        "stream_expired": "the chat ended and its stream expired (`STREAMBRIDGE_STREAM_TTL`), or "
                        "the events after the resume position were trimmed"
                    },
                ),
                "429": error(
                    "Too many open streams; `Retry-After` says when to try again.",
                    {
                        "too_many_streams": "the user has its most streams open at once, across every edge (the "
                        "credential's limit; by default `STREAMBRIDGE_MAX_OPEN_STREAMS`, "
                        "`STREAMBRIDGE_VISITOR_MAX_OPEN_STREAMS` for visitors), or the client's address has "
                        "`STREAMBRIDGE_MAX_OPEN_STREAMS_PER_IP`"
                    },
                    retry_after=True,
                ),
                "503": UNAVAILABLE,
            },
        },
    }


def openapi_path() -> Json:
    return {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "tags": ["meta"],
            "security": PUBLIC,
            "responses": {
                "200": {"description": "The OpenAPI 3.1 document.", "content": json_content({"type": "object"})}
            },
        }
    }


BROWSER_FILES: Final = {
    "/": "The chat page: prompt, streamed answer, progress, status, cancel. Model output is shown as text.",
    "/page/chat.js": "The page's script (scripts are files: the page's policy allows no inline code).",
    "/page/chat.css": "The page's styles.",
    "/page/icon.svg": "The page's icon.",
    "/streambridge.js": "The JavaScript client, an ES module with no dependencies: `import { createClient } "
    'from "/streambridge.js"`. Resumes after drops and reloads; see the README.',
    "/streambridge.d.ts": "The JavaScript client's TypeScript types.",
}


def browser_file(path: str) -> Json:
    """A file of the page or the client: public, revalidated on each load (``ETag``, 304)."""
    _, content_type, operation_id = FILES[path]
    return {
        "get": {
            "operationId": operation_id,
            "summary": BROWSER_FILES[path].partition(":")[0].rstrip("."),
            "description": f"{BROWSER_FILES[path]} Served by every process (api, edge, `up`).",
            "tags": ["browser"],
            "security": PUBLIC,
            "responses": {
                "200": {"description": "The file.", "content": {content_type: {"schema": {"type": "string"}}}},
                "304": {"description": "Unchanged since the `ETag` sent in `If-None-Match`."},
            },
        }
    }


def ref_parameter(name: str) -> Json:
    return {"$ref": f"#/components/parameters/{name}"}


def sse_event() -> Json:
    """One event as a client's SSE parser reads it: ``id``, ``event`` and ``data`` (the event's JSON)."""
    variants = []
    for struct in get_args(Event):
        name = struct.__name__
        tag = struct.__struct_config__.tag
        variants.append(
            {
                "type": "object",
                "required": ["id", "event", "data"],
                "properties": {
                    "id": ref("StreamId"),
                    "event": {"const": tag},
                    "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": ref(name)},
                },
            }
        )
    return {
        "title": "SSEEvent",
        "description": "One server-sent event: its `id` (the stream entry id, for `Last-Event-ID`), `event` (the "
        "type) and `data` (one line of JSON, the `Event` of that type).",
        "oneOf": variants,
    }


def components() -> Json:
    structs = (ChatRequest, Visitor, Created, ChatView, StatusView, ErrorAnswer, Event)
    (*_, event), schemas = msgspec.json.schema_components(structs, ref_template=REF)
    request = schemas.pop("ChatRequest")
    # what msgspec cannot say: `logprobs` may only be false (they are not returned)
    request["properties"]["logprobs"] = {"anyOf": [{"const": False}, {"type": "null"}], "default": None}
    schemas["CreateChat"] = create_chat_schema(request)
    schemas["ChatCompletionRequest"] = completion_request_schema(request)
    schemas["Event"] = {
        "title": "Event",
        "description": "An event of a chat's stream; `type` says which. Terminal: `complete`, `failed`, `cancelled`.",
        **event,
    }
    schemas["SSEEvent"] = sse_event()
    schemas.update(responses_request_schema()[1])
    schemas["StreamId"] = {
        "type": "string",
        "pattern": STREAM_ID_PATTERN,
        "description": "A Redis stream entry id, `<milliseconds>-<sequence>`.",
        "examples": ["1732400000000-0"],
    }
    schemas["Readiness"] = {
        "type": "object",
        "properties": {
            "status": {"const": "ready"},
            "checks": {
                "type": "object",
                "description": "What each check found: `ok`, or what is wrong.",
                "properties": {"process": {"type": "string"}, "redis": {"type": "string"}},
                "required": ["process", "redis"],
            },
        },
        "required": ["status", "checks"],
    }
    schemas["Health"] = {
        "type": "object",
        "properties": {"status": {"const": "ok"}},
        "required": ["status"],
    }
    schemas.update(openapi_batches.schemas())
    return {
        "schemas": dict(sorted(schemas.items())),
        "parameters": {"ChatId": CHAT_ID, "ResponseId": RESPONSE_ID},
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "A visitor token (`sbv_<id>_<secret>`, from `POST /v1/auth/visitor`) or an API key "
                "(`sbk_<id>_<secret>`, from `streambridge keys create`). Each has its own limits.",
            },
            "streamToken": {
                "type": "apiKey",
                "in": "query",
                "name": "token",
                "description": "The token in a chat's `stream_url`: opens that one chat's events for "
                "`STREAMBRIDGE_STREAM_TOKEN_TTL` seconds, while the credential it was issued to is valid. Only "
                "`GET /v1/chats/{id}/events` takes it.",
            },
        },
    }


#: one SSE event of a chunk stream: a ``data:`` line of JSON (or ``[DONE]``), with no ``id:``
SSE_TEXT: Final = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"const": "message"}},
    "required": ["data"],
}
OPENAI_BODY: Final = {"type": "object", "description": "OpenAI's own shape; see its API reference."}


def openai_create_errors(unsupported: str, invalid: str, unavailable: str) -> Json:
    """The errors of a create on the OpenAI surface: the request's own, the limits', and the
    upstream's refusal passed on as it gave it (a request that waited for its answer)."""
    return {
        "400": error(
            "Not a request that can be served (a wrong shape is 400 here, as OpenAI answers it).",
            {
                "malformed_json": "the body is not UTF-8 JSON, or nested too deeply",
                "invalid_request": invalid,
                "unsupported_parameter": unsupported,
                "bad_idempotency_key": "`Idempotency-Key` is empty, over 255 characters or not printable ASCII",
                "idempotency_key_reused": "the `Idempotency-Key` was used for a different request",
                "upstream_rejected": "the upstream refused the request (400 or 422) and gave no code",
            },
            upstream=True,
        ),
        "401": UNAUTHORIZED,
        "404": error(
            "The upstream does not know the model.",
            {"upstream_rejected": "the upstream answered 404 and gave no code"},
            upstream=True,
        ),
        "408": error("The body came too slowly.", {"request_timeout": "see `POST /v1/chats`"}),
        "409": error("The chat was cancelled before it ended.", {"cancelled": "its owner cancelled it"}),
        "410": error(
            "A retry of a create whose chat ended long ago, with `stream`.",
            {"stream_expired": "its stream (or the chat itself) expired; read it with its GET"},
        ),
        "413": error(
            "The body is too large, for streambridge or for the upstream.",
            {
                "payload_too_large": "see `POST /v1/chats`",
                "upstream_rejected": "the upstream answered 413 and gave no code",
            },
            upstream=True,
        ),
        "429": error(
            "Over a per-user limit.",
            {
                "rate_limited": "see `POST /v1/chats`",
                "too_many_chats": "see `POST /v1/chats`",
                "too_many_streams": "the user or address has its most streams open",
            },
            retry_after=True,
        ),
        "502": error(
            "The upstream failed the chat (every attempt the worker made); not worth the SDK's retry, "
            "so sent with `x-should-retry: false`.",
            {"upstream_failed": "every attempt failed"},
            upstream=True,
        ),
        "503": error(
            "The service cannot answer now.",
            {
                **REDIS_UNAVAILABLE,
                "overloaded": "`STREAMBRIDGE_MAX_QUEUE_DEPTH` chats wait for a worker; sent with `Retry-After`",
                "unavailable": unavailable,
            },
            retry_after=False,
        ),
    }


def completions() -> Json:
    return {
        "post": {
            "operationId": "create_completion",
            "summary": "OpenAI's Chat Completions (the openai SDK's `chat.completions.create`)",
            "description": "A chat, admitted as `POST /v1/chats` admits one and answered in OpenAI's shapes: one "
            "`chat.completion` once it ends, or (`stream: true`) `chat.completion.chunk` SSE ending with "
            "`data: [DONE]` (the usage chunk before it with `stream_options.include_usage`). Every chunk carries "
            "`streambridge: {chat_id, cursor}`; a dropped stream continues at "
            "`GET /v1/chat/completions/{id}/stream?after=<cursor>`. Fields other than OpenAI's go to the upstream "
            "as they came. Served by edges.",
            "tags": ["openai"],
            "security": BEARER,
            "parameters": [IDEMPOTENCY_KEY],
            "requestBody": {
                "required": True,
                "content": json_content(
                    ref("ChatCompletionRequest"),
                    examples={
                        "whole": {"value": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}},
                        "streamed": {
                            "value": {
                                "model": "gpt-4o-mini",
                                "messages": [{"role": "user", "content": "Tell me about rivers."}],
                                "stream": True,
                                "stream_options": {"include_usage": True},
                            }
                        },
                    },
                ),
            },
            "responses": {
                "200": {
                    "description": "A `chat.completion`, or its chunks as SSE.",
                    "content": {**json_content(OPENAI_BODY), "text/event-stream": {"schema": SSE_TEXT}},
                },
                **openai_create_errors(
                    "`logprobs`: streambridge does not return them",
                    "a field of the wrong type or out of range (`param` names it), or `n` > 1",
                    "the edge is shutting down; send the request again",
                ),
            },
        }
    }


def completion_stream() -> Json:
    return {
        "parameters": [ref_parameter("ChatId")],
        "get": {
            "operationId": "resume_completion",
            "summary": "A Chat Completions chunk stream again, after a cursor",
            "description": "The chunks of the chat's completion that follow `after` (a chunk's "
            "`streambridge.cursor`), on any edge, exactly once; from the first without it.",
            "tags": ["openai"],
            "security": BEARER,
            "parameters": [
                {
                    "name": "after",
                    "in": "query",
                    "schema": {"anyOf": [*RESUME_AT["anyOf"], FINISH_CURSOR]},
                    "description": "A chunk's cursor; empty: from the start. A finish chunk followed by a usage "
                    "chunk has its entry's id with `:finish`: after it comes the usage chunk.",
                },
                {"name": "include_usage", "in": "query", "schema": {"type": "boolean"}},
            ],
            "responses": {
                "200": {
                    "description": "The chunks, as SSE.",
                    "content": {"text/event-stream": {"schema": SSE_TEXT}},
                },
                "400": error(
                    "Not a cursor, or not a boolean.",
                    {
                        "bad_cursor": "`after` is not a chunk's cursor, or is past the last entry the chat's stream "
                        "has produced so far (it would never be reached)",
                        "invalid_request": "`include_usage` is not a boolean",
                    },
                ),
                "401": UNAUTHORIZED,
                "404": NOT_FOUND,
                "410": error("The stream expired.", {"stream_expired": "`GET /v1/chats/{id}` still has the result"}),
                "429": error("Too many streams.", {"too_many_streams": "see the events route"}, retry_after=True),
                "503": error("Redis is unreachable.", REDIS_UNAVAILABLE),
            },
        },
    }


#: one event of a Responses stream: ``event`` is its type, ``data`` its JSON, with no ``id:``
SSE_RESPONSES: Final = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "required": ["data"],
}
RESPONSE_NOT_FOUND: Final = error(
    "No such response.",
    {"not_found": "the response does not exist or belongs to another user (both look the same)"},
)


RESPONSE_STREAM: Final = """\
The object's `status`: `queued` (waiting for a worker), `in_progress`, then one of `completed`,
`incomplete` (`incomplete_details.reason`: `max_output_tokens` or `content_filter`), `failed`
(with `error`) or `cancelled`.

The events: `response.created` (status `queued`), `response.queued` for a background response,
`response.in_progress` when a worker starts, each output item in OpenAI's order
(`response.output_item.added`, `response.content_part.added`, the deltas, `….done`), and one end:
`response.completed`, `response.incomplete`, `response.failed`, or for a cancelled response
`response.incomplete` with its status `cancelled`. Each has a `sequence_number`, from 0, one more
for each event, and the same on every replay (the events are a function of the chat's stream).
After `STREAMBRIDGE_HEARTBEAT_INTERVAL` quiet seconds a `keepalive` event is sent, and a stream cut
short (the edge stopping, Redis lost) ends with an `error` event (`stream_interrupted`, naming
where to resume); both carry the number of the last event before them, not one of their own, so
resuming after either is resuming after that event. No `id:` lines: the openai SDK's decoder
breaks on them."""


def responses() -> Json:
    return {
        "post": {
            "operationId": "create_response",
            "summary": "OpenAI's Responses API (the openai SDK's `responses.create` and `responses.stream`)",
            "description": "A chat, asked of the upstream as Chat Completions and answered as a Responses "
            "response: the object once it ends, at once with `background`, or its events with `stream` "
            "(a dropped stream continues at `GET /v1/responses/{id}?stream=true&starting_after=<n>`). Fields "
            "other than OpenAI's go to the upstream as they came; `previous_response_id`, `conversation`, "
            "`prompt` and built-in tools are refused. Served by edges.\n\n" + RESPONSE_STREAM,
            "tags": ["openai"],
            "security": BEARER,
            "parameters": [IDEMPOTENCY_KEY],
            "requestBody": {
                "required": True,
                "content": json_content(
                    ref("ResponsesRequest"),
                    examples={
                        "whole": {"value": {"model": "gpt-4o-mini", "input": "Hi", "instructions": "Be brief."}},
                        "background": {"value": {"model": "gpt-4o-mini", "input": "Hi", "background": True}},
                        "streamed": {"value": {"model": "gpt-4o-mini", "input": "Hi", "stream": True}},
                    },
                ),
            },
            "responses": {
                "200": {
                    "description": "A `response` object, or its events as SSE.",
                    "content": {**json_content(OPENAI_BODY), "text/event-stream": {"schema": SSE_RESPONSES}},
                },
                **openai_create_errors(
                    "a field Chat Completions cannot serve (`param` names it)",
                    "a field of the wrong type or out of range (`param` names it)",
                    "the edge is stopping before the response ended; read it with its GET",
                ),
            },
        }
    }


def response() -> Json:
    return {
        "parameters": [ref_parameter("ResponseId")],
        "get": {
            "operationId": "read_response",
            "summary": "A response, or its events again (`responses.retrieve`)",
            "description": "The `response` object; with `stream=true`, its events from `sequence_number` 0, then "
            "live, sending only those above `starting_after`: exactly what a dropped client missed, on any edge. "
            "A `starting_after` above the last number the response has produced so far is a 400.\n\n" + RESPONSE_STREAM,
            "tags": ["openai"],
            "security": BEARER,
            "parameters": [
                {"name": "stream", "in": "query", "schema": {"type": "boolean"}},
                {
                    "name": "starting_after",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 0, "maximum": 999999999999999999},
                    "description": "The last `sequence_number` the client has (needs `stream=true`).",
                },
                {"name": "include", "in": "query", "schema": {"type": "array", "items": {"type": "string"}}},
                {"name": "include_obfuscation", "in": "query", "schema": {"type": "boolean"}},
            ],
            "responses": {
                "200": {
                    "description": "The `response` object, or its events as SSE.",
                    "content": {**json_content(OPENAI_BODY), "text/event-stream": {"schema": SSE_RESPONSES}},
                },
                "400": error(
                    "A query it does not take.",
                    {
                        "invalid_request": "an unknown parameter, a non-boolean, `starting_after` without a stream, "
                        "or `starting_after` above the last `sequence_number` the response has produced so far "
                        "(all of them, once it ended)"
                    },
                ),
                "401": UNAUTHORIZED,
                "404": RESPONSE_NOT_FOUND,
                "410": error("The events expired.", {"stream_expired": "the object (without `stream`) remains"}),
                "429": error("Too many streams.", {"too_many_streams": "see the events route"}, retry_after=True),
                "503": error("Redis is unreachable.", REDIS_UNAVAILABLE),
            },
        },
    }


def response_cancel() -> Json:
    return {
        "parameters": [ref_parameter("ResponseId")],
        "post": {
            "operationId": "cancel_response",
            "summary": "Cancel a response (`responses.cancel`)",
            "description": "Idempotent: a cancelled response answers again as it is. Waits up to 5 s for a running "
            "one's worker to stop it, then answers with the `response` object.",
            "tags": ["openai"],
            "security": BEARER,
            "responses": {
                "200": {"description": "The `response` object.", "content": json_content(OPENAI_BODY)},
                "400": error("It already ended.", {"invalid_request": "the response completed or failed"}),
                "401": UNAUTHORIZED,
                "404": RESPONSE_NOT_FOUND,
                "503": error("Redis is unreachable.", REDIS_UNAVAILABLE),
            },
        },
    }


def responses_request_schema() -> tuple[Json, Json]:
    """``ResponsesRequest`` and its parts; a message item may leave out its ``type`` (OpenAI's "easy"
    message), and any other field goes to the upstream."""
    (request,), schemas = msgspec.json.schema_components((ResponsesRequest,), ref_template=REF)
    message = schemas["MessageItem"]
    message["required"] = [name for name in message["required"] if name != "type"]
    schemas["ResponsesRequest"].pop("additionalProperties", None)
    return request, schemas


def models() -> Json:
    return {
        "get": {
            "operationId": "list_models",
            "summary": "The upstream's models (the openai SDK's `models.list`)",
            "description": "Fetched from the upstream at most once a minute; the configured "
            "`STREAMBRIDGE_LLM_MODEL` when the upstream has no list.",
            "tags": ["openai"],
            "security": BEARER,
            "responses": {
                "200": {"description": "OpenAI's model list.", "content": json_content(OPENAI_BODY)},
                "401": UNAUTHORIZED,
                "503": error("Redis is unreachable.", REDIS_UNAVAILABLE),
            },
        }
    }


def model() -> Json:
    return {
        "parameters": [
            {
                "name": "model",
                "in": "path",
                "required": True,
                "description": "A model's id, as `GET /v1/models` lists it (it may hold `/`).",
                "schema": {"type": "string", "minLength": 1},
            }
        ],
        "get": {
            "operationId": "read_model",
            "summary": "One of the upstream's models (the openai SDK's `models.retrieve`)",
            "tags": ["openai"],
            "security": BEARER,
            "responses": {
                "200": {"description": "OpenAI's model object.", "content": json_content(OPENAI_BODY)},
                "401": UNAUTHORIZED,
                "404": error("Not a listed model.", {"model_not_found": "`GET /v1/models` does not list it"}),
                "503": error("Redis is unreachable.", REDIS_UNAVAILABLE),
            },
        },
    }


def build() -> Json:
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "streambridge",
            "version": _package_version(),
            "description": DESCRIPTION,
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": [
            {"name": "chats", "description": "Create, read and cancel chats (the API)."},
            {"name": "events", "description": "A chat's event stream (the SSE edge)."},
            {"name": "auth", "description": "Tokens."},
            {"name": "meta", "description": "Health and this document (every process)."},
            {"name": "openai", "description": "OpenAI's API: the openai SDK works unchanged (edges)."},
            {"name": "browser", "description": "The chat page and the JavaScript client (every process)."},
            {
                "name": "batches",
                "description": "OpenAI's Files and Batches APIs, live progress and partial results (API).",
            },
        ],
        "security": BEARER,
        "paths": {
            "/healthz": healthz(),
            "/readyz": readyz(),
            "/metrics": metrics_path(),
            "/openapi.json": openapi_path(),
            "/v1/auth/visitor": visitor(),
            "/v1/chats": chats(),
            "/v1/chats/{id}": chat(),
            "/v1/chats/{id}/cancel": cancel(),
            "/v1/chats/{id}/events": events(),
            "/v1/chat/completions": completions(),
            "/v1/chat/completions/{id}/stream": completion_stream(),
            "/v1/responses": responses(),
            "/v1/responses/{id}": response(),
            "/v1/responses/{id}/cancel": response_cancel(),
            "/v1/models": models(),
            "/v1/models/{model}": model(),
            **{path: browser_file(path) for path in BROWSER_FILES},
            **openapi_batches.paths(error, UNAUTHORIZED, UNAVAILABLE, BEARER, RESUME_AT),
        },
        "components": components(),
    }


DOCUMENT: Final = build()
BODY: Final = msgspec.json.encode(DOCUMENT)


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")
