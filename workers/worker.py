"""The worker: arq's loop (``shared.jobs.QueueWorker``) starting chats the moment they are queued,
and a graceful stop that no frozen Redis can hold up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

from arq.connections import ArqRedis

from streambridge.shared import keys, metrics
from streambridge.shared.jobs import QueueWorker, back_off
from streambridge.shared.redis import close_client, connect, connect_streams
from streambridge.shared.settings import Settings
from streambridge.workers.batches import BatchFeeder
from streambridge.workers.lane import NICE, BatchLane
from streambridge.workers.lease import Lease
from streambridge.workers.llm import make_client
from streambridge.workers.reaper import beat_forever, first_beat, listen_for_cancels, reap_forever, retire
from streambridge.workers.runner import ChatRunner, Stop

log = logging.getLogger("streambridge.worker")

#: seconds between two of arq's scans of the queue, in a long-running worker
FULL_POLL: Final = 0.5
#: how long a wake-up listener blocks at a time; it looks again whether it may take chats after it
WAKE_WAIT: Final = 0.5
#: Redis sockets per worker, however many chats it runs (appends share one pipeline)
CONNECTIONS: Final = 16
#: on a stop, how long handed-back chats may take to let go, and closing may take, whatever Redis does
HANDBACK_WAIT: Final = 3.0
CLOSE_WAIT: Final = 2.0
#: on a stop, how long telling reapers at once that the worker is gone may take
RETIRE_WAIT: Final = 0.5


class ChatWorker(QueueWorker):
    """Starts a chat the moment it is queued.

    The API pushes each chat's id on ``keys.wake()``, oldest last, and a task of the worker's own
    blocks on that list's front (BLPOP) all the while, never held up by arq's scan: chats start in
    the order they were accepted. It starts what it pops in one round trip, one START a chat, which
    takes the job off arq's queue: whichever worker does so first runs it, and a duplicate or stale
    token finds it gone. arq's scan, every ``poll_delay`` s, starts whatever no token reached,
    oldest first. Both ride out a Redis outage: they retry with backoff, never exit.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._waker: asyncio.Task[None] | None = None
        self._handing_back: set[asyncio.Task[None]] = set()
        #: the worker's batch lane (``workers/lane.py``), told how many chats run here
        self.lane: BatchLane | None = None
        #: set once its startup is done (heartbeat, reaper, lane): the process says "started" then
        self.ready = asyncio.Event()

    def _tell_lane(self) -> None:
        if self.lane is not None:  # chats running, and starting (their slots reserved) now
            self.lane.busy(self.busy + self.reserved)

    def reserve(self, want: int) -> int:
        n = super().reserve(want)
        self._tell_lane()
        return n

    def unreserve(self, n: int) -> None:
        super().unreserve(n)
        self._tell_lane()

    def track(self, job_id: str, task: asyncio.Task[None]) -> None:
        super().track(job_id, task)
        self._tell_lane()

    def _untrack(self, task: asyncio.Task[None]) -> None:
        super()._untrack(task)
        self._tell_lane()

    async def began(self) -> None:
        if not self.burst:
            self._waker = asyncio.create_task(self._wake_forever(), name="wake")

    async def start(self, job_ids: list[str]) -> None:
        await self._start(job_ids)

    async def stop_waking(self) -> None:
        """No more chats start here (the worker is stopping)."""
        self.allow_pick_jobs = False
        if self._waker is not None:
            self._waker.cancel()
            await asyncio.gather(self._waker, return_exceptions=True)
        if self.lane is not None:  # its items go back, for other workers
            await self.lane.stop()

    async def _wake_forever(self) -> None:
        delay = 0.0
        while True:
            try:
                await self._wake_once()
            except Exception as exc:  # an outage, or a refusal (OOM, READONLY after a failover): wait
                delay = await back_off("waiting for chats", exc, delay)
            else:
                delay = 0.0

    def _stopping(self) -> bool:
        return not self.allow_pick_jobs

    async def _wake_once(self) -> None:
        if self.max_jobs - self.busy - self.reserved <= 0 or not self.allow_pick_jobs:
            await asyncio.sleep(0.01)  # full, or stopping: leave the wake list to other workers
            return
        popped = await self.pool.blpop([keys.wake()], timeout=WAKE_WAIT)  # type: ignore[arg-type,misc]
        if not popped:
            return
        # The slots are counted now, not before the wait: meanwhile the scan may have filled them.
        free = self.reserve(self.max_jobs) if not self._stopping() else 0
        try:
            if free == 0:  # full, or stopping: the chat is another worker's
                await self.pool.lpush(keys.wake(), popped[1])  # type: ignore[misc]
                return
            more = await self._start([popped[1].decode()], pop=free - 1)
            if more:
                await self._start(more)
        finally:
            self.unreserve(free)

    async def _start(self, job_ids: list[str], pop: int = 0) -> list[str]:
        """Starts the jobs, in three round trips however many (``workers/lease.py``): the chats
        listed as this worker's, their leases claimed, their jobs taken off the queue. With ``pop``,
        the first round trip takes up to that many more woken ids off the wake list and returns
        them: a chat that woke alone (the usual case) starts without a round trip spent looking
        for others."""
        runner: ChatRunner = self.ctx["runner"]
        # a chat this worker runs or is starting already (its job is still queued between its claim
        # and its take, where the scan may see it): listing it again would replace its token
        job_ids = [j for j in dict.fromkeys(job_ids) if j not in runner.active and j not in runner.starting]
        leases = [runner.lease(job_id) for job_id in job_ids]
        runner.starting.update(job_ids)
        claimed: list[Lease] = []
        try:
            return await self._start_leases(runner, leases, pop, claimed)
        finally:  # a claimed chat stays "starting" until its run counts it as running
            runner.starting.difference_update(set(job_ids) - {lease.chat_id for lease in claimed})

    async def _start_leases(self, runner: ChatRunner, leases: list[Lease], pop: int, claimed: list[Lease]) -> list[str]:
        async with self.pool.pipeline(transaction=False) as pipe:
            if pop > 0:
                pipe.lpop(keys.wake(), pop)
            for lease in leases:
                lease.register(pipe)
            registered = await pipe.execute(raise_on_error=False)
        more = registered.pop(0) if pop > 0 else None
        listed = []
        for lease, answer in zip(leases, registered, strict=True):
            if isinstance(answer, Exception):  # not listed: it stays queued, for a later wake-up or scan
                log.warning("chat %s: Redis refused its start (%s)", lease.chat_id, answer)
            elif answer:
                listed.append(lease)
            # else: this worker's heartbeat had lapsed: it starts nothing until it beats again
        # the claims join the appends' next round trip to the streams Redis (one pipeline per node),
        # durable: a claim a failover lost while its job leaves the queue would strand the chat
        calls = [lease.claim_call() for lease in listed]
        answers = await asyncio.gather(
            *(runner.appender.call(c.script, c.keys, c.args, durable=True) for c in calls), return_exceptions=True
        )
        await self._take(listed, answers, claimed)
        for lease in claimed:
            self.track(lease.chat_id, asyncio.create_task(self._run(lease)))
        return [job_id.decode() for job_id in more] if isinstance(more, list) else []

    async def _take(self, listed: list[Lease], answers: list[Any], claimed: list[Lease]) -> None:
        """After the claims: the started chats' jobs off the queue, the others off the list. A
        claimed chat goes into ``claimed``, unless this worker was taken for dead meanwhile."""
        relisted: dict[int, Lease] = {}  # the position of each claimed chat's listing, made again
        async with self.pool.pipeline(transaction=False) as pipe:
            for lease, answer in zip(listed, answers, strict=True):
                if isinstance(answer, BaseException):  # perhaps applied, its answer lost: let go of it
                    log.warning("chat %s: its claim failed (%s); handing it back", lease.chat_id, answer)
                    self._hand_back_later(lease)
                    continue
                outcome = lease.took(answer)
                if outcome == "claimed":
                    # Listed again, with the take: if this worker's heartbeat lapsed since the first
                    # listing, a reaper may have taken the chat off its list; it must not run unlisted.
                    relisted[len(pipe)] = lease
                    lease.register(pipe)
                    claimed.append(lease)
                else:
                    extra = {"event": "chat.not_run", "chat_id": lease.chat_id}
                    log.log(
                        logging.DEBUG if outcome == "busy" else logging.INFO,
                        "chat %s: not started (%s)",
                        lease.chat_id,
                        outcome,
                        extra=extra,
                    )
                lease.take(pipe, outcome)
            # A job left on the queue (this round trip failed) is dropped by whoever finds it next:
            # its claim answers ``busy`` while this attempt runs, and its end after. The chats claimed
            # run regardless: they are listed (the first listing stands).
            try:
                taken = await pipe.execute(raise_on_error=False)
            except Exception as exc:
                taken = []
                log.warning("started chats' jobs not taken off the queue (%s)", exc)
        failed = [a for a in taken if isinstance(a, Exception)]
        if failed:
            log.warning("started chats' jobs not all taken off the queue (%s)", failed[0])
        for position, lease in relisted.items():
            if taken and taken[position] == 0:  # the heartbeat had lapsed: hand it back, unrun
                log.warning("chat %s: this worker was taken for dead while starting it; handing it back", lease.chat_id)
                claimed.remove(lease)
                self._hand_back_later(lease)

    def _hand_back_later(self, lease: Lease) -> None:
        async def hand_back() -> None:
            try:
                await lease.release()
            except Exception as exc:  # it stays listed: a reaper finishes this if the worker stops
                log.warning("chat %s: cannot hand it back (%s)", lease.chat_id, exc)

        task = asyncio.create_task(hand_back())
        self._handing_back.add(task)
        task.add_done_callback(self._handing_back.discard)

    async def _run(self, lease: Lease) -> None:
        runner: ChatRunner = self.ctx["runner"]
        try:
            await runner.run_claimed(lease, "claimed")
        except asyncio.CancelledError:
            pass  # handed back: the worker is stopping
        except Exception:
            extra = {"event": "chat.crashed", "chat_id": lease.chat_id}
            log.exception("chat %s: its run failed; handing it back for another attempt", lease.chat_id, extra=extra)
            try:
                await lease.release()  # back on the queue at once
            except Exception as exc:
                log.warning("chat %s: cannot hand it back (%s); a reaper will", lease.chat_id, exc)
        finally:  # cancelled before it ran: it stays listed, for the audit (or a reaper) to hand back
            runner.starting.discard(lease.chat_id)


def make_worker(
    settings: Settings,
    llm_base_url: str,
    *,
    burst: bool = False,
    poll_delay: float | None = None,
    lane: bool = False,
) -> ChatWorker:
    """A worker for ``settings``; run ``await worker.main()``, then ``stop_worker``.

    Batch items run in the slots its chats leave free: with ``lane`` (the CLI's processes), in a
    child process at a lower CPU priority (``workers/lane.py``); without (tests), on the worker's own
    event loop. A burst worker runs none.

    Its Redis client is built as the API's is (``shared.redis.connect``): commands time out,
    broken connections are retried, idle sockets are kept alive. ``poll_delay`` spaces arq's scans
    of the queue: by default 0.5 s for a long-running worker (woken chats start at once
    regardless), none for a burst worker (it exits once the queue is empty).
    """
    assert settings.redis_url is not None, "the CLI resolves the embedded Redis first"
    url = settings.streams_redis_url
    streams = connect_streams(url, max_connections=CONNECTIONS) if url else None

    async def startup(ctx: dict[str, Any]) -> None:
        llm = make_client(llm_base_url, settings.llm_api_key)
        runner = ChatRunner(ctx["redis"], llm, settings, streams)
        ctx["llm"], ctx["runner"] = llm, runner
        # before the first chat is taken: a chat of a worker without a heartbeat would be reaped at once
        await first_beat(ctx["redis"], runner.worker_id, settings.lease_ttl)
        ctx["background"] = [
            asyncio.create_task(beat_forever(runner, settings.lease_ttl), name="heartbeat"),
            asyncio.create_task(
                reap_forever(ctx["redis"], runner.streams, settings.lease_ttl / 6, runner.requeue), name="reaper"
            ),
            asyncio.create_task(listen_for_cancels(ctx["redis"], runner), name="cancels"),
        ]
        if burst:
            worker.ready.set()
            return
        if lane:
            worker.lane = the_lane = BatchLane(settings, llm_base_url)
            the_lane.start()
            metrics.BEFORE_SCRAPE.append(the_lane.sync_metrics)  # its counts are served here
            metrics.RUNNING_BATCH_ITEMS.set_function(lambda: the_lane.running)
            log.info("batch lane: pid %s, nice +%d", the_lane.pid, NICE)
            # The batches' upkeep (expiry, a cancel's end, lapsed items back in line) runs here too,
            # never waiting for a lane: TICK is one atomic script, safe from any number of processes.
            upkeep = BatchFeeder(ctx["redis"], llm, settings)
            ctx["background"] += [
                asyncio.create_task(the_lane.watch(), name="batch-lane-watch"),
                asyncio.create_task(upkeep.every(settings.lease_ttl / 2, upkeep.tick), name="batch-tick"),
            ]
        else:  # batch items fill the slots chats leave free (workers/batches.py)
            feeder = ctx["batches"] = BatchFeeder(
                ctx["redis"], llm, settings, busy=lambda: worker.busy, stopping=lambda: not worker.allow_pick_jobs
            )
            metrics.RUNNING_BATCH_ITEMS.set_function(lambda: len(feeder.running))
            feeder.start()
        worker.ready.set()

    async def shutdown(ctx: dict[str, Any]) -> None:
        for task in ctx.get("background", []):
            task.cancel()
        await asyncio.gather(*ctx.get("background", []), return_exceptions=True)
        if "runner" in ctx:  # the heartbeat has stopped: whatever the worker still lists is any reaper's
            with contextlib.suppress(Exception):  # else its heartbeat lapses by itself, in LEASE_TTL
                async with asyncio.timeout(RETIRE_WAIT):
                    await retire(ctx["redis"], ctx["runner"].worker_id)
        if "batches" in ctx:
            await ctx["batches"].close()
        if worker.lane is not None:
            await worker.lane.stop()
            worker.lane.sync_metrics()  # what it counted while stopping
        if "runner" in ctx:
            await ctx["runner"].appender.close()
        if "llm" in ctx:
            await ctx["llm"].close()
        if streams is not None:
            await close_client(streams)

    worker = ChatWorker(
        pool=connect(settings.redis_url, max_connections=CONNECTIONS, client_class=ArqRedis),
        concurrency=settings.worker_concurrency,
        burst=burst,
        poll_delay=(0 if burst else FULL_POLL) if poll_delay is None else poll_delay,
        on_startup=startup,
        on_shutdown=shutdown,
    )
    return worker


async def stop_worker(worker: ChatWorker, main: asyncio.Task[None], grace: float) -> None:
    """Stop taking chats, let running ones finish for ``grace`` seconds, hand the rest back, close.

    Returns within ``grace + HANDBACK_WAIT + 2 * CLOSE_WAIT`` seconds whatever Redis does, plus,
    with a batch lane, the lane's own stop first (at most ``lane.STOP_WAIT`` + 2 s; it is killed
    past that): a frozen Redis may keep a chat or an item from being handed back (a reaper then
    finds it on the list of a worker whose heartbeat stopped, and another worker runs it again),
    never the process from exiting.
    """
    await worker.stop_waking()  # before the running chats are counted: it starts none after
    runner: ChatRunner | None = worker.ctx.get("runner")
    if runner is not None and runner.active:
        await asyncio.wait([a.task for a in runner.active.values()], timeout=grace)
        for chat_id in list(runner.active):
            runner.stop(chat_id, Stop.HANDBACK)
        if runner.active:
            await asyncio.wait([a.task for a in runner.active.values()], timeout=HANDBACK_WAIT)
    main.cancel()
    left = [main, *worker.tasks.values()]
    for task in left:
        task.cancel()  # a hand-back still waiting on Redis is abandoned
    await asyncio.wait(left, timeout=CLOSE_WAIT)
    worker.tasks.clear()
    try:
        async with asyncio.timeout(CLOSE_WAIT):
            await worker.close()
    except TimeoutError:
        log.warning("worker: closing took over %.0f s (Redis unresponsive?); exiting anyway", CLOSE_WAIT)
