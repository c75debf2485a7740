"""``streambridge keys create | list | revoke``: API keys, for the operator.

A key is printed once, alone on stdout (``KEY=$(streambridge keys create --user acme)``); Redis
keeps only its hash. ``list`` shows ids, users and limits, never a secret.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import msgspec

from streambridge.api.credentials import USER, Limits, issue, list_keys, revoke
from streambridge.shared.settings import Settings

if TYPE_CHECKING:
    from redis.asyncio import Redis

LIMIT_FLAGS = {
    "chats_per_minute": "chats a minute",
    "max_running_chats": "chats queued or running at once",
    "max_open_streams": "SSE streams open at once",
    "max_messages": "messages in one chat",
    "max_prompt_chars": "characters in one chat's prompt",
    "max_tokens": "the largest max_tokens a chat may ask for",
    "batch_running_items": "items of the user's batches running at once",
    "batch_max_running_items": "items of one of the user's batches running at once",
    "file_bytes": "bytes of uploaded files the user may keep stored at once",
}


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="API keys: create, list, revoke (needs STREAMBRIDGE_REDIS_URL)")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="a new key for USER; prints it once")
    create.add_argument("--user", required=True, type=user_name, help="the user the key acts as (chats belong to it)")
    for name, meaning in LIMIT_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        create.add_argument(flag, type=positive, help=f"limit: {meaning} (default: the setting)")
    actions.add_parser("list", help="every key: id, user, created, limits")
    gone = actions.add_parser("revoke", help="revoke a key at once, with every stream URL issued to it")
    gone.add_argument("key", help="the key's id (from `keys list`) or the key itself")


def user_name(value: str) -> str:
    if not USER.match(value) or value.startswith("visitor_"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a user name (letters, digits, _.@-; up to 64)")
    return value


def positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number")
    return int(value)


def limits_warning(limits: Limits, settings: Settings) -> str | None:
    """A per-batch override above the user's limit across batches cannot take effect: say so."""
    per_batch, per_user = limits.batch_max_running_items, limits.batch_running_items
    user_limit = per_user if per_user is not None else settings.batch_user_max_running_items
    if per_batch is None or per_batch <= user_limit:
        return None
    return (
        f"--batch-max-running-items {per_batch} is above the user's limit across their batches "
        f"({user_limit}): at most {user_limit} of their items run at once"
    )


async def run(args: argparse.Namespace, settings: Settings) -> int:
    assert settings.redis_url is not None
    from streambridge.shared.redis import connect  # the server extra: not needed to build the CLI

    redis: Redis = connect(settings.redis_url, max_connections=2)
    try:
        if args.keys_command == "create":
            limits = Limits(**{name: getattr(args, name) for name in LIMIT_FLAGS if getattr(args, name) is not None})
            if (warning := limits_warning(limits, settings)) is not None:
                print(f"streambridge keys: warning: {warning}", file=sys.stderr)
            key, credential = await issue(redis, args.user, "key", limits=limits)
            print(key, flush=True)
            print(f"key {credential.id} for {credential.user}: shown once, store it now", file=sys.stderr)
            return 0
        if args.keys_command == "list":
            print(f"{'ID':<17} {'USER':<24} {'CREATED':<21} LIMITS")
            for credential in await list_keys(redis):
                overrides = msgspec.structs.asdict(credential.limits)
                shown = " ".join(f"{k}={v}" for k, v in overrides.items() if v is not None) or "defaults"
                print(f"{credential.id:<17} {credential.user:<24} {credential.created_at:<21} {shown}")
            return 0
        if await revoke(redis, args.key):
            print("revoked", flush=True)
            return 0
        print("streambridge keys: no such key", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()
