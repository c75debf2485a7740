"""Who is asking: visitor tokens (stored hashed, with an expiry) and chat-scoped stream tokens.

A stream token is ``<expiry>.<signature>``, the signature an HMAC-SHA256 of the chat id and
expiry under the deployment's secret: it opens one chat's events for a short while and is
never the user's own token.
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

from shared import keys
from shared.errors import Unauthorized

STREAM_TOKEN: Final = re.compile(r"\A([0-9]{1,12})\.([A-Za-z0-9_-]{43})\Z")


def hash_token(token: str) -> str:
    # headers may carry any bytes (aiohttp decodes them with surrogateescape): hash them as they came
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


async def create_visitor(redis: Redis, ttl: int) -> tuple[str, str]:
    """A new anonymous user and its bearer token."""
    user = "visitor_" + secrets.token_hex(8)
    token = "sbv_" + secrets.token_urlsafe(32)
    await redis.set(keys.token(hash_token(token)), user, ex=ttl)
    return token, user


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


async def authenticate(request: web.Request, redis: Redis) -> str:
    """The user behind the request's bearer token, or 401."""
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("send Authorization: Bearer <token> (POST /v1/auth/visitor gives one)")
    user = await redis.get(keys.token(hash_token(token)))
    if user is None:
        raise Unauthorized("the token is unknown or expired")
    return str(user.decode())


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


def sign_stream_token(secret: bytes, chat_id: str, ttl: int, now: float | None = None) -> str:
    expires = int((now if now is not None else time.time()) + ttl)
    return f"{expires}.{_signature(secret, chat_id, expires)}"


def verify_stream_token(secret: bytes, chat_id: str, token: str, now: float | None = None) -> bool:
    match = STREAM_TOKEN.match(token)
    if match is None or int(match[1]) < (now if now is not None else time.time()):
        return False
    return hmac.compare_digest(match[2], _signature(secret, chat_id, int(match[1])))


def _signature(secret: bytes, chat_id: str, expires: int) -> str:
    digest = hmac.new(secret, f"stream:{chat_id}:{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
