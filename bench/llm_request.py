"""CPU per LLM request in a worker: ``python -m bench.llm_request``.

Streams a one-word answer from the simulated LLM (its own process) many times, three ways,
interleaved, and prints each one's least CPU per request over the rounds (the least is the
figure a busy shared machine disturbs least):

- the worker's own path (``workers.llm.stream_deltas``: the SDK's ``client.post``, msgspec);
- the SDK's typed call, ``chat.completions.create(stream=True)``, iterated to the end;
- plain aiohttp with the same body, the floor for any client.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import uvloop

from streambridge.shared.chats import ChatRequest, Message
from streambridge.workers.llm import delta_from_chunk, make_client, sse_data, stream_deltas

MODEL = "fake?words=1&ttft_ms=0&delay_ms=0"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def measure(rounds: int, requests: int, base_url: str) -> dict[str, float]:
    client = make_client(base_url, None)
    session = aiohttp.ClientSession()
    request = ChatRequest(messages=[Message(role="user", content="hi")])

    async def worker_path() -> None:
        async for _ in stream_deltas(client, request, MODEL):
            pass

    async def sdk_create() -> None:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        async for _ in stream:
            pass

    async def plain_aiohttp() -> None:
        async with session.post(f"{base_url}/chat/completions", json=BODY) as response:
            async for data in sse_data(response.content.iter_any()):
                if data != b"[DONE]":
                    delta_from_chunk(data)

    ways: dict[str, Callable[[], Awaitable[None]]] = {
        "worker (stream_deltas)": worker_path,
        "SDK chat.completions.create": sdk_create,
        "plain aiohttp": plain_aiohttp,
    }
    least = dict.fromkeys(ways, float("inf"))
    try:
        for _ in range(rounds):
            for name, way in ways.items():
                for _ in range(10):  # warm: connections open, caches filled
                    await way()
                cpu = time.process_time()
                for _ in range(requests):
                    await way()
                least[name] = min(least[name], (time.process_time() - cpu) / requests * 1000)
    finally:
        await session.close()
        await client.close()
    return least


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    llm = subprocess.Popen(
        [sys.executable, "-m", "streambridge", "fake-llm", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert llm.stdout is not None
        url = next(m.group(1) for line in llm.stdout if (m := re.search(r"listening on (http://\S+)", line)))
        least = uvloop.run(measure(args.rounds, args.requests, f"{url}/v1"))
    finally:
        llm.terminate()
    floor = least["plain aiohttp"]
    print(f"{'way':30} | CPU per request | vs plain aiohttp")
    print(f"{'-' * 30} | {'-' * 15} | {'-' * 16}")
    for name, ms in least.items():
        print(f"{name:30} | {ms:12.3f} ms | {ms / floor:15.2f}×")


if __name__ == "__main__":
    main()
