"""The OpenAI front door beside the native route and the upstream itself: ``python -m bench.front_door``.

Starts its own redis-server, the simulated LLM and ``streambridge up`` (api, edge and a worker in
one process), then streams the same chats, one at a time and interleaved, three ways with the
openai SDK or aiohttp as the client:

- **direct**: the SDK streaming from the simulated LLM itself (the baseline);
- **front door**: the same SDK call against streambridge's ``/v1/chat/completions``;
- **responses**: the SDK's ``responses.create(stream=True)`` against streambridge's ``/v1/responses``;
- **native**: ``POST /v1/chats``, then its ``stream_url`` (SSE).

Prints, per chat, the CPU our processes (``up`` and Redis) spent beside the upstream's own, and
the time to the first content token, each beside the direct figure measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable

import aiohttp
import openai
import psutil

from bench.run import Child, streambridge
from streambridge.embedded import free_port, redis_server_binary
from streambridge.sse import SSEParser


def cpu(*procs: psutil.Process) -> float:
    return sum(p.cpu_times().user + p.cpu_times().system for p in procs)


async def direct(sdk: openai.AsyncOpenAI, model: str, n: int) -> float:
    started = time.perf_counter()
    first = 0.0
    stream = await sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"c{n}"}], stream=True
    )
    async for chunk in stream:
        if not first and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    return first


async def responses(sdk: openai.AsyncOpenAI, model: str, n: int) -> float:
    started = time.perf_counter()
    first = 0.0
    stream = await sdk.responses.create(model=model, input=f"c{n}", stream=True)
    async for event in stream:
        if not first and event.type == "response.output_text.delta":
            first = time.perf_counter() - started
    return first


async def native(session: aiohttp.ClientSession, url: str, auth: dict[str, str], model: str, n: int) -> float:
    started = time.perf_counter()
    first = 0.0
    body = {"message": f"c{n}", "model": model}
    async with session.post(f"{url}/v1/chats", json=body, headers=auth) as response:
        stream_url = (await response.json())["stream_url"]
    parser = SSEParser()
    async with session.get(stream_url) as response:
        async for piece in response.content.iter_any():
            for message in parser.feed(piece):
                if not first and message.event == "content":
                    first = time.perf_counter() - started
    return first


async def measure(args: argparse.Namespace, up: Child, llm: Child, ours: list[psutil.Process]) -> None:
    upstream = psutil.Process(llm.proc.pid)
    model = f"fake?words={args.words}&ttft_ms={args.ttft_ms}&delay_ms={args.delay_ms}"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{up.url}/v1/auth/visitor") as response:
            token = (await response.json())["token"]
        auth = {"Authorization": f"Bearer {token}"}
        direct_sdk = openai.AsyncOpenAI(base_url=f"{llm.url}/v1", api_key="x", max_retries=0)
        door_sdk = openai.AsyncOpenAI(base_url=f"{up.url}/v1", api_key=token, max_retries=0)
        ways: dict[str, Callable[[int], Awaitable[float]]] = {
            "direct (baseline)": lambda n: direct(direct_sdk, model, n),
            "front door": lambda n: direct(door_sdk, model, n),
            "responses": lambda n: responses(door_sdk, model, n),
            "native": lambda n: native(session, up.url, auth, model, n),
        }
        ttft: dict[str, list[float]] = {name: [] for name in ways}
        ours_cpu = dict.fromkeys(ways, 0.0)
        their_cpu = dict.fromkeys(ways, 0.0)
        for n in range(args.chats):
            for name, way in ways.items():
                before, before_up = cpu(*ours), cpu(upstream)
                ttft[name].append(await way(n))
                ours_cpu[name] += cpu(*ours) - before
                their_cpu[name] += cpu(upstream) - before_up
        await direct_sdk.close()
        await door_sdk.close()
    base_ttft = statistics.median(ttft["direct (baseline)"])
    base_cpu = their_cpu["direct (baseline)"] / args.chats
    print(f"{args.chats} chats of {args.words} tokens, {args.delay_ms:g} ms apart, one at a time\n")
    print(f"{'way':<20}{'our CPU/chat':>14}{'× upstream':>12}{'TTFT p50':>12}{'added':>10}")
    for name in ways:
        per_chat = ours_cpu[name] / args.chats * 1000
        median = statistics.median(ttft[name]) * 1000
        ratio = per_chat / (base_cpu * 1000) if base_cpu else float("nan")
        print(f"{name:<20}{per_chat:>11.2f} ms{ratio:>11.2f}×{median:>9.1f} ms{median - base_ttft * 1000:>+7.1f} ms")
    print(f"\nthe upstream's own CPU per chat: {base_cpu * 1000:.2f} ms")


def cli() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--chats", type=int, default=40)
    parser.add_argument("--words", type=int, default=40)
    parser.add_argument("--ttft-ms", type=float, default=20)
    parser.add_argument("--delay-ms", type=float, default=10)
    args = parser.parse_args()
    port = free_port()
    redis = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
    llm = streambridge("fake-llm", "--port", "0", env=env)
    up: Child | None = None
    try:
        time.sleep(0.3)
        up_env = {
            **env,
            "STREAMBRIDGE_REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "STREAMBRIDGE_LLM_BASE_URL": f"{llm.url}/v1",
            "STREAMBRIDGE_VISITOR_CHATS_PER_MINUTE": "1000000",
        }
        up = streambridge("up", "--port", "0", env=up_env)
        asyncio.run(measure(args, up, llm, [psutil.Process(up.proc.pid), psutil.Process(redis.pid)]))
    finally:
        if up is not None:
            up.stop()
        llm.stop()
        redis.terminate()
        redis.wait(10)


if __name__ == "__main__":
    cli()
