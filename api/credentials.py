"""Who may call: visitor tokens and API keys, one kind of credential with per-credential limits.

A bearer token is ``sbv_<id>_<secret>`` (a visitor) or ``sbk_<id>_<secret>`` (an API key). The
id is public (``streambridge keys list`` shows it, stream tokens carry it); the secret is shown
once and Redis keeps only its SHA-256, in the credential's record under its id. Deleting that
record revokes the credential, and with it every stream token it was issued.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Final, Literal, NamedTuple

import msgspec

from streambridge.shared import keys
from streambridge.shared.errors import Unauthorized
from streambridge.shared.settings import Settings

if TYPE_CHECKING:
    from redis.asyncio import Redis

TOKEN: Final = re.compile(r"\Asb([vk])_([0-9a-f]{16})_([A-Za-z0-9_-]{43})\Z")
USER: Final = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}\Z")

Positive = Annotated[int, msgspec.Meta(ge=1)]


class Limits(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """One credential's overrides of the settings' limits; unset means the default for its kind."""

    chats_per_minute: Positive | None = None
    max_running_chats: Positive | None = None
    max_open_streams: Positive | None = None
    max_messages: Positive | None = None
    max_prompt_chars: Positive | None = None
    max_tokens: Positive | None = None
    batch_running_items: Positive | None = None
    batch_max_running_items: Positive | None = None
    file_bytes: Positive | None = None


class Credential(msgspec.Struct, frozen=True, omit_defaults=True):
    id: str
    user: str
    kind: Literal["visitor", "key"]
    secret_sha256: str
    created_at: str
    limits: Limits = Limits()


@dataclass(frozen=True)
class Quota:
    """The limits that apply to one request: the settings for the credential's kind, then its overrides."""

    chats_per_minute: int
    max_running_chats: int
    max_open_streams: int
    max_messages: int
    max_prompt_chars: int
    max_tokens: int
    #: the key's own ``--max-tokens``: also the ``max_tokens`` of its chats that name none
    default_max_tokens: int | None = None
    #: items of the user's batches running at once
    batch_running_items: int = 400
    #: items of one of the user's batches running at once
    batch_max_running_items: int = 200
    #: bytes of uploaded files the user may keep stored at once
    file_bytes: int = 1024 * 1024 * 1024
    #: the key's own batch limits, kept with each of its batches; None: the workers' live settings apply
    batch_running_items_override: int | None = None
    batch_max_running_items_override: int | None = None
    #: the vendor fields a request may pass to the upstream; None: any well-formed name
    vendor_fields: frozenset[str] | None = None


@dataclass(frozen=True)
class Identity:
    user: str
    credential: str
    quota: Quota


class Known(NamedTuple):
    """A credential a process has seen, and the identity it carries."""

    credential: Credential
    identity: Identity


#: credentials a process remembers (they never change; revoking one deletes its record)
KNOWN_CREDENTIALS: Final = 10_000


def remember(known: dict[str, Known], credential: Credential, identity: Identity) -> None:
    """Keeps the ``KNOWN_CREDENTIALS`` most recently used: whoever uses one again skips reading it,
    and only checks in its next round trip that it still exists."""
    if known.pop(credential.id, None) is None and len(known) >= KNOWN_CREDENTIALS:
        del known[next(iter(known))]  # the least recently used
    known[credential.id] = Known(credential, identity)


def recall(known: dict[str, Known], token: str) -> Identity | None:
    """The identity of a remembered credential, if ``token`` is genuinely its bearer token."""
    remembered = known.get(credential_id(token) or "")
    return remembered.identity if remembered is not None and genuine(token, remembered.credential) else None


_decoder: Final = msgspec.json.Decoder(Credential)


def quota(settings: Settings, credential: Credential) -> Quota:
    visitor = credential.kind == "visitor"
    o = credential.limits
    return Quota(
        chats_per_minute=o.chats_per_minute
        or (settings.visitor_chats_per_minute if visitor else settings.chats_per_minute),
        max_running_chats=o.max_running_chats
        or (settings.visitor_max_running_chats if visitor else settings.max_running_chats),
        max_open_streams=o.max_open_streams
        or (settings.visitor_max_open_streams if visitor else settings.max_open_streams),
        max_messages=o.max_messages or settings.max_messages,
        max_prompt_chars=o.max_prompt_chars or settings.max_prompt_chars,
        max_tokens=o.max_tokens or settings.max_tokens_cap,
        default_max_tokens=o.max_tokens,
        batch_running_items=o.batch_running_items or settings.batch_user_max_running_items,
        batch_max_running_items=o.batch_max_running_items or settings.batch_max_running_items,
        file_bytes=o.file_bytes or (settings.visitor_file_bytes_per_user if visitor else settings.file_bytes_per_user),
        batch_running_items_override=o.batch_running_items,
        batch_max_running_items_override=o.batch_max_running_items,
        vendor_fields=names(settings.visitor_vendor_fields if visitor else settings.vendor_fields),
    )


def names(listed: str) -> frozenset[str] | None:
    """A setting's comma-separated names; None for ``*``, any name."""
    parts = frozenset(part.strip() for part in listed.split(",") if part.strip())
    return None if "*" in parts else parts


async def issue(
    redis: Redis, user: str, kind: Literal["visitor", "key"], *, ttl: int | None = None, limits: Limits | None = None
) -> tuple[str, Credential]:
    """A new credential: its bearer token (the only time the secret exists) and its record."""
    cid, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    created_at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    credential = Credential(cid, user, kind, _sha256(secret), created_at, limits or Limits())
    await redis.set(keys.credential(cid), msgspec.json.encode(credential), ex=ttl)
    if kind == "key":
        await redis.sadd(keys.api_keys(), cid)  # type: ignore[misc]
    return f"sb{kind[0]}_{cid}_{secret}", credential


async def create_visitor(redis: Redis, ttl: int) -> tuple[str, str]:
    """A new anonymous user and its bearer token, which expires after ``ttl`` seconds."""
    token, credential = await issue(redis, "visitor_" + secrets.token_hex(8), "visitor", ttl=ttl)
    return token, credential.user


async def load(redis: Redis, cid: str) -> Credential | None:
    raw = await redis.get(keys.credential(cid))
    return None if raw is None else _decoder.decode(raw)


async def identify(redis: Redis, settings: Settings, token: str, known: dict[str, Known] | None = None) -> Identity:
    """The identity behind a bearer token, or 401 (unknown, expired or revoked alike). With
    ``known``, the credential read is remembered there."""
    match = TOKEN.match(token)
    record = None if match is None else await redis.get(keys.credential(match[2]))
    credential = check(token, record)
    identity = identity_of(settings, credential)
    if known is not None:
        remember(known, credential, identity)
    return identity


def credential_id(token: str) -> str | None:
    """The id a bearer token names, if it is shaped like one; :func:`check` decides if it is genuine."""
    match = TOKEN.match(token)
    return None if match is None else match[2]


def check(token: str, record: bytes | None) -> Credential:
    """The credential, if ``record`` (what Redis holds under the token's id) matches the token; else 401."""
    credential = None if record is None else _decoder.decode(record)
    if credential is None or not genuine(token, credential):
        raise Unauthorized("the token is unknown, expired or revoked")
    return credential


def genuine(token: str, credential: Credential) -> bool:
    """Whether ``token`` is the bearer token of ``credential`` (its id, kind and secret)."""
    match = TOKEN.match(token)
    return (
        match is not None
        and match[2] == credential.id
        and credential.kind[0] == match[1]
        and hmac.compare_digest(credential.secret_sha256, _sha256(match[3]))
    )


def identity_of(settings: Settings, credential: Credential) -> Identity:
    return Identity(credential.user, credential.id, quota(settings, credential))


async def list_keys(redis: Redis) -> list[Credential]:
    cids = sorted(c.decode() for c in await redis.smembers(keys.api_keys()))  # type: ignore[misc]
    records = await redis.mget([keys.credential(c) for c in cids]) if cids else []
    return sorted((_decoder.decode(r) for r in records if r is not None), key=lambda c: (c.user, c.created_at))


async def revoke(redis: Redis, key_or_id: str) -> bool:
    """Revokes a credential, given whole or by its id; True if there was one to revoke."""
    match = TOKEN.match(key_or_id)
    cid = match[2] if match is not None else key_or_id
    if not re.fullmatch(r"[0-9a-f]{16}", cid):
        return False
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.credential(cid))
        pipe.srem(keys.api_keys(), cid)
        deleted, _ = await pipe.execute()
    return bool(deleted)


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
