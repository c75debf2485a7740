"""One exception tree for everything streambridge raises on purpose.

StreambridgeError
├── SettingsError        a bad setting; the process stops with its one-line message
└── ApiError             answered as {"error": {"code", "message"}} with ``status``
    ├── BadRequest          400
    ├── Unauthorized        401
    ├── NotFound            404
    ├── RequestTimeout      408
    ├── StreamExpired       410
    ├── PayloadTooLarge     413
    ├── Unprocessable       422
    ├── RateLimited         429, with Retry-After
    │   └── Overloaded         503, with Retry-After
    └── Unavailable         503
"""

from __future__ import annotations

from typing import ClassVar


class StreambridgeError(Exception):
    """Base of every error streambridge raises on purpose."""


class SettingsError(StreambridgeError):
    """A setting is malformed or unknown; the message names the variable."""


class ApiError(StreambridgeError):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault, where one is
        if code is not None:
            self.code = code  # type: ignore[misc]


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class StreamExpired(ApiError):
    status = 410
    code = "stream_expired"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class Unprocessable(ApiError):
    status = 422
    code = "invalid_request"


class RequestTimeout(ApiError):
    status = 408
    code = "request_timeout"


class RateLimited(ApiError):
    """Over a limit; answered with ``Retry-After``."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class Unavailable(ApiError):
    status = 503
    code = "redis_unavailable"


class Overloaded(RateLimited):
    """Too much queued work across the deployment: 503, with ``Retry-After``."""

    status = 503
    code = "overloaded"
