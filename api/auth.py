"""Authentication: the caller's bearer credential, and chat-scoped stream tokens.

A stream token is ``<expiry>.<credential id>.<signature>``, the signature an HMAC-SHA256 of the
chat id, credential id and expiry under the deployment's secret: it opens one chat's events for
a short while, is never the user's own token, and dies with the credential it was issued to.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from typing import Final

from aiohttp import web
from redis.asyncio import Redis

from streambridge.api.credentials import Identity, Known, identify
from streambridge.shared import keys
from streambridge.shared.errors import Unauthorized
from streambridge.shared.settings import Settings

STREAM_TOKEN: Final = re.compile(r"\A([0-9]{1,12})\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})\Z")


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


async def authenticate(
    request: web.Request, redis: Redis, settings: Settings, known: dict[str, Known] | None = None
) -> Identity:
    """The identity behind the request's bearer token, or 401; remembered in ``known`` if given."""
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("send Authorization: Bearer <token> (POST /v1/auth/visitor gives one)")
    return await identify(redis, settings, token, known)


async def load_secret(redis: Redis, configured: str | None, current: bytes | None = None) -> bytes:
    """The signing key: the setting, or the one kept in Redis for every process.

    If Redis has none (first start, or it lost its data), this process offers the key it already
    uses, or a new one; the first offer wins and every process adopts it at its next refresh.
    """
    if configured:
        return configured.encode()
    await redis.set(keys.secret(), current or secrets.token_hex(32).encode(), nx=True)
    value = await redis.get(keys.secret())
    assert value is not None
    return bytes(value)


def sign_stream_token(secret: bytes, chat_id: str, credential: str, ttl: int, now: float | None = None) -> str:
    expires = int((now if now is not None else time.time()) + ttl)
    return f"{expires}.{credential}.{_signature(secret, chat_id, credential, expires)}"


def verify_stream_token(secret: bytes, chat_id: str, token: str, now: float | None = None) -> str | None:
    """The id of the credential the token was issued to, if it is genuine, unexpired and for this chat."""
    match = STREAM_TOKEN.match(token)
    if match is None or int(match[1]) < (now if now is not None else time.time()):
        return None
    if not hmac.compare_digest(match[3], _signature(secret, chat_id, match[2], int(match[1]))):
        return None
    return match[2]


def _signature(secret: bytes, chat_id: str, credential: str, expires: int) -> str:
    message = f"stream:{chat_id}:{credential}:{expires}".encode()
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
