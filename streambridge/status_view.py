"""``streambridge status``'s view of a deployment (queue, workers, API and edges, batches), from Redis.

The data is :func:`streambridge.shared.status.gather_snapshot`'s; this module only draws it
(:func:`render`, a pure function of a snapshot) and refreshes it. ``--once`` prints one snapshot and
exits; ``--json`` prints snapshots as JSON, one a line, for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.styled import Styled
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
    stop = catch_signals()
    redis = connect(settings.redis_url, max_connections=2, client_class=Redis)
    try:
        if args.once:
            snapshot = await look_unless(redis, stop)
            if snapshot is None:  # SIGINT/SIGTERM while Redis had not answered: a clean exit
                return 0
            if args.json:
                write_line(msgspec.json.encode(snapshot).decode())
            else:
                Console().print(render(snapshot))
            return 0
        return await watch(redis, args.interval, as_json=args.json, stop=stop)
    except BrokenPipeError:  # the reader left (``| head -1``): nobody to tell, nothing wrong
        _silence_stdout()
        return 0
    finally:
        await redis.aclose(close_connection_pool=True)


async def look(redis: Redis) -> Snapshot:
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            return await gather_snapshot(redis)
    except (RedisError, OSError, TimeoutError) as exc:
        raise StreambridgeError(f"status: cannot read the deployment from Redis ({_reason(exc)})") from None


async def look_unless(redis: Redis, stop: asyncio.Future[Any]) -> Snapshot | None:
    """:func:`look`, or ``None`` as soon as ``stop`` comes (a look waiting on a frozen Redis is cut short)."""
    look_once = asyncio.ensure_future(look(redis))
    await asyncio.wait([look_once, stop], return_when=asyncio.FIRST_COMPLETED)
    if look_once.done():
        return look_once.result()
    look_once.cancel()
    await asyncio.gather(look_once, return_exceptions=True)
    return None


def write_line(line: str) -> None:
    """One line on stdout, flushed (a script reads each as it comes)."""
    print(line, flush=True)


def _silence_stdout() -> None:
    """Python's flush of stdout at exit would fail again on the closed pipe, and say so on stderr."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


async def watch(
    redis: Redis,
    every: float,
    *,
    as_json: bool,
    console: Console | None = None,
    stop: asyncio.Future[Any] | None = None,
) -> int:
    """Refreshes until SIGINT/SIGTERM (exit 0). Redis unreachable is shown, with the last snapshot and
    its age, and tried again."""
    stop = stop if stop is not None else catch_signals()
    if as_json:
        async for snapshot in snapshots(redis, every, stop):
            if isinstance(snapshot, Snapshot):
                write_line(msgspec.json.encode(snapshot).decode())
            else:
                print(f"streambridge: {snapshot}", file=sys.stderr, flush=True)
        return 0
    last: tuple[Snapshot, float] | None = None
    live = Live(console=console or Console(), auto_refresh=False, redirect_stdout=False, vertical_overflow="visible")
    with live:
        async for snapshot in snapshots(redis, every, stop):
            if isinstance(snapshot, Snapshot):
                last = (snapshot, time.monotonic())
                live.update(render(snapshot), refresh=True)
            else:
                live.update(unreachable(snapshot, last), refresh=True)
    return 0


def unreachable(error: StreambridgeError, last: tuple[Snapshot, float] | None) -> RenderableType:
    """The error, and the last snapshot seen, dimmed, with how old it is."""
    line = Text(f"{error}; trying again", style="bold red")
    if last is None:
        return line
    snapshot, seen = last
    older = Text(f"last seen {age(time.monotonic() - seen)} ago:", style="dim")
    return Group(line, older, Styled(render(snapshot), style="dim"))


async def snapshots(
    redis: Redis, every: float, stop: asyncio.Future[Any]
) -> AsyncIterator[Snapshot | StreambridgeError]:
    """A snapshot (or why there is none) every ``every`` s until ``stop``, which also cuts short a look
    that waits on an unresponsive Redis: Ctrl-C leaves at once."""
    while not stop.done():
        try:
            snapshot: Snapshot | StreambridgeError | None = await look_unless(redis, stop)
        except StreambridgeError as exc:
            snapshot = exc
        if snapshot is None:
            return
        yield snapshot
        await asyncio.wait([stop], timeout=every)


def render(s: Snapshot) -> RenderableType:
    """The whole view of one snapshot."""
    return Group(_summary(s), _workers(s), _servers(s), _batches(s))


def _summary(s: Snapshot) -> Text:
    text = Text()
    text.append("queue ", style="bold")
    text.append(f"{s.queued:,} waiting · {s.running:,} running")
    if s.orphaned:
        text.append(f" · {s.orphaned:,} orphaned (worker lost)", style="yellow")
    # past MAX_BATCHES the sums cover only the batches read: at least this many
    at_least = "≥" if s.batches_not_shown else ""
    text.append("   batch items ", style="bold")
    text.append(f"{at_least}{s.batch_waiting:,} waiting · {at_least}{s.batch_running:,} running")
    if s.batch_orphaned:
        text.append(f" ({at_least}{s.batch_orphaned:,} of them orphaned)", style="yellow")
    text.append("   started/min (live workers) ", style="bold")
    text.append(f"{s.chats_per_minute:,}")
    return text


def _workers(s: Snapshot) -> RenderableType:
    if not s.workers:
        return Text("no worker alive: queued chats wait", style="bold red")
    table = _table(f"workers ({len(s.workers)})", "worker", "pid>", "up>", "chats>", "batch items>", "started/min>")
    table.add_column("running")
    for w in s.workers:
        table.add_row(
            _name(w),
            str(w.pid),
            age(w.uptime_s),
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
    table = _table(title, "process", "serves", "port>", "pid>", "up>", "open streams>")
    for x in s.servers:
        streams_here = f"{x.open_streams:,}" if "edge" in x.serves else "-"
        table.add_row(_name(x), " + ".join(x.serves), str(x.port), str(x.pid), age(x.uptime_s), streams_here)
    return table


def _batches(s: Snapshot) -> RenderableType:
    if not s.batches:
        return Text("no batch running", style="dim")
    more = f", {s.batches_not_shown:,} more not shown: the sums above leave them out" if s.batches_not_shown else ""
    title = f"batches ({len(s.batches)}{more})"
    table = _table(title, "batch", "owner", "status", "progress", "finished>", "failed>", "running>", "waiting>")
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
            f"{b.waiting:,}" + (f" ({b.orphaned:,} orphaned)" if b.orphaned else ""),
            age(b.expires_at - s.at),
        )
    return table


def _table(title: str, *columns: str) -> Table:
    """A table of ``columns``; a name ending in ``>`` is right-aligned (a number). The first column
    (an id) folds rather than being cut: on a narrow terminal an id stays whole, over lines."""
    table = Table(title=title, title_justify="left")
    for n, column in enumerate(columns):
        fold: dict[str, Any] = {"overflow": "fold", "min_width": SHORT_ID} if n == 0 else {}
        table.add_column(column.rstrip(">"), justify="right" if column.endswith(">") else "left", **fold)
    return table


def _name(record: WorkerRecord | ServerRecord) -> Text:
    """Its id, and its state unless ``running`` (one a newer version adds shows as it is)."""
    if record.state != "running":
        return Text(f"{record.id} ({record.state})", style="yellow")
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
