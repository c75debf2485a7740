"""The Files and Batches routes' part of ``GET /openapi.json`` (``api.openapi`` assembles the document).

Schemas come from the Structs that encode the answers (``api.files``, ``api.batches``,
``shared.batches``), so the document cannot disagree with the wire.
"""

from __future__ import annotations

from typing import Any, Final, get_args

import msgspec

from streambridge.api.batches import BatchList, BatchObject, CreateBatch
from streambridge.api.files import FileDeleted, FileList, FileObject
from streambridge.shared.batches import BatchEvent, OutputLine

Json = dict[str, Any]

REF: Final = "#/components/schemas/{name}"
FILE_ID_PATTERN: Final = "^file-[0-9a-f]{24}$"
BATCH_ID_PATTERN: Final = "^batch_[0-9a-f]{32}$"
JSONL: Final = "application/jsonl"


def ref(name: str) -> Json:
    return {"$ref": REF.format(name=name)}


def json_content(schema: Json) -> Json:
    return {"application/json": {"schema": schema}}


def schemas() -> Json:
    structs = (FileObject, FileList, FileDeleted, BatchObject, BatchList, CreateBatch, OutputLine, BatchEvent)
    _, found = msgspec.json.schema_components(structs, ref_template=REF)
    found["BatchSSEEvent"] = batch_sse_event()
    found["UploadFile"] = {
        "type": "object",
        "required": ["file", "purpose"],
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "OpenAI's batch JSONL, one request a line."},
            "purpose": {"const": "batch"},
        },
    }
    return dict(found)


def batch_sse_event() -> Json:
    variants = []
    for struct in get_args(BatchEvent):
        variants.append(
            {
                "type": "object",
                "required": ["id", "event", "data"],
                "properties": {
                    "id": ref("StreamId"),
                    "event": {"const": struct.__struct_config__.tag},
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": ref(struct.__name__),
                    },
                },
            }
        )
    return {
        "title": "BatchSSEEvent",
        "description": "One event of a batch's progress: `item` (an item ended, with the batch's counts after it), "
        "`status` (a status that is not the last) or `end` (terminal).",
        "oneOf": variants,
    }


def paths(error: Any, unauthorized: Json, unavailable: Json, bearer: list[Json], resume_at: Json) -> Json:
    """The routes, with ``api.openapi``'s helpers for error answers."""
    file_missing = error(
        "No such file for this caller.",
        {"file_not_found": "the file does not exist, was deleted, expired, or belongs to another user"},
    )
    batch_missing = error(
        "No such batch for this caller.",
        {"batch_not_found": "the batch does not exist, expired, or belongs to another user"},
    )
    bad_page = error(
        "A malformed list query.",
        {"invalid_request": "`limit` out of range, an unknown query parameter, or `order` not asc/desc"},
    )
    slow_body = error("The body came too slowly.", {"request_timeout": "see `POST /v1/chats`"})
    too_large = error(
        "Too large.",
        {"payload_too_large": "a file over `STREAMBRIDGE_MAX_FILE_BYTES`, a line over `STREAMBRIDGE_MAX_BODY_BYTES`"},
    )
    file_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "pattern": FILE_ID_PATTERN}}
    batch_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "pattern": BATCH_ID_PATTERN}}
    limit = {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}}
    after = {"name": "after", "in": "query", "schema": {"type": "string"}}

    def op(op_id: str, summary: str, responses: Json, **more: Any) -> Json:
        base = {"401": unauthorized, "503": unavailable}
        return {
            "operationId": op_id,
            "summary": summary,
            "tags": ["batches"],
            "security": bearer,
            "responses": {**responses, **base},
            **more,
        }

    return {
        "/v1/files": {
            "post": op(
                "upload_file",
                "Upload a batch input (the openai SDK's `files.create(purpose='batch')`)",
                {
                    "200": {"description": "The file.", "content": json_content(ref("FileObject"))},
                    "400": error(
                        "Not a batch file upload.",
                        {
                            "invalid_request": "not multipart/form-data, no `file` part, or `purpose` is not `batch`",
                            "too_many_lines": "more than `STREAMBRIDGE_BATCH_MAX_LINES` lines",
                            "storage_quota_exceeded": "the caller's stored files would pass its quota "
                            "(`STREAMBRIDGE_FILE_BYTES_PER_USER`, `STREAMBRIDGE_VISITOR_FILE_BYTES_PER_USER` for "
                            "visitors, or the key's `--file-bytes`): refused as the upload is read; deleting "
                            "files frees room, as does their expiry",
                        },
                    ),
                    "408": slow_body,
                    "413": too_large,
                },
                description="Read as a stream and checked line by line as Chat Completions requests; a bad "
                "line does not refuse the upload, it fails the batch made from it (naming each bad line).",
                requestBody={"required": True, "content": {"multipart/form-data": {"schema": ref("UploadFile")}}},
            ),
            "get": op(
                "list_files",
                "The caller's files, newest first (the SDK's `files.list`, auto-paging)",
                {
                    "200": {"description": "A page of files.", "content": json_content(ref("FileList"))},
                    "400": bad_page,
                },
                parameters=[
                    {**limit, "schema": {"type": "integer", "minimum": 1, "maximum": 10000}},
                    after,
                    {"name": "purpose", "in": "query", "schema": {"type": "string"}},
                    {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
                ],
            ),
        },
        "/v1/files/{id}": {
            "parameters": [file_id],
            "get": op(
                "read_file",
                "A file",
                {"200": {"description": "The file.", "content": json_content(ref("FileObject"))}, "404": file_missing},
            ),
            "delete": op(
                "delete_file",
                "Delete a file (a batch running from it keeps running)",
                {
                    "200": {"description": "Deleted.", "content": json_content(ref("FileDeleted"))},
                    "404": file_missing,
                },
            ),
        },
        "/v1/files/{id}/content": {
            "parameters": [file_id],
            "get": op(
                "file_content",
                "A file's bytes (the SDK's `files.content`), streamed",
                {
                    "200": {"description": "JSON Lines.", "content": {JSONL: {"schema": {"type": "string"}}}},
                    "404": file_missing,
                },
            ),
        },
        "/v1/batches": {
            "post": op(
                "create_batch",
                "Create a batch from an uploaded file (the SDK's `batches.create`)",
                {
                    "200": {"description": "The batch.", "content": json_content(ref("BatchObject"))},
                    "400": error(
                        "Not a batch OpenAI's API would take.",
                        {
                            "malformed_json": "the body is not UTF-8 JSON",
                            "invalid_request": "a field of the wrong type, or a `completion_window` other than 24h",
                            "unsupported_endpoint": "an `endpoint` other than /v1/chat/completions",
                            "invalid_input_file": "no batch input file of the caller's has that id",
                            "storage_quota_exceeded": "the caller's stored files, its batches' output and "
                            "error files among them, fill its file quota: it starts no batch until it "
                            "deletes files (or they expire)",
                        },
                    ),
                    "408": slow_body,
                    "413": error("The body is too large.", {"payload_too_large": "see `POST /v1/chats`"}),
                },
                requestBody={"required": True, "content": json_content(ref("CreateBatch"))},
            ),
            "get": op(
                "list_batches",
                "The caller's batches, newest first (the SDK's `batches.list`, auto-paging)",
                {
                    "200": {"description": "A page of batches.", "content": json_content(ref("BatchList"))},
                    "400": bad_page,
                },
                parameters=[limit, after],
            ),
        },
        "/v1/batches/{id}": {
            "parameters": [batch_id],
            "get": op(
                "read_batch",
                "A batch, with live `request_counts` and `usage`",
                {
                    "200": {"description": "The batch.", "content": json_content(ref("BatchObject"))},
                    "404": batch_missing,
                },
            ),
        },
        "/v1/batches/{id}/cancel": {
            "parameters": [batch_id],
            "post": op(
                "cancel_batch",
                "Cancel a batch (idempotent): running items stop, finished ones are kept",
                {
                    "200": {"description": "The batch.", "content": json_content(ref("BatchObject"))},
                    "404": batch_missing,
                },
            ),
        },
        "/v1/batches/{id}/events": {
            "parameters": [batch_id],
            "get": op(
                "batch_events",
                "The batch's progress (SSE), resumable with `Last-Event-ID`; closed after `end`",
                {
                    "200": {
                        "description": "The history, then live events.",
                        "headers": {
                            "Cache-Control": {"schema": {"const": "no-cache"}, "required": True},
                            "X-Accel-Buffering": {"schema": {"const": "no"}, "required": True},
                        },
                        "content": {"text/event-stream": {"schema": ref("BatchSSEEvent")}},
                    },
                    "400": error(
                        "A resume position this batch's stream does not have, or an unknown query parameter.",
                        {
                            "bad_last_event_id": "malformed, or not an event of this batch",
                            "invalid_request": "an unknown query parameter",
                        },
                    ),
                    "404": batch_missing,
                },
                parameters=[
                    {"name": "Last-Event-ID", "in": "header", "schema": resume_at},
                    {"name": "last_event_id", "in": "query", "schema": resume_at},
                ],
            ),
        },
        "/v1/batches/{id}/results": {
            "parameters": [batch_id],
            "get": op(
                "batch_results",
                "Every item finished so far: output lines, then error lines (`OutputLine`, JSON Lines)",
                {
                    "200": {"description": "JSON Lines.", "content": {JSONL: {"schema": {"type": "string"}}}},
                    "404": batch_missing,
                },
            ),
        },
    }
