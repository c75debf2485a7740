"""Presence: every long-running process announces itself in Redis, with a heartbeat that lapses when it dies.

Each process writes its record every :data:`INTERVAL` seconds: ``keys.process(id)`` holds it (the
JSON of a :data:`Record`) with a TTL of :data:`TTL` seconds, and ``keys.processes()`` indexes the
ids, scored by when each lapses (Redis's clock). A process that dies stops renewing: its record
expires within ``TTL`` s, and the next beat of any process drops its id from the index. A process
that stops cleanly removes both at once (:meth:`Heartbeat.leave`).

A worker announces a :class:`WorkerRecord`; a process serving HTTP (``api``, ``edge``, and ``up``'s
API + edge) a :class:`ServerRecord`. ``up`` announces its server and its worker apart, under two ids.

Reading every process is two round trips, however many there are: the index, then every record
(MGET); an id whose record has expired is a process gone (:func:`read_records`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, Final

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from streambridge.shared import keys
from streambridge.shared.machine import Call, call, define
from streambridge.shared.redis import connect

log = logging.getLogger("streambridge.presence")

#: seconds between two heartbeats of a process
INTERVAL: Final = 1.0
#: seconds a heartbeat keeps its process alive: a process that died shows as gone within this long
TTL: Final = 4.0
#: a worker's record names at most this many of the chats it runs (it counts them all)
NAMED_CHATS: Final = 50

#: when this process started, by its monotonic clock: what ``uptime_s`` counts from
_STARTED: Final = time.monotonic()


def _version() -> str:
    try:
        return package_version("streambridge")
    except PackageNotFoundError:  # pragma: no cover - run from a checkout without installing
        return ""


VERSION: Final = _version()


class _Process(msgspec.Struct, kw_only=True):
    id: str
    host: str
    pid: int
    #: when the process started (Unix seconds, by its host's clock: for information, as hosts' clocks differ)
    started_at: float
    version: str = ""
    #: ``running``, or ``stopping``: it takes no more work and finishes what it has (a graceful stop).
    #: A plain string, not a closed set: a viewer shows a state a newer process adds as it is, rather
    #: than dropping the record (which would show a live process as gone).
    state: str = "running"
    #: seconds since the process started, by its own monotonic clock (no clock of another host involved)
    uptime_s: float = 0.0


class WorkerRecord(_Process, tag="worker", tag_field="kind", kw_only=True):
    """A worker (``streambridge worker``, or ``up``'s): what it runs now."""

    #: chats it may run at once
    concurrency: int = 0
    #: chats it runs now, and the ids of up to ``NAMED_CHATS`` of them
    chats: int = 0
    chat_ids: list[str] = msgspec.field(default_factory=list)
    #: batch items it runs now, by batch id
    batch_items: dict[str, int] = msgspec.field(default_factory=dict)
    #: chats it started in the last 60 s (a chat recovered from a dead worker counts again)
    chats_last_minute: int = 0


class ServerRecord(_Process, tag="server", tag_field="kind", kw_only=True):
    """A process serving HTTP: ``streambridge api``, ``edge``, or ``up``'s API + edge."""

    #: where it listens, as it said at start
    port: int = 0
    #: what it serves: ``api``, ``edge`` or both
    serves: list[str] = msgspec.field(default_factory=list)
    #: SSE streams open on it now (chat events, and streamed completions and responses)
    open_streams: int = 0


Record = WorkerRecord | ServerRecord
_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(Record)


def encode_record(record: Record) -> bytes:
    return _encoder.encode(record)


def decode_record(data: bytes | str) -> Record:
    return _decoder.decode(data)


def process_id(kind: str) -> str:
    """A new id for this process: readable (kind, host, pid) and unique (a pid is reused)."""
    return f"{kind}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def identity(kind: str) -> dict[str, Any]:
    """The fields every record of this process shares: ``WorkerRecord(**identity("worker"), ...)``."""
    return {
        "id": process_id(kind),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": time.time(),
        "version": VERSION,
    }


def uptime() -> float:
    """Seconds since this process started (monotonic), rounded for the record."""
    return round(time.monotonic() - _STARTED, 1)


# The record, renewed, and its id indexed by when it lapses; ids that lapsed leave the index.
# ARGV: id, record, TTL (ms).
BEAT: Final = define(
    "BEAT",
    """
local now = now_ms()
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return 1
""",
)


def beat(record: Record, ttl_ms: int) -> Call:
    return Call(BEAT, [keys.processes(), keys.process(record.id)], [record.id, encode_record(record), str(ttl_ms)])


async def read_records(redis: Redis) -> list[Record]:
    """Every live process's record, in id order. A record this version cannot read (a newer
    process's kind) is left out."""
    ids = await redis.zrange(keys.processes(), 0, -1)
    if not ids:
        return []
    records: list[Record] = []
    for raw in await redis.mget([keys.process(i.decode()) for i in ids]):
        if raw is None:  # lapsed: the process is gone
            continue
        with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
            records.append(decode_record(raw))
    return sorted(records, key=lambda r: r.id)


class Heartbeat:
    """Announces ``describe()``'s record every ``interval`` s; :meth:`leave` withdraws it.

    ``describe`` is called at each beat and must be quick (it reads the process's own state). A beat
    that fails (Redis unreachable) is logged once per outage: meanwhile the process shows as gone,
    which is what it is to the rest of the deployment. :meth:`nudge` beats at once (a state changed);
    :meth:`finish` lets the beat in flight end and stops the loop (then :meth:`leave`).
    """

    def __init__(
        self, redis: Redis, describe: Callable[[], Record], *, interval: float = INTERVAL, ttl: float = TTL
    ) -> None:
        self.redis, self.describe = redis, describe
        self.interval, self.ttl = interval, ttl
        self.id = ""
        self._wake = asyncio.Event()
        self._finishing = False

    async def beat(self) -> None:
        record = self.describe()
        self.id = record.id
        await call(self.redis, beat(record, int(self.ttl * 1000)))

    async def run(self) -> None:
        failing = False
        while not self._finishing:
            try:
                async with asyncio.timeout(self.ttl):
                    await self.beat()
            except Exception as exc:
                if not failing:
                    # a bug in describe() deserves its traceback; Redis unreachable, one line
                    trace = not isinstance(exc, RedisError | OSError | TimeoutError)
                    log.warning(
                        "heartbeat: cannot announce %s (%s); it shows as gone meanwhile",
                        self.id,
                        _reason(exc),
                        exc_info=trace,
                    )
                failing = True
            else:
                if failing:
                    log.info("heartbeat: %s announced again", self.id)
                failing = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()

    def nudge(self) -> None:
        """The next beat now, not at the end of the interval (the record changed: a stop began)."""
        self._wake.set()

    def finish(self) -> None:
        """No beat after the one in flight: that one ends (it may be on the wire already, and a beat
        cancelled here could still land in Redis after :meth:`leave`, bringing the record back)."""
        self._finishing = True
        self._wake.set()

    async def leave(self) -> None:
        """The record goes at once (a clean stop): the view need not wait for it to lapse."""
        if not self.id:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.processes(), self.id)
            pipe.delete(keys.process(self.id))
            await pipe.execute()


#: how long a stopping process may spend withdrawing its records (the beat in flight ending, then the
#: withdrawal), whatever Redis does
LEAVE_WAIT: Final = 0.5


@contextlib.asynccontextmanager
async def announced(redis_url: str, *describe: Callable[[], Record]) -> AsyncIterator[list[Heartbeat]]:
    """Announces each record while the block runs (``up`` has two: its server and its worker), on a
    connection of their own (a busy pool never delays a beat); withdraws them as the block ends,
    within ``LEAVE_WAIT`` s: a frozen Redis never holds a stop (the records then lapse by themselves).
    A beat in flight ends before the withdrawal, so it cannot bring a record back after it."""
    redis = connect(redis_url, max_connections=2, client_class=Redis)
    heartbeats = [Heartbeat(redis, d) for d in describe]
    tasks = [asyncio.create_task(h.run(), name="heartbeat") for h in heartbeats]
    try:
        yield heartbeats
    finally:
        for heartbeat in heartbeats:
            heartbeat.finish()
        try:
            async with asyncio.timeout(LEAVE_WAIT):
                await asyncio.gather(*tasks)
                await asyncio.gather(*(h.leave() for h in heartbeats))
        except Exception as exc:
            log.warning("heartbeat: cannot withdraw (%s); the records lapse within %.0f s", _reason(exc), TTL)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await redis.aclose(close_connection_pool=True)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
