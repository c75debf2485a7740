"""What one Redis round trip costs a Python client: ``python -m bench.round_trip``.

A chat's guarantees (auth, its stream slot, idempotency and limits, the lease's listing, claim and
take, the fenced appends, the stored result) are about a dozen round trips to Redis, most through
redis-py. This prints the client's CPU per round trip, on uvloop as our processes run, against a
redis-server of this script's own: one EVALSHA awaited at a time, a three-command pipeline (an
EVALSHA, a GET, an HMGET: the edge's admission is one), and a bare connection (a hiredis protocol
answering from its callback, as ``bench/skeleton.py``'s) as the baseline. Redis's own CPU is not
counted: it is the client's side that issue 18's fixed cost is mostly made of.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time

import uvloop
from redis.asyncio import Redis

from bench.skeleton import Wire
from streambridge.embedded import free_port, redis_server_binary

SCRIPT = "return redis.call('HGET', KEYS[1], 'x')"


async def measure(port: int, calls: int) -> dict[str, float]:
    redis = Redis(port=port)
    sha = await redis.script_load(SCRIPT)
    _, wire = await asyncio.get_running_loop().create_connection(Wire, "127.0.0.1", port)

    async def one() -> None:
        await redis.evalsha(sha, 1, "rt:h")  # type: ignore[misc]

    async def pipeline() -> None:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.evalsha(sha, 1, "rt:h")
            pipe.get("rt:x")
            pipe.hmget("rt:h", ["a", "b"])
            await pipe.execute()

    async def bare() -> None:
        await wire.call(b"EVALSHA", sha, b"1", b"rt:h")

    out = {}
    for name, call in (("redis-py, one command", one), ("redis-py, a 3-command pipeline", pipeline), ("bare", bare)):
        for _ in range(calls // 10):  # warm
            await call()
        cpu = time.process_time()
        for _ in range(calls):
            await call()
        out[name] = (time.process_time() - cpu) / calls * 1e6
    await redis.aclose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    try:
        time.sleep(0.3)
        rounds = [uvloop.run(measure(port, args.calls)) for _ in range(args.rounds)]
    finally:
        server.terminate()
        server.wait()
    print(f"{'round trip':32} | client CPU per round trip (µs), each round | ÷ bare")
    bare = statistics.median(r["bare"] for r in rounds)
    for name in rounds[0]:
        each = [r[name] for r in rounds]
        print(f"{name:32} | {', '.join(f'{v:.0f}' for v in each):42} | {statistics.median(each) / bare:.1f}×")


if __name__ == "__main__":
    main()
