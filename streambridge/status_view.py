"""``streambridge status``'s view of a deployment (queue, workers, API and edges, batches), from Redis.

The data is :func:`streambridge.shared.status.gather_snapshot`'s; this module only draws it
(:func:`render`, a pure function of a snapshot) and refreshes it. ``--once`` prints one snapshot and
exits; ``--json`` prints snapshots as JSON, one a line, for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any, Final

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from streambridge.serve import catch_signals
from streambridge.shared.errors import StreambridgeError
from streambridge.shared.presence import ServerRecord, WorkerRecord
from streambridge.shared.redis import connect
from streambridge.shared.settings import Settings
from streambridge.shared.status import Snapshot, gather_snapshot

#: how long one look may take before it counts as Redis unreachable
READ_TIMEOUT: Final = 10.0
#: chat ids shown per worker (the record names up to ``presence.NAMED_CHATS``)
SHOWN_CHATS: Final = 3
SHORT_ID: Final = 12


async def main(args: argparse.Namespace, settings: Settings) -> int:
    assert settings.redis_url is not None, "the CLI requires it"
    redis = connect(settings.redis_url, max_connections=2, client_class=Redis)
    try:
        if args.once:
            snapshot = await look(redis)
            if args.json:
                print(msgspec.json.encode(snapshot).decode(), flush=True)
            else:
                Console().print(render(snapshot))
            return 0
        return await watch(redis, args.interval, as_json=args.json)
    finally:
        await redis.aclose(close_connection_pool=True)


async def look(redis: Redis) -> Snapshot:
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            return await gather_snapshot(redis)
    except (RedisError, OSError, TimeoutError) as exc:
        raise StreambridgeError(f"status: cannot read the deployment from Redis ({_reason(exc)})") from None


async def watch(redis: Redis, every: float, *, as_json: bool, console: Console | None = None) -> int:
    """Refreshes until SIGINT/SIGTERM (exit 0). Redis unreachable is shown, and tried again."""
    stop = catch_signals()
    if as_json:
        async for snapshot in snapshots(redis, every, stop):
            if isinstance(snapshot, Snapshot):
                print(msgspec.json.encode(snapshot).decode(), flush=True)
            else:
                print(f"streambridge: {snapshot}", file=sys.stderr, flush=True)
        return 0
    with Live(console=console or Console(), auto_refresh=False, redirect_stdout=False) as live:
        async for snapshot in snapshots(redis, every, stop):
            if isinstance(snapshot, Snapshot):
                live.update(render(snapshot), refresh=True)
            else:
                live.update(Text(f"{snapshot}; trying again", style="bold red"), refresh=True)
    return 0


async def snapshots(
    redis: Redis, every: float, stop: asyncio.Future[Any]
) -> AsyncIterator[Snapshot | StreambridgeError]:
    """A snapshot (or why there is none) every ``every`` s until ``stop``, which also cuts short a look
    that waits on an unresponsive Redis: Ctrl-C leaves at once."""
    while not stop.done():
        look_once = asyncio.ensure_future(look(redis))
        await asyncio.wait([look_once, stop], return_when=asyncio.FIRST_COMPLETED)
        if not look_once.done():
            look_once.cancel()
            await asyncio.gather(look_once, return_exceptions=True)
            return
        try:
            snapshot: Snapshot | StreambridgeError = look_once.result()
        except StreambridgeError as exc:
            snapshot = exc
        yield snapshot
        await asyncio.wait([stop], timeout=every)


def render(s: Snapshot) -> RenderableType:
    """The whole view of one snapshot."""
    return Group(_summary(s), _workers(s), _servers(s), _batches(s))


def _summary(s: Snapshot) -> Text:
    text = Text()
    text.append("queue ", style="bold")
    text.append(f"{s.queued:,} waiting · {s.running:,} running")
    text.append("   batch items ", style="bold")
    text.append(f"{s.batch_waiting:,} waiting · {s.batch_running:,} running")
    text.append("   chats/min ", style="bold")
    text.append(f"{s.chats_per_minute:,}")
    return text


def _workers(s: Snapshot) -> RenderableType:
    if not s.workers:
        return Text("no worker alive: queued chats wait", style="bold red")
    table = _table(f"workers ({len(s.workers)})", "worker", "pid>", "up", "chats>", "batch items>", "started/min>")
    table.add_column("running")
    for w in s.workers:
        table.add_row(
            _name(w),
            str(w.pid),
            age(s.at - w.started_at),
            f"{w.chats:,}/{w.concurrency:,}",
            f"{sum(w.batch_items.values()):,}",
            f"{w.chats_last_minute:,}",
            _running(w),
        )
    return table


def _running(w: WorkerRecord) -> str:
    """The first few chats it runs, how many more, then its batch items by batch."""
    shown = [_short(c) for c in w.chat_ids[:SHOWN_CHATS]]
    more = w.chats - len(shown)
    if more > 0:
        shown.append(f"+{more:,} more")
    return ", ".join([*shown, *(f"{b}×{n:,}" for b, n in sorted(w.batch_items.items()))])


def _short(chat_id: str) -> str:
    """A chat's id cut to what tells it apart on a screen (``--json`` has them whole)."""
    return chat_id if len(chat_id) <= SHORT_ID else chat_id[: SHORT_ID - 1] + "…"


def _servers(s: Snapshot) -> RenderableType:
    if not s.servers:
        return Text("no API or edge alive", style="bold red")
    streams = sum(x.open_streams for x in s.servers)
    title = f"api and edges ({len(s.servers)}, {streams:,} open streams)"
    table = _table(title, "process", "serves", "port>", "pid>", "up", "open streams>")
    for x in s.servers:
        streams_here = f"{x.open_streams:,}" if "edge" in x.serves else "-"
        table.add_row(_name(x), " + ".join(x.serves), str(x.port), str(x.pid), age(s.at - x.started_at), streams_here)
    return table


def _batches(s: Snapshot) -> RenderableType:
    if not s.batches:
        return Text("no batch running", style="dim")
    title = f"batches ({len(s.batches)}" + (f", {s.batches_not_shown} more not shown)" if s.batches_not_shown else ")")
    table = _table(title, "batch", "owner", "status", "progress", "done>", "failed>", "running>", "waiting>")
    table.add_column("expires in", justify="right")
    for b in s.batches:
        done = b.completed + b.failed
        table.add_row(
            b.id,
            b.owner,
            b.status,
            ProgressBar(total=max(b.total, 1), completed=done, width=20),
            f"{done:,}/{b.total:,}",
            f"{b.failed:,}",
            f"{b.running:,}",
            f"{b.waiting:,}",
            age(b.expires_at - s.at),
        )
    return table


def _table(title: str, *columns: str) -> Table:
    """A table of ``columns``; a name ending in ``>`` is right-aligned (a number)."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column.rstrip(">"), justify="right" if column.endswith(">") else "left")
    return table


def _name(record: WorkerRecord | ServerRecord) -> Text:
    if record.state == "stopping":
        return Text(f"{record.id} (stopping)", style="yellow")
    return Text(record.id)


def age(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``3d04h``: a duration in two units at most."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
