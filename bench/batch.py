"""Batches beside a plain asyncio loop, and interactive chats beside a batch: ``python -m bench.batch``.

Starts its own redis-server, the simulated LLM, ``streambridge api``, ``streambridge edge`` and
one ``streambridge worker`` (each a process of its own), then, in one run:

1. **interactive, idle** (half of them; the other half at the end, after 4): chats one at a time
   (``POST /v1/chats`` + SSE): pickup (admitted → started, in µs of Redis's clock, as the chat
   records it: ``pickup_us``) and time to the first content token;
2. **plain loop (baseline)**: the openai SDK calling the simulated LLM straight, N requests at
   the batch's concurrency, each result written to a file as a line;
3. **batch**: the same N requests as a batch (``files.create`` + ``batches.create``, polled until
   it completes), with CPU per item of our processes and Redis, each process's peak RSS, and
   Redis's memory per 1,000 items;
4. **interactive, beside a batch**: the chats of 1 again while another N-item batch runs.

Runs ``--rounds`` such rounds one after another (idle and busy interleaved, so a drift in the
host's other load weighs on both), and prints every round's figures and ratio, then each one's
median and spread (min-max): one run on a shared host proves little either way.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import aiohttp
import openai
import psutil
import redis

from bench.run import Child, streambridge
from streambridge.embedded import free_port, redis_server_binary
from streambridge.shared import keys
from streambridge.sse import SSEParser


def cpu(*procs: psutil.Process) -> float:
    return sum(p.cpu_times().user + p.cpu_times().system for p in procs)


class PeakRSS:
    """Samples each process's RSS every 50 ms while running; ``peaks`` by name, in MiB."""

    def __init__(self, procs: dict[str, psutil.Process]) -> None:
        self.procs, self.peaks = procs, dict.fromkeys(procs, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            for name, proc in self.procs.items():
                self.peaks[name] = max(self.peaks[name], proc.memory_info().rss / 2**20)


def batch_lane(worker: psutil.Process) -> psutil.Process:
    """The worker's batch lane (``workers/lane.py``): the child it spawned."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for child in worker.children():
            if "multiprocessing.spawn" in " ".join(child.cmdline()) and "resource_tracker" not in " ".join(
                child.cmdline()
            ):
                return child
        time.sleep(0.05)
    raise RuntimeError("the worker started no batch lane")


def items(n: int, model: str, tag: str) -> bytes:
    lines = []
    for i in range(n):
        body = {"model": model, "messages": [{"role": "user", "content": f"{tag} {i}"}]}
        lines.append(
            json.dumps({"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        )
    return ("\n".join(lines) + "\n").encode()


async def submit(sdk: openai.AsyncOpenAI, data: bytes) -> str:
    uploaded = await sdk.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    batch = await sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return batch.id


async def until_done(sdk: openai.AsyncOpenAI, batch_id: str) -> None:
    while True:  # polled, as an SDK user does
        if (await sdk.batches.retrieve(batch_id)).status in {"completed", "failed", "expired", "cancelled"}:
            return
        await asyncio.sleep(0.1)


async def plain_loop(llm_url: str, n: int, concurrency: int, model: str) -> float:
    """The baseline: the SDK against the upstream, ``concurrency`` at a time, results to a file."""
    sdk = openai.AsyncOpenAI(
        base_url=f"{llm_url}/v1", api_key="x", max_retries=0, http_client=openai.DefaultAioHttpClient()
    )
    queue = list(range(n))
    started = time.perf_counter()
    with tempfile.TemporaryFile("w") as out:

        async def work() -> None:
            while queue:
                i = queue.pop()
                answer = await sdk.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": f"plain {i}"}]
                )
                out.write(json.dumps({"custom_id": f"plain-{i}", "body": answer.model_dump()}) + "\n")

        await asyncio.gather(*(work() for _ in range(concurrency)))
    await sdk.close()
    return time.perf_counter() - started


async def interactive(
    session: aiohttp.ClientSession, api: str, auth: dict[str, str], r: redis.Redis, n: int
) -> tuple[list[float], list[float]]:
    pickups, ttfts = [], []
    for i in range(n):
        started = time.perf_counter()
        async with session.post(f"{api}/v1/chats", json={"message": f"hi {i}"}, headers=auth) as response:
            created = await response.json()
        parser, first = SSEParser(), 0.0
        async with session.get(created["stream_url"]) as response:
            async for piece in response.content.iter_any():
                if any(m.event == "content" for m in parser.feed(piece)):
                    first = time.perf_counter() - started
                    break  # the rest of the answer is not what is measured
        ttfts.append(first * 1000)
        pickups.append(int(r.hget(keys.chat(created["id"]), "pickup_us") or 0) / 1000)
    return pickups, ttfts


async def one_round(
    args: argparse.Namespace,
    session: aiohttp.ClientSession,
    sdk: openai.AsyncOpenAI,
    api: Child,
    llm: Child,
    auth: dict[str, str],
    procs: dict[str, psutil.Process],
    r: redis.Redis,
    n: int,
) -> dict[str, tuple[float, float]]:
    """One round: idle chats, the plain loop, the batch, chats beside a batch, idle chats again.
    Each figure as (baseline, ours)."""
    model = f"fake?words={args.words}&ttft_ms={args.ttft_ms}&delay_ms=0"
    # idle: half the chats now, half once the last batch has ended, so a host whose other load
    # drifts during the round weighs on both sides alike
    idle_pickup, idle_ttft = await interactive(session, api.url, auth, r, args.chats // 2)
    phase(f"round {n}: interactive, idle (first half)")

    me = psutil.Process()
    before = cpu(me)
    plain_wall = await plain_loop(llm.url, args.items, args.concurrency, model)
    plain_cpu = cpu(me) - before
    phase(f"round {n}: plain loop")

    data = items(args.items, model, f"batch{n}")
    ours = [procs["api"], procs["worker"], procs["lane"], procs["redis"]]
    before = cpu(*ours)
    started = time.perf_counter()
    batch_id = await submit(sdk, data)
    await until_done(sdk, batch_id)
    batch_wall = time.perf_counter() - started
    batch_cpu = cpu(*ours) - before
    phase(f"round {n}: batch")

    busy_id = await submit(sdk, items(3 * args.items, model, f"busy{n}"))  # runs on past the chats below
    await asyncio.sleep(0.5)  # the batch fills the spare slots
    busy_pickup, busy_ttft = await interactive(session, api.url, auth, r, args.chats)
    still = (await sdk.batches.retrieve(busy_id)).status
    await sdk.batches.cancel(busy_id)
    await until_done(sdk, busy_id)
    if still != "in_progress":
        print(f"round {n}: the second batch was {still} while the chats ran", file=sys.stderr)
    phase(f"round {n}: interactive, beside a batch")
    more_pickup, more_ttft = await interactive(session, api.url, auth, r, args.chats - args.chats // 2)
    idle_pickup, idle_ttft = idle_pickup + more_pickup, idle_ttft + more_ttft
    phase(f"round {n}: interactive, idle (second half)")
    return {
        "interactive pickup p50 (ms): idle vs batch": (statistics.median(idle_pickup), statistics.median(busy_pickup)),
        "interactive pickup p95 (ms): idle vs batch": (quantile(idle_pickup, 0.95), quantile(busy_pickup, 0.95)),
        "interactive TTFT p50 (ms): idle vs batch": (statistics.median(idle_ttft), statistics.median(busy_ttft)),
        "interactive TTFT p95 (ms): idle vs batch": (quantile(idle_ttft, 0.95), quantile(busy_ttft, 0.95)),
        "throughput (items/s): plain loop vs batch": (args.items / plain_wall, args.items / batch_wall),
        "CPU per item (ms): plain loop vs api+worker+lane+redis": (
            plain_cpu / args.items * 1000,
            batch_cpu / args.items * 1000,
        ),
    }


async def measure(
    args: argparse.Namespace, api: Child, edge: Child, llm: Child, procs: dict[str, psutil.Process], r: redis.Redis
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{api.url}/v1/auth/visitor") as response:
            token = (await response.json())["token"]
        auth = {"Authorization": f"Bearer {token}"}
        sdk = openai.AsyncOpenAI(base_url=f"{api.url}/v1", api_key=token, max_retries=0)
        rounds = []
        memory_before = r.info("memory")["used_memory"]
        with PeakRSS(procs) as rss:
            for n in range(1, args.rounds + 1):
                rounds.append(await one_round(args, session, sdk, api, llm, auth, procs, r, n))
        memory_per_1000 = (r.info("memory")["used_memory"] - memory_before) / (4 * args.items * args.rounds) * 1000
        await sdk.close()

    print(
        f"{args.items} items of {args.words} words, upstream {args.ttft_ms:g} ms each, concurrency {args.concurrency}; "
        f"{args.rounds} rounds, each: {args.chats} chats idle (half before its batches, half after) "
        "and beside a batch\n"
    )
    print("every round's ratio (ours / baseline), then the median and the spread (min-max):\n")
    for name in rounds[0]:
        ratios = [ours / base if base else float("nan") for base, ours in (x[name] for x in rounds)]
        bases = [x[name][0] for x in rounds]
        ourses = [x[name][1] for x in rounds]
        print(f"{name}")
        print(
            "  rounds: "
            + "  ".join(f"{b:.2f}->{o:.2f} ({q:.2f}x)" for b, o, q in zip(bases, ourses, ratios, strict=True))
        )
        print(
            f"  median: baseline {statistics.median(bases):.2f} ({min(bases):.2f}-{max(bases):.2f}), "
            f"ours {statistics.median(ourses):.2f} ({min(ourses):.2f}-{max(ourses):.2f}), "
            f"ratio {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        )
    print("peak RSS: " + ", ".join(f"{name} {mib:.0f} MiB" for name, mib in rss.peaks.items()))
    print(
        "Redis memory per 1,000 items kept (input, parsed items, output, events; approximate): "
        f"{memory_per_1000 / 2**20:.2f} MiB"
    )


BEGAN = time.perf_counter()


def phase(name: str) -> None:
    print(f"[{time.perf_counter() - BEGAN:6.1f} s] {name} done", file=sys.stderr, flush=True)


def quantile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def cli() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--chats", type=int, default=60)
    parser.add_argument("--words", type=int, default=20)
    parser.add_argument("--ttft-ms", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved idle/busy rounds (medians and spread)")
    args = parser.parse_args()
    port = free_port()
    redis_proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBRIDGE_")} | {"PYTHONUNBUFFERED": "1"}
    children: list[Child] = []
    try:
        time.sleep(0.3)
        llm = streambridge("fake-llm", "--port", "0", env=env)
        children.append(llm)
        env |= {
            "STREAMBRIDGE_REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "STREAMBRIDGE_LLM_BASE_URL": f"{llm.url}/v1",
            "STREAMBRIDGE_VISITOR_CHATS_PER_MINUTE": "1000000",
            "STREAMBRIDGE_VISITOR_MAX_RUNNING_CHATS": "1000000",
            "STREAMBRIDGE_VISITOR_MAX_OPEN_STREAMS": "1000000",
            # every round's inputs and results stay stored: past the quota, no item would start
            "STREAMBRIDGE_VISITOR_FILE_BYTES_PER_USER": str(2**40),
            "STREAMBRIDGE_LOG_LEVEL": "WARNING",
            # the batch's concurrency is the baseline's; 5 more slots stay for interactive chats
            "STREAMBRIDGE_WORKER_CONCURRENCY": str(args.concurrency + 5),
            "STREAMBRIDGE_BATCH_RESERVED_SLOTS": "5",
            "STREAMBRIDGE_BATCH_WORKER_CONCURRENCY": str(args.concurrency),
            "STREAMBRIDGE_WORKER_METRICS_PORT": "0",
        }
        edge = streambridge("edge", "--port", "0", env=env)
        children.append(edge)
        api = streambridge("api", "--port", "0", env={**env, "STREAMBRIDGE_PUBLIC_EDGE_URL": edge.url})
        children.append(api)
        worker = streambridge("worker", env=env, ready="worker started")
        children.append(worker)
        procs = {
            "api": psutil.Process(api.proc.pid),
            "edge": psutil.Process(edge.proc.pid),
            "worker": psutil.Process(worker.proc.pid),
            "lane": batch_lane(psutil.Process(worker.proc.pid)),
            "redis": psutil.Process(redis_proc.pid),
            "llm": psutil.Process(llm.proc.pid),
        }
        r = redis.Redis(port=port)
        asyncio.run(measure(args, api, edge, llm, procs, r))
    finally:
        for child in reversed(children):
            child.stop()
        redis_proc.terminate()
        redis_proc.wait(10)


if __name__ == "__main__":
    cli()
