"""The batch lane: a worker's batch items run in a child process of their own, at a lower CPU priority.

Measured beside a 10,000-item batch (``bench/batch.py``), a worker that ran its batch items on the
same event loop as its chats kept that loop busy all the time: two thirds of its samples were the
items' requests, its timers ran 10-100 ms late, and a new chat's wake-up waited in line behind them
(pickup 1 ms idle, 14-50 ms beside the batch). Slots alone cannot keep interactive chats first: an
item in a free slot still takes its turn on the loop, and its CPU from the chats'.

So the items get a process of their own (``multiprocessing``, spawned: no forked event loop), niced
by ``NICE``: the chats' loop has nothing else to do, and when the cores are busy the kernel runs the
chats' processes (worker, API, edge, Redis) first. The lane's ``BatchFeeder`` claims into the slots
the chats leave free as before, reading the parent's running chats from a shared counter that the
parent keeps up to date.

The lane ends with its worker: on a stop it hands its running items back (``BatchFeeder.close``);
if the worker dies (SIGKILL), the lane sees it within ``ORPHAN_CHECK`` s and exits at once, as if
killed with it, so its items' leases lapse and another worker runs them again.

The other way round, the worker watches its lane (``BatchLane.watch``): a lane that dies (killed,
OOM) is logged with its exit code, reaped, and started again after a backoff (``RESTART_DELAYS``),
its items' leases lapsing meanwhile. The batches' upkeep (expiry, a cancel's end, lapsed items
back in line: ``BatchFeeder.tick``) runs in the worker itself too, so it never waits for a lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import signal
from collections import Counter
from collections.abc import Callable, Mapping
from multiprocessing import resource_tracker
from multiprocessing.sharedctypes import Synchronized, SynchronizedArray, SynchronizedString
from typing import TYPE_CHECKING, Final

from streambridge.shared import logs, metrics
from streambridge.shared.redis import connect
from streambridge.shared.settings import Settings

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from redis.asyncio import Redis

log = logging.getLogger("streambridge.worker")

#: the lane's niceness, added to its worker's: the kernel's weight for it is about a tenth of a chat process's
NICE: Final = 10
#: how often the lane looks whether its worker is still there
ORPHAN_CHECK: Final = 0.2
#: how long a stopping lane may take to hand its items back before it is killed
STOP_WAIT: Final = 5.0
#: Redis sockets the lane uses (its results share one pipeline)
CONNECTIONS: Final = 8
#: how often the worker looks whether its lane is still there
WATCH_EVERY: Final = 0.5
#: seconds before a dead lane is started again, one more each time it dies within ``STABLE`` s
RESTART_DELAYS: Final = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STABLE: Final = 60.0
#: the lane's counts, in a shared array its worker reads at each scrape and heartbeat (the lane's own
#: metrics registry is served by nobody): items completed, failed, Redis errors, items running now
COMPLETED, FAILED, REDIS_ERRORS, RUNNING = range(4)
#: the lane's running items by batch, as JSON, for its worker's heartbeat record (bytes, at most)
RUNNING_BY_BATCH: Final = 2048


class _Shared:
    """A counter of the lane's, in its worker's shared array: what ``metrics``' counter was."""

    def __init__(self, counts: SynchronizedArray[int], index: int) -> None:
        self._counts, self._index = counts, index

    def inc(self, amount: float = 1) -> None:
        self._counts[self._index] += int(amount)  # one writer, the lane's loop: no lock needed


class BatchLane:
    """The worker's side: starts the lane, tells it how many chats run here, stops it."""

    def __init__(self, settings: Settings, llm_base_url: str) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._args = (settings, llm_base_url)
        self._busy: Synchronized[int] = self._context.Value("i", 0, lock=False)
        # shared with every lane this worker starts: a restarted lane's counts go on from the last one's
        self._counts: SynchronizedArray[int] = self._context.Array("q", 4, lock=False)
        self._by_batch: SynchronizedString = self._context.Array("c", RUNNING_BY_BATCH)  # type: ignore[assignment]  # locked
        self._seen = [0, 0, 0]  # the lane's counts already added to this process's metrics
        self._process: BaseProcess = self._new_process()
        self._stopping = False
        #: how many times the lane died and was started again
        self.restarts = 0

    def _new_process(self) -> BaseProcess:
        return self._context.Process(
            target=run_lane,
            args=(*self._args, self._busy, os.getpid(), self._counts, self._by_batch),
            name="streambridge-batch-lane",
            daemon=True,
        )

    def start(self) -> None:
        # A terminal's Ctrl-C during the spawn would reach the child before it ignores SIGINT, so the
        # child is born with SIGINT blocked. Blocked, not ignored, here: a SIGINT meant for the
        # worker in that moment waits until the unblock, where ignoring it would lose it (the
        # worker then never stopped).
        # The resource tracker first: (re)starting it unblocks SIGINT, which must stay blocked for the spawn.
        resource_tracker.ensure_running()
        before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self._process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)

    def stopping(self) -> bool:
        """Whether ``stop`` was called (a lane that dies then is not started again)."""
        return self._stopping

    @property
    def alive(self) -> bool:
        """Whether the lane process runs now (false while a dead one waits to start again)."""
        return self._process.pid is not None and self._process.exitcode is None

    async def watch(self) -> None:
        """Runs until cancelled: a lane that died is logged, reaped and started again, with backoff."""
        loop = asyncio.get_running_loop()
        failures = 0
        started = loop.time()
        while True:
            await asyncio.sleep(WATCH_EVERY)
            code = self._process.exitcode  # polls (waitpid WNOHANG): a dead lane is reaped here
            if code is None or self.stopping():
                continue
            failures = 0 if loop.time() - started >= STABLE else failures + 1
            delay = RESTART_DELAYS[min(max(failures - 1, 0), len(RESTART_DELAYS) - 1)]
            log.error(
                "batch lane: pid %s exited with code %s; its items' leases lapse and they run again; "
                "starting a new lane in %g s",
                self._process.pid,
                code,
                delay,
                extra={"event": "batch_lane.died"},
            )
            await asyncio.sleep(delay)
            if self.stopping():  # stopped meanwhile: no new lane
                return
            self._process = self._new_process()
            self.start()
            self.restarts += 1
            started = loop.time()
            log.info("batch lane: started again, pid %s", self._process.pid)

    def sync_metrics(self) -> None:
        """Adds what the lane counted since the last call to this process's metrics (before a scrape)."""
        counters = (metrics.BATCH_COMPLETED, metrics.BATCH_FAILED, metrics.REDIS_ERRORS_WORKER)
        for index, counter in enumerate(counters):
            now = self._counts[index]
            if now > self._seen[index]:
                counter.inc(now - self._seen[index])
                self._seen[index] = now

    @property
    def running(self) -> int:
        """Batch items running in the lane now (as of its last look, at most ``ORPHAN_CHECK`` s ago)."""
        return int(self._counts[RUNNING]) if self.alive else 0

    def running_by_batch(self) -> dict[str, int]:
        """The lane's running items, by batch (the batches beyond what the record holds are left out)."""
        if not self.alive:
            return {}
        with self._by_batch.get_lock():
            raw = self._by_batch.value
        try:
            return dict(json.loads(raw)) if raw else {}
        except ValueError:
            return {}

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def exitcode(self) -> int | None:
        return self._process.exitcode

    def busy(self, chats: int) -> None:
        """The worker's chats running or starting now: the lane leaves their slots alone."""
        self._busy.value = chats

    async def stop(self) -> None:
        """The lane stops claiming, hands its running items back, and exits (killed past ``STOP_WAIT``)."""
        self._stopping = True
        if self._process.pid is None:
            return
        if self._process.exitcode is not None:
            log.warning("batch lane: already gone at the stop (exit code %s)", self._process.exitcode)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._process.pid, signal.SIGTERM)
        await asyncio.to_thread(self._process.join, STOP_WAIT)
        if self._process.exitcode is None:
            log.warning("batch lane: no exit %g s after SIGTERM; killing it (its items' leases lapse)", STOP_WAIT)
            self._process.kill()
            await asyncio.to_thread(self._process.join, 2)


def run_lane(
    settings: Settings,
    llm_base_url: str,
    busy: Synchronized[int],
    parent: int,
    counts: SynchronizedArray[int],
    by_batch: SynchronizedString,
) -> None:
    """The lane process: a ``BatchFeeder`` until SIGTERM, or until its worker is gone."""
    os.nice(NICE)
    # what the lane counts goes to its worker, whose metrics port serves it
    metrics.BATCH_COMPLETED = _Shared(counts, COMPLETED)  # type: ignore[assignment]
    metrics.BATCH_FAILED = _Shared(counts, FAILED)  # type: ignore[assignment]
    metrics.REDIS_ERRORS_WORKER = _Shared(counts, REDIS_ERRORS)  # type: ignore[assignment]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the worker, which stops the lane
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked since the spawn (BatchLane.start)
    # as the CLI configures its worker: JSON or text, its role, secrets redacted, noisy loggers quiet
    logs.configure(
        role="worker",
        level=settings.log_level,
        format=settings.log_format,
        content=settings.log_content,
        secrets=(settings.secret, settings.llm_api_key),
    )
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_feed_until_stopped(settings, llm_base_url, busy, parent, counts, by_batch))


async def _feed_until_stopped(
    settings: Settings,
    llm_base_url: str,
    busy: Synchronized[int],
    parent: int,
    counts: SynchronizedArray[int],
    by_batch: SynchronizedString,
) -> None:
    from streambridge.workers.batches import BatchFeeder  # the SDK and the feeder load in the lane only
    from streambridge.workers.llm import make_client

    assert settings.redis_url is not None
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    redis: Redis = connect(settings.redis_url, max_connections=CONNECTIONS)
    llm = make_client(llm_base_url, settings.llm_api_key)
    feeder = BatchFeeder(redis, llm, settings, busy=lambda: busy.value, stopping=stop.is_set)
    feeder.start()
    log.info(
        "batch lane: running batch items, pid %d, nice +%d", os.getpid(), NICE, extra={"event": "batch_lane.started"}
    )
    told = b""
    while not stop.is_set():
        if os.getppid() != parent:  # the worker died: so does its lane, handing nothing back
            log.warning("batch lane: its worker is gone; exiting (its items run again elsewhere)")
            os._exit(1)
        counts[RUNNING] = len(feeder.running)
        told = _tell_running(feeder.running, by_batch, told)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ORPHAN_CHECK):
                await stop.wait()
    try:
        await feeder.close()
    finally:
        counts[RUNNING] = 0
        _tell_running({}, by_batch, told)
        await llm.close()
        await redis.aclose()


def _tell_running(running: Mapping[tuple[str, int], object], by_batch: SynchronizedString, told: bytes) -> bytes:
    """Writes the running items by batch where the worker reads them, if they changed; what it wrote."""
    items = Counter(batch_id for batch_id, _ in running)
    raw = json.dumps(dict(items.most_common()), separators=(",", ":")).encode()
    while len(raw) >= RUNNING_BY_BATCH:  # the busiest batches, as many as fit
        items = Counter(dict(items.most_common(max(0, len(items) - 1))))
        raw = json.dumps(dict(items.most_common()), separators=(",", ":")).encode()
    if raw != told:
        with by_batch.get_lock():
            by_batch.value = raw
    return raw
