"""A worker's heartbeat record (``shared.presence``): what it runs now, read from its own state."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Final

import msgspec

from streambridge.shared.presence import NAMED_CHATS, WorkerRecord, identity, uptime
from streambridge.workers.worker import ChatWorker

#: the window of ``chats_last_minute``
MINUTE: Final = 60.0


class LastMinute:
    """How much a running total grew in the last minute, from samples of it (one per heartbeat):
    exact to within one sample's interval, and a few dozen numbers of memory."""

    def __init__(self, window: float = MINUTE, clock: Callable[[], float] = time.monotonic) -> None:
        self.window, self.clock = window, clock
        self._samples: deque[tuple[float, int]] = deque()

    def count(self, total: int) -> int:
        now = self.clock()
        self._samples.append((now, total))
        # keep the newest sample at least a window old: the growth since it is the last minute's
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()
        return total - self._samples[0][1]


class WorkerDescriber:
    """``describe`` for the worker's :class:`~streambridge.shared.presence.Heartbeat`."""

    def __init__(self, worker: ChatWorker) -> None:
        self.worker = worker
        self.template = WorkerRecord(**identity("worker"), concurrency=worker.max_jobs)
        self.started = LastMinute()

    def __call__(self) -> WorkerRecord:
        worker = self.worker
        runner = worker.ctx.get("runner")  # set by the worker's startup
        chats = list(runner.active) if runner is not None else []
        feeder = worker.ctx.get("batches")
        if feeder is not None:
            items = Counter(batch_id for batch_id, _ in feeder.running)
        elif (lane := getattr(worker, "lane", None)) is not None:  # its items run in its lane, which says which
            items = Counter(lane.running_by_batch())
        else:
            items = Counter[str]()
        return msgspec.structs.replace(
            self.template,
            state="running" if worker.allow_pick_jobs else "stopping",
            uptime_s=uptime(),
            chats=len(chats),
            chat_ids=chats[:NAMED_CHATS],
            batch_items=dict(items),
            chats_last_minute=self.started.count(worker.chats_started),
        )
