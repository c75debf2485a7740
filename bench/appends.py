"""A worker's appends, one pipeline for every chat against one call per chat: ``python -m bench.appends``.

50 chats append one event every 10 ms each (5,000 events/s) to a redis-server of this script's
own, through ``StreamSink``: once with the worker's shared ``Appender``, once with an appender per
chat (each chat's batch a call of its own, as before the shared one). Two arrival patterns:
every chat's token at the same instant (a worker woken by many upstream reads at once), and
the chats' tokens spread evenly over the 10 ms. Prints this process's CPU per event and the
round trips taken, the per-chat way as the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import time

import uvloop
from redis.asyncio import Redis

from streambridge.embedded import free_port, redis_server_binary
from streambridge.shared import keys
from streambridge.shared.events import Content
from streambridge.workers.appender import Appender
from streambridge.workers.sink import StreamSink


class Counted(Appender):
    round_trips = 0

    async def _execute(self, batch: list[object]) -> list[object]:  # type: ignore[override]
        Counted.round_trips += 1
        return await super()._execute(batch)  # type: ignore[arg-type]


async def run(port: int, *, shared: bool, aligned: bool, chats: int, events: int, pace: float) -> tuple[float, int]:
    redis = Redis(port=port)
    one = Counted(redis)
    Counted.round_trips = 0

    async def chat(n: int) -> None:
        chat_id = f"bench-{n}-{time.time_ns()}"
        await redis.hset(keys.lease(chat_id), mapping={"token": "t", "seq": 0})
        sink = StreamSink(redis, chat_id, "t", maxlen=10_000, appender=one if shared else Counted(redis))
        start = loop.time() + 0.1 + (0 if aligned else n * pace / chats)
        for i in range(events):
            await asyncio.sleep(max(0.0, start + i * pace - loop.time()))
            await sink.append(Content(content="word ", index=i + 1, attempt=1))
        await sink.drain()

    loop = asyncio.get_running_loop()
    cpu = time.process_time()
    await asyncio.gather(*(chat(n) for n in range(chats)))
    used = time.process_time() - cpu
    await redis.flushdb()
    await redis.aclose()
    return used / (chats * events) * 1e6, Counted.round_trips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    time.sleep(0.3)
    rows = []
    try:
        for aligned in (True, False):
            best: dict[bool, tuple[float, int]] = {}
            for _ in range(args.rounds):
                for shared in (False, True):
                    result = uvloop.run(run(port, shared=shared, aligned=aligned, chats=50, events=300, pace=0.01))
                    best[shared] = min(best.get(shared, result), result)
            rows.append(("at the same instant" if aligned else "spread over 10 ms", best))
    finally:
        server.terminate()
    print("50 chats × 300 events, one each 10 ms | per-chat calls            | one pipeline (Appender)   | CPU ratio")
    print("------------------------------------- | ------------------------- | ------------------------- | ---------")
    for name, best in rows:
        (own_cpu, own_trips), (one_cpu, one_trips) = best[False], best[True]
        print(
            f"tokens {name:30} | {own_cpu:5.1f} µs/event, {own_trips:6,} RT | "
            f"{one_cpu:5.1f} µs/event, {one_trips:6,} RT | {one_cpu / own_cpu:.2f}×"
        )


if __name__ == "__main__":
    main()
