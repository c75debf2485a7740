"""``GET /openapi.json``: a valid OpenAPI 3.1 document that describes exactly the routes ``make_app``
serves, with every error each can answer. (The fuzz test in tests/security holds the server to it.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import msgspec
import pytest
import schemathesis
from schemathesis.core.result import Ok

from streambridge.api import openapi
from streambridge.api.app import make_app
from streambridge.api.chats import parse_create
from streambridge.shared import errors
from streambridge.shared.events import EVENT_TYPES
from streambridge.shared.settings import Settings

DIALECT = "https://json-schema.org/draft/2020-12/schema"
ERROR_ANSWER = {"$ref": "#/components/schemas/ErrorAnswer"}
METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})

# The contract's errors, route by route: status → codes.
ERRORS: dict[str, dict[int, set[str]]] = {
    "GET /healthz": {503: {"redis_unavailable"}},
    "GET /readyz": {503: {"not_ready"}},
    "GET /metrics": {404: {"metrics_disabled"}},
    "GET /openapi.json": {},
    "POST /v1/auth/visitor": {429: {"rate_limited"}, 503: {"redis_unavailable"}},
    "POST /v1/chats": {
        400: {"malformed_json", "bad_idempotency_key"},
        401: {"unauthorized"},
        408: {"request_timeout"},
        413: {"payload_too_large"},
        422: {"invalid_request", "unsupported_parameter", "idempotency_key_reused"},
        429: {"rate_limited", "too_many_chats"},
        503: {"redis_unavailable", "overloaded"},
    },
    "GET /v1/chats/{id}": {401: {"unauthorized"}, 404: {"not_found"}, 503: {"redis_unavailable"}},
    "POST /v1/chats/{id}/cancel": {401: {"unauthorized"}, 404: {"not_found"}, 503: {"redis_unavailable"}},
    "GET /v1/chats/{id}/events": {
        400: {"bad_last_event_id", "invalid_request"},
        401: {"unauthorized"},
        404: {"not_found"},
        410: {"stream_expired"},
        429: {"too_many_streams"},
        503: {"redis_unavailable"},
    },
}


OPENAI_CREATE: dict[int, set[str]] = {
    400: {
        "malformed_json",
        "invalid_request",
        "unsupported_parameter",
        "bad_idempotency_key",
        "idempotency_key_reused",
        "upstream_rejected",
    },
    401: {"unauthorized"},
    404: {"upstream_rejected"},
    408: {"request_timeout"},
    409: {"cancelled"},
    410: {"stream_expired"},
    413: {"payload_too_large", "upstream_rejected"},
    429: {"rate_limited", "too_many_chats", "too_many_streams"},
    502: {"upstream_failed"},
    503: {"redis_unavailable", "overloaded", "unavailable"},
}
ERRORS["POST /v1/chat/completions"] = OPENAI_CREATE
ERRORS["GET /v1/chat/completions/{id}/stream"] = {
    400: {"bad_cursor", "invalid_request"},
    401: {"unauthorized"},
    404: {"not_found"},
    410: {"stream_expired"},
    429: {"too_many_streams"},
    503: {"redis_unavailable"},
}
ERRORS["POST /v1/responses"] = OPENAI_CREATE
ERRORS["GET /v1/responses/{id}"] = {
    400: {"invalid_request"},
    401: {"unauthorized"},
    404: {"not_found"},
    410: {"stream_expired"},
    429: {"too_many_streams"},
    503: {"redis_unavailable"},
}
ERRORS["POST /v1/responses/{id}/cancel"] = {
    400: {"invalid_request"},
    401: {"unauthorized"},
    404: {"not_found"},
    503: {"redis_unavailable"},
}
ERRORS["GET /v1/models"] = {401: {"unauthorized"}, 503: {"redis_unavailable"}}
ERRORS["GET /v1/models/{model}"] = {401: {"unauthorized"}, 404: {"model_not_found"}, 503: {"redis_unavailable"}}
# the chat page and the JavaScript client: public files, which answer no error of their own
BROWSER = frozenset(
    f"GET {path}"
    for path in ("/", "/page/chat.js", "/page/chat.css", "/page/icon.svg", "/streambridge.js", "/streambridge.d.ts")
)
ERRORS.update((label, {}) for label in BROWSER)
BASE = {401: {"unauthorized"}, 503: {"redis_unavailable"}}
ERRORS["POST /v1/files"] = {
    **BASE,
    400: {"invalid_request", "too_many_lines", "storage_quota_exceeded"},
    408: {"request_timeout"},
    413: {"payload_too_large"},
}
ERRORS["GET /v1/files"] = {**BASE, 400: {"invalid_request"}}
for route in ("GET /v1/files/{id}", "DELETE /v1/files/{id}", "GET /v1/files/{id}/content"):
    ERRORS[route] = {**BASE, 404: {"file_not_found"}}
ERRORS["POST /v1/batches"] = {
    **BASE,
    400: {"malformed_json", "invalid_request", "unsupported_endpoint", "invalid_input_file", "storage_quota_exceeded"},
    408: {"request_timeout"},
    413: {"payload_too_large"},
}
ERRORS["GET /v1/batches"] = {**BASE, 400: {"invalid_request"}}
for route in ("GET /v1/batches/{id}", "POST /v1/batches/{id}/cancel", "GET /v1/batches/{id}/results"):
    ERRORS[route] = {**BASE, 404: {"batch_not_found"}}
ERRORS["GET /v1/batches/{id}/events"] = {
    **BASE,
    400: {"bad_last_event_id", "invalid_request"},
    404: {"batch_not_found"},
}


def document() -> dict[str, Any]:
    """A fresh copy, decoded from the bytes the route serves."""
    return dict(msgspec.json.decode(openapi.BODY))


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield f"{method.upper()} {path}", operation


def served(serve_api: bool, serve_edge: bool) -> dict[str, str]:
    """``METHOD /path`` → handler name, for every route the app registers (HEAD comes with GET)."""
    app = make_app(Settings(redis_url="redis://127.0.0.1:1/0"), serve_api=serve_api, serve_edge=serve_edge)
    return {
        f"{route.method} {route.resource.canonical}": route.handler.__name__
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }


def test_the_route_serves_the_document_encoded_once() -> None:
    assert document() == openapi.DOCUMENT
    assert openapi.DOCUMENT["openapi"].startswith("3.1.")


def test_the_document_is_valid_openapi_3_1() -> None:
    schema = schemathesis.openapi.from_dict(document())
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    results = list(schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in results), results
    assert len(results) == len(ERRORS)


def test_every_schema_is_valid_json_schema_2020_12() -> None:
    def schemas(node: object) -> Iterator[Any]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in {"schema", "contentSchema"}:
                    yield value
                yield from schemas(value)
        elif isinstance(node, list):
            for value in node:
                yield from schemas(value)

    doc = document()
    found = [*doc["components"]["schemas"].values(), *schemas(doc)]
    assert len(found) > 20
    for schema in found:
        jsonschema_rs.meta.validate({"$schema": DIALECT, **schema})


def test_every_reference_resolves() -> None:
    doc = document()

    def refs(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str):
                    yield value
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in refs(doc):
        assert ref.startswith("#/")
        target: Any = doc
        for part in ref[2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        assert isinstance(target, dict), ref


@pytest.mark.parametrize(("serve_api", "serve_edge"), [(True, True), (True, False), (False, True)])
def test_every_route_served_is_documented(serve_api: bool, serve_edge: bool) -> None:
    documented = {label: operation["operationId"] for label, operation in operations(document())}
    for label, handler in served(serve_api, serve_edge).items():
        assert label in documented, f"{label} is served but not in /openapi.json"
        assert documented[label] == handler, f"{label}: operationId {documented[label]!r}, handler {handler!r}"


def test_every_documented_route_is_served() -> None:
    documented = {label for label, _ in operations(document())}
    assert documented == set(served(True, True)) == set(ERRORS)


@pytest.mark.parametrize("label", sorted(ERRORS))
def test_every_error_is_documented_with_its_codes(label: str) -> None:
    operation = dict(operations(document()))[label]
    responses = operation["responses"]
    documented: dict[int, set[str]] = {}
    for status, response in responses.items():
        if int(status) < 400:
            continue
        schema = response["content"]["application/json"]["schema"]
        assert ERROR_ANSWER in schema["allOf"], f"{label} {status} is not an ErrorAnswer"
        code = schema["allOf"][1]["properties"]["error"]["properties"]["code"]
        codes = code.get("enum") or code["examples"]  # examples: the upstream's own codes pass too
        documented[int(status)] = set(codes)
        for code in codes:
            assert f"`{code}`" in response["description"], f"{label} {status}: {code} undescribed"
    assert documented == ERRORS[label]
    if 429 in documented:
        assert responses["429"]["headers"]["Retry-After"]["required"] is True
    if "overloaded" in documented.get(503, ()):
        assert "Retry-After" in responses["503"]["headers"]
    assert [status for status in responses if 200 <= int(status) < 300], f"{label} has no success answer"


def test_every_error_class_has_its_code_documented() -> None:
    """A new ApiError with a code of its own needs a place in the document."""
    generic = {"internal_error", "bad_request"}  # never sent as such: 500 is a bug, 400s name their code

    def subclasses(cls: type[errors.ApiError]) -> Iterator[type[errors.ApiError]]:
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    documented = {code for by_status in ERRORS.values() for codes in by_status.values() for code in codes}
    assert {cls.code for cls in subclasses(errors.ApiError)} - generic <= documented


def test_secured_operations_take_the_bearer_token() -> None:
    doc = document()
    schemes = doc["components"]["securitySchemes"]
    assert (schemes["bearer"]["type"], schemes["bearer"]["scheme"]) == ("http", "bearer")
    assert (schemes["streamToken"]["type"], schemes["streamToken"]["in"], schemes["streamToken"]["name"]) == (
        "apiKey",
        "query",
        "token",
    )
    public = {"GET /healthz", "GET /readyz", "GET /metrics", "GET /openapi.json", "POST /v1/auth/visitor"}
    for label, operation in operations(doc):
        if label in public | BROWSER:
            assert operation["security"] == []
        elif label == "GET /v1/chats/{id}/events":
            assert operation["security"] == [{"bearer": []}, {"streamToken": []}]
        else:
            assert operation["security"] == [{"bearer": []}]


def test_the_chat_id_is_32_lowercase_hex() -> None:
    chat_id = document()["components"]["parameters"]["ChatId"]
    assert chat_id["in"] == "path"
    assert chat_id["schema"]["pattern"] == "^[0-9a-f]{32}$"


def test_the_event_stream_describes_every_event_type() -> None:
    doc = document()
    response = dict(operations(doc))["GET /v1/chats/{id}/events"]["responses"]["200"]
    assert response["content"]["text/event-stream"]["schema"] == {"$ref": "#/components/schemas/SSEEvent"}
    variants = doc["components"]["schemas"]["SSEEvent"]["oneOf"]
    assert {v["properties"]["event"]["const"] for v in variants} == EVENT_TYPES
    assert {v["properties"]["data"]["contentMediaType"] for v in variants} == {"application/json"}
    mapping = doc["components"]["schemas"]["Event"]["discriminator"]["mapping"]
    assert set(mapping) == EVENT_TYPES


def test_the_request_body_examples_are_accepted() -> None:
    operation = dict(operations(document()))["POST /v1/chats"]
    examples = operation["requestBody"]["content"]["application/json"]["examples"]
    assert examples
    for example in examples.values():
        parse_create(msgspec.json.encode(example["value"]))


def test_the_error_shape_is_described_with_type_and_param() -> None:
    description = document()["info"]["description"]
    for field in ('"code"', '"message"', '"type"', '"param"'):
        assert field in description
    schema = document()["components"]["schemas"]["ErrorBody"]
    assert {"code", "message", "type", "param"} <= set(schema["properties"])


def test_the_responses_operations_describe_statuses_keepalive_and_numbering() -> None:
    ops = dict(operations(document()))
    for label in ("POST /v1/responses", "GET /v1/responses/{id}"):
        description = ops[label]["description"]
        for status in ("queued", "in_progress", "completed", "incomplete", "failed", "cancelled"):
            assert f"`{status}`" in description, (label, status)
        assert "`keepalive`" in description
        assert "number of the last event" in description, "a keepalive takes no number of its own"
