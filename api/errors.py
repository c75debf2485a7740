"""Every error answer is ``{"error": {"code", "message", "type", "param"}}``, OpenAI's own error
body, on every route: never HTML, never a traceback."""

from __future__ import annotations

import logging
from typing import Final

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streambridge.api.context import SETTINGS
from streambridge.shared import metrics
from streambridge.shared.errors import ApiError, RateLimited, StreamExpired

log = logging.getLogger("streambridge.api")

CODES: Final = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    410: "stream_expired",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}


#: OpenAI's error ``type`` for each status (its SDK picks the exception class by the status alone)
TYPES: Final = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}

#: routes that answer as OpenAI's API does, where a request of the wrong shape is a 400, not a 422
OPENAI_ROUTES: Final = ("/v1/chat/completions", "/v1/models", "/v1/responses", "/v1/files", "/v1/batches")


class ErrorBody(msgspec.Struct):
    code: str
    message: str
    type: str
    param: str | None = None


class ErrorAnswer(msgspec.Struct):
    error: ErrorBody


def error_type(status: int) -> str:
    return TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, code: str, message: str, param: str | None = None) -> bytes:
    return msgspec.json.encode(ErrorAnswer(ErrorBody(code, message, error_type(status), param)))


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, param: str | None = None
) -> web.Response:
    body = error_body(status, code, message, param)
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _answer(request, exc)
    except Exception as exc:
        return _answer(request, exc)


def _answer(request: web.Request, exc: Exception) -> web.Response:
    try:
        return _error_answer(request, exc)
    finally:
        # The traceback's frames hold the request, and the request holds aiohttp's router errors
        # (match_info): a cycle per 404 that only a full GC pass frees, which stalled every stream
        # of an edge for ~100 ms under scanner traffic (docs/benchmarks.md, "Slow clients").
        exc.__traceback__ = None


def _error_answer(request: web.Request, exc: Exception) -> web.Response:
    if isinstance(exc, RateLimited):
        metrics.REFUSALS.labels(exc.code).inc()
        return error_response(exc.status, exc.code, exc.message, {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, ApiError):
        if isinstance(exc, StreamExpired):
            metrics.EXPIRED_AT_OPEN.inc()
        status = 400 if exc.status == 422 and request.path.startswith(OPENAI_ROUTES) else exc.status
        return error_response(status, exc.code, exc.message, param=exc.param)
    if isinstance(exc, web.HTTPException):
        headers = {k: v for k, v in exc.headers.items() if k.lower() in {"allow", "retry-after"}}
        message = _http_message(exc, request)
        return error_response(exc.status, CODES.get(exc.status, "http_error"), message, headers)
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | ConnectionRefusedError):
        metrics.REDIS_ERRORS_REQUEST.inc()
        log.warning("redis unreachable while serving %s %s: %s", request.method, request.path, exc)
        return error_response(503, "redis_unavailable", "the service's Redis is unreachable; retry shortly")
    log.error("unhandled error serving %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "internal_error", "an internal error occurred; it has been logged")


def _http_message(exc: web.HTTPException, request: web.Request) -> str:
    if exc.status == 404:
        return f"no route for {request.path}"
    if exc.status == 405:
        return f"{request.method} is not allowed on {request.path}"
    if exc.status == 413:
        return f"request body larger than {request.app[SETTINGS].max_body_bytes} bytes"
    return exc.reason
