"""The load generator, run in its own process by ``bench/run.py``; prints one JSON result.

python -m bench.load ttft --api URL --llm URL --proxy URL --chats 50 [--steady SECONDS] [--no-baselines]
python -m bench.load ttft --via URL/v1 [--key KEY] --chats 40 --steady SECONDS [--stamp]
python -m bench.load throughput --api URL --llm URL --chats 20 --words 400
python -m bench.load fanout --api URL --chats 100 --readers 20 --seconds 10
python -m bench.load idle --api URL --streams 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import resource
import sys
import time
from collections import Counter
from typing import Any, Final, cast
from urllib.parse import urlsplit

import aiohttp

from streambridge.shared.streams import id_key
from streambridge.sse import SSEParser

#: ``--max-tokens``: asked of every chat, streambridge's and an OpenAI-compatible server's alike (the
#: simulated LLM then stops after that many chunks: ``--max-tokens 1`` makes a 1-token chat)
MAX_TOKENS: dict[str, int] = {}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentiles(
    values: list[float], qs: tuple[float, ...] = (0.50, 0.90, 0.99), *, mean: bool = False
) -> dict[str, float]:
    """``n``, a ``p50``-style entry per quantile in ``qs``, ``max`` (and ``mean`` if asked)."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    out = {"n": len(ordered)} | {f"p{q * 100:g}": at(q) for q in qs} | {"max": round(ordered[-1], 3)}
    return out | {"mean": round(sum(ordered) / len(ordered), 3)} if mean else out


async def login(session: aiohttp.ClientSession, api: str) -> dict[str, str]:
    async with session.post(f"{api}/v1/auth/visitor") as response:
        return {"Authorization": f"Bearer {(await response.json())['token']}"}


async def create(session: aiohttp.ClientSession, api: str, auth: dict[str, str], model: str, n: int) -> dict[str, Any]:
    body = {"message": f"bench {n} {time.time_ns()}", "model": model} | MAX_TOKENS
    async with session.post(f"{api}/v1/chats", json=body, headers=auth) as response:
        assert response.status == 202, await response.text()
        return dict(await response.json())


async def follow(session: aiohttp.ClientSession, url: str, on_event: Any) -> None:
    """Calls ``on_event(now, message, live)``; ``live``: appended after the reader connected (its
    delivery lag is the system's, not the time history waited for the reader to arrive)."""
    parser = SSEParser()
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        connected_ms = time.time() * 1000
        async for chunk in response.content.iter_any():
            now = time.time()
            for message in parser.feed(chunk):
                on_event(now, message, id_key(message.id)[0] >= connected_ms)


async def streambridge_chat(
    session: aiohttp.ClientSession, api: str, auth: dict[str, str], model: str, n: int
) -> dict[str, Any]:
    start = time.perf_counter()
    chat = await create(session, api, auth, model, n)
    created_ms = _iso_ms(chat["created_at"])
    # "at": when each of "lags" was received (epoch s), for a timeline (bench/slowclients.py)
    result: dict[str, Any] = {"id": chat["id"], "lags": [], "at": [], "ttft": None, "pickup": None, "content": 0}
    result["upstream_lags"] = []  # ms from the upstream's write of a stamped chunk (``stamp=1``) to here

    def on_event(now: float, message: Any, live: bool) -> None:
        ms = id_key(message.id)[0]
        if message.event == "started":
            result["pickup"] = ms - created_ms
        elif message.event == "content":
            if result["ttft"] is None:
                result["ttft"] = (time.perf_counter() - start) * 1000
            if live:  # the stream ids' clock times the edge's live delivery alone
                result["lags"].append(now * 1000 - ms)
                result["at"].append(now)
            # the upstream's stamps time every chunk, those read from history too: what the client waited
            text = json.loads(message.data)["content"]
            if text.startswith("@"):  # one stamp per upstream chunk, however the append batched them
                result["upstream_lags"] += [(now - float(s)) * 1000 for s in text[1:].split("@")]
            result["content"] += 1

    await follow(session, chat["stream_url"], on_event)
    return result


async def openai_chat(
    session: aiohttp.ClientSession, base: str, model: str, n: int, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """One chat streamed from an OpenAI-compatible server (base: .../v1), as its clients read it:
    time to first content, how many content chunks, and each stamped chunk's upstream → client lag."""
    start = time.perf_counter()
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": f"bench {n} {time.time_ns()}"}]}
    body |= MAX_TOKENS
    result: dict[str, Any] = {"ttft": None, "content": 0, "upstream_lags": []}
    async with session.post(f"{base}/chat/completions", json=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if not line.startswith(b"data: {") or b'"content":"' not in line or b'"content":""' in line:
                continue
            now = time.time()
            if result["ttft"] is None:
                result["ttft"] = (time.perf_counter() - start) * 1000
            result["content"] += 1
            if b'"content":"@' in line:  # parsed only when stamped (``stamp=1``), to keep this process light
                text = json.loads(line[6:])["choices"][0]["delta"]["content"]
                result["upstream_lags"] += [(now - float(s)) * 1000 for s in text.split("@")[1:]]
    return result


async def direct_chat(session: aiohttp.ClientSession, base: str, model: str, n: int) -> float:
    """Time to first content streaming the same upstream directly (base: .../v1)."""
    ttft = (await openai_chat(session, base, model, n))["ttft"]
    assert ttft is not None
    return float(ttft)


def _iso_ms(value: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(value).timestamp() * 1000)


def fake_model(words: int, ttft_ms: float, delay_ms: float, stamp: bool = False) -> str:
    """The simulated LLM's model name for these options (a peer proxy routes this exact name)."""
    return f"fake?words={words}&ttft_ms={ttft_ms}&delay_ms={delay_ms}" + ("&stamp=1" if stamp else "")


async def ttft(args: argparse.Namespace) -> dict[str, Any]:
    """Time to first token: direct, through the proxy, through streambridge, under the same load.

    Without ``--steady``: bursts, ``--chats`` chats created at the same instant, ``--rounds``
    times. With ``--steady S``: ``--chats`` clients for S seconds, each starting its next chat
    as soon as its last one ended, their first chats spread over one second, so that many chats
    are in flight at any time; chats started in the first second are not counted.
    """
    model = fake_model(args.words, args.ttft_ms, args.delay_ms, args.stamp)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        if args.via:
            return await via(session, args, model)
        auth = await login(session, args.api)
        await asyncio.gather(*(streambridge_chat(session, args.api, auth, model, n) for n in range(5)))  # warm up
        out: dict[str, Any] = {}
        runs = [
            ("direct", lambda n: direct_chat(session, f"{args.llm}/v1", model, n)),
            ("proxy", lambda n: direct_chat(session, f"{args.proxy}/v1", model, n)),
            ("streambridge", lambda n: streambridge_chat(session, args.api, auth, model, n)),
        ]
        for name, run in runs[2:] if args.no_baselines else runs:
            values: list[Any] = []
            cpu, wall = cpu_seconds(), time.perf_counter()
            if args.steady:
                began = time.time()
                values = await steady(run, args.chats, args.steady)
                out[f"{name}_chats_per_s"] = round(len(values) / (args.steady - 1), 1)
                out[f"{name}_counted"] = [began + 1, began + args.steady]  # epoch s: the chats counted began in it
            else:
                for _ in range(args.rounds):
                    values += await asyncio.gather(*(run(n) for n in range(args.chats)))
            # this process's share of a core while it ran: far from 100%, it is not the bottleneck
            out[f"{name}_loadgen_cpu"] = round((cpu_seconds() - cpu) / (time.perf_counter() - wall), 2)
            if name == "streambridge":
                out["streambridge_ttft"] = percentiles([v["ttft"] for v in values])
                out["pickup"] = percentiles([v["pickup"] for v in values])
                out["lag"] = percentiles([lag for v in values for lag in v["lags"]])
                stamped = [lag for v in values for lag in v["upstream_lags"]]
                if stamped:
                    out["upstream_lag"] = percentiles(stamped)
                out["chat_ids"] = [v["id"] for v in values]
                out["tokens"] = sum(v["content"] for v in values)
                if args.steady:
                    out["chats_per_s"] = out["streambridge_chats_per_s"]
            else:
                out[f"{name}_ttft"] = percentiles(values)
    return out


async def via(session: aiohttp.ClientSession, args: argparse.Namespace, model: str) -> dict[str, Any]:
    """``--steady`` closed loops streaming through another OpenAI-compatible proxy (``--via``: its .../v1),
    as that proxy's clients would: a peer's figures beside ours (``bench/peer.py``)."""
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else None

    relayed = 0  # every chat's tokens, the warm-up's and the first second's: what a CPU window over the run paid for

    async def run(n: int) -> dict[str, Any]:
        nonlocal relayed
        result = await openai_chat(session, args.via, model, n, headers)
        relayed += result["content"]
        return result

    await asyncio.gather(*(run(n) for n in range(5)))  # warm up
    cpu, wall = cpu_seconds(), time.perf_counter()
    values = await steady(run, args.chats, args.steady)
    out = {
        "chats_per_s": round(len(values) / (args.steady - 1), 1),
        "ttft": percentiles([v["ttft"] for v in values if v["ttft"] is not None]),
        "tokens": sum(v["content"] for v in values),
        "all_tokens": relayed,
        "chats": len(values),
        "loadgen_cpu": round((cpu_seconds() - cpu) / (time.perf_counter() - wall), 2),
    }
    stamped = [lag for v in values for lag in v["upstream_lags"]]
    return out | ({"upstream_lag": percentiles(stamped)} if stamped else {})


async def steady(run: Any, clients: int, seconds: float) -> list[Any]:
    """``clients`` closed loops for ``seconds``; what the chats started after the first second gave."""
    start = time.perf_counter()
    results: list[Any] = []

    async def client(c: int) -> None:
        await asyncio.sleep(random.uniform(0, 1))
        n = 0
        while (began := time.perf_counter()) < start + seconds:
            result = await run(c * 100_000 + n)
            n += 1
            if began >= start + 1:
                results.append(result)

    await asyncio.gather(*(client(c) for c in range(clients)))
    return results


async def throughput(args: argparse.Namespace) -> dict[str, Any]:
    model = f"fake?words={args.words}&ttft_ms=0&delay_ms=0"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        auth = await login(session, args.api)
        start = time.perf_counter()
        direct = await asyncio.gather(*(direct_count(session, f"{args.llm}/v1", model, n) for n in range(args.chats)))
        direct_rate = sum(direct) / (time.perf_counter() - start)
        ids: list[tuple[int, int]] = []

        async def one(n: int) -> None:
            chat = await create(session, args.api, auth, model, n)
            await follow(session, chat["stream_url"], lambda now, m, live: ids.append(id_key(m.id)))

        await asyncio.gather(*(one(n) for n in range(args.chats)))
        seconds = max((max(ids)[0] - min(ids)[0]) / 1000, 0.001)
        return {"events": len(ids), "append_rate": round(len(ids) / seconds), "direct_rate": round(direct_rate)}


async def direct_count(session: aiohttp.ClientSession, base: str, model: str, n: int) -> int:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": f"bench {n}"}]}
    chunks = 0
    async with session.post(f"{base}/chat/completions", json=body) as response:
        async for line in response.content:
            chunks += line.startswith(b"data: {")
    return chunks


async def fanout(args: argparse.Namespace) -> dict[str, Any]:
    """``chats`` chats at 5 events/s, each read by ``readers`` clients on one edge.

    The chats' first tokens wait until every reader is connected (``ttft_ms``), so what is measured
    is the steady state of delivering to all of them, not the rush of opening them. Their phases
    are spread evenly over the 200 ms between tokens, as independent chats' would be: tokens of
    every chat at the same instant would measure a burst of ``chats * readers`` writes instead.
    The readers only find each content event's id, on bare sockets (:class:`ContentReader`), so
    that this process, which shares the machine with the edge, takes as little of it as it can.
    """
    words = int(args.seconds * 5 / 2.5) + 5  # the fake LLM sends ~2.5 chunks a word
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        auth = await login(session, args.api)
        lags: list[float] = []
        arrivals: list[float] = []
        chats, begin = [], time.perf_counter()
        for n in range(args.chats):
            first_token_ms = args.ttft_ms + n * 200 / args.chats - (time.perf_counter() - begin) * 1000
            model = f"fake?words={words}&ttft_ms={max(first_token_ms, 0):.0f}&delay_ms=200"
            chats.append(await create(session, args.api, auth, model, n))
        cpu = cpu_seconds()
        start = time.perf_counter()
        urls = [chat["stream_url"] for chat in chats for _ in range(args.readers)]
        opening = asyncio.Semaphore(100)
        closed: list[float] = []
        await asyncio.gather(*(follow_content(url, lags, arrivals, opening, closed) for url in urls))
        wall = time.perf_counter() - start
        streaming = (max(arrivals) - min(arrivals)) / 1000 if len(arrivals) > 1 else wall
        # Until the first stream ends, every stream is open: the state the goal speaks of. The
        # chats are of one length, so after that all of them end within a few hundred ms, a burst
        # of closes that is measured too, over the whole run.
        first_end = min(closed, default=float("inf"))
        return {
            "streams": args.chats * args.readers,
            "events_delivered": len(lags),
            "events_per_s": round(len(lags) / streaming),
            "streaming_from": min(arrivals, default=0) / 1000,  # epoch s, for a CPU window
            "streaming_to": max(arrivals, default=0) / 1000,
            "lag_all_open": percentiles([lag for lag, at in zip(lags, arrivals, strict=True) if at < first_end]),
            "lag": percentiles(lags),
            # events received in each 100 ms (epoch ms // 100), to match a CPU window exactly
            "received_per_100ms": Counter(int(at // 100) for at in arrivals),
            "loadgen_cpu": round((cpu_seconds() - cpu) / wall, 2),
        }


CONTENT_ID: Final = re.compile(rb"id: ([0-9]+)-[0-9]+\nevent: content\n")


class ContentReader(asyncio.Protocol):
    """One SSE client on a bare socket: for each content event appended after it connected, its
    delivery lag, and when it arrived (epoch ms). aiohttp's client cost this process more CPU
    per event than the edge spent sending it; a raw socket lets one process read 10,000 streams.
    The edge writes each batch of events as one chunk, so HTTP's chunk framing falls between
    events, where the pattern does not look."""

    def __init__(self, request: bytes, lags: list[float], arrivals: list[float], closed: list[float]) -> None:
        self.request, self.lags, self.arrivals, self.closed = request, lags, arrivals, closed
        self.rest = b""
        self.status: bytes | None = None
        self.connected_ms = 0.0
        loop = asyncio.get_running_loop()
        self.answered: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(self.request)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        now_ms = time.time() * 1000
        if self.status is None:
            self.status = data[9:12]
            self.connected_ms = now_ms
            self.answered.set_result(None)
        data = self.rest + data
        end = data.rfind(b"\n\n") + 2  # an event split across reads waits for its end
        self.rest = data[end:]
        for ms in map(int, CONTENT_ID.findall(data, 0, end)):
            if ms >= self.connected_ms:
                self.lags.append(now_ms - ms)
                self.arrivals.append(now_ms)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.append(time.time() * 1000)
        for future in (self.answered, self.done):
            if not future.done():
                future.set_result(None)


async def follow_content(
    url: str, lags: list[float], arrivals: list[float], opening: asyncio.Semaphore, closed: list[float]
) -> None:
    """Reads the stream at ``url`` to its end (the edge closes it: ``Connection: close``), when it
    adds the time to ``closed``. ``opening`` bounds the streams being opened at once, as clients
    arriving over time would."""
    parts = urlsplit(url)
    target = f"{parts.path}?{parts.query}" if parts.query else parts.path
    request = f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode()
    reader = ContentReader(request, lags, arrivals, closed)
    async with opening:
        await asyncio.get_running_loop().create_connection(lambda: reader, parts.hostname, parts.port)
        await reader.answered
    await reader.done
    assert reader.status == b"200", f"stream answered {reader.status!r}"


async def idle(args: argparse.Namespace) -> dict[str, Any]:
    """Hold ``streams`` open streams (stalled chats, heartbeats only) until stdin says stop."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        auth = await login(session, args.api)
        chats = [await create(session, args.api, auth, "fake?fail=stall", n) for n in range(max(1, args.streams // 50))]
        responses = []
        for n in range(args.streams):
            responses.append(await session.get(chats[n % len(chats)]["stream_url"]))
        print(json.dumps({"open": len([r for r in responses if r.status == 200])}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for response in responses:
            response.close()
        return {"closed": len(responses)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["ttft", "throughput", "fanout", "idle"])
    parser.add_argument("--api", help="streambridge's API (every scenario but ttft with --via)")
    parser.add_argument("--via", help="ttft --steady: stream through this OpenAI-compatible base (.../v1) instead")
    parser.add_argument("--key", help="--via: its bearer key")
    parser.add_argument("--llm")
    parser.add_argument("--proxy")
    parser.add_argument("--chats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steady", type=float, default=0, help="seconds of closed-loop load instead of bursts")
    parser.add_argument("--readers", type=int, default=10)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--words", type=int, default=30)
    parser.add_argument("--ttft-ms", type=float, default=50)
    parser.add_argument("--delay-ms", type=float, default=10)
    parser.add_argument("--stamp", action="store_true", help="upstream → client lag, from stamped chunks")
    parser.add_argument("--max-tokens", type=int, help="asked of every chat: the simulated LLM's chunks at most")
    parser.add_argument("--no-baselines", action="store_true", help="ttft: streambridge only (no direct, no proxy)")
    args = parser.parse_args()
    if not (args.api or args.via) or (args.via and (args.scenario != "ttft" or not args.steady)):
        parser.error("--api is required, or ttft --via URL --steady SECONDS")
    if args.max_tokens:
        MAX_TOKENS["max_tokens"] = args.max_tokens
    scenario = {"ttft": ttft, "throughput": throughput, "fanout": fanout, "idle": idle}[args.scenario]
    try:  # the edge runs on uvloop; its clients here may as well
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    print(json.dumps(run(scenario(args))), flush=True)


if __name__ == "__main__":
    main()
