"""Slow clients: real chats' delivery lag with and without 1,000 half-open connections.

    .venv/bin/python -m bench.slowclients            # full run, about 80 s
    .venv/bin/python -m bench.slowclients --quick    # a smoke run, about 45 s
    .venv/bin/python -m bench.slowclients --profile /tmp/prof   # plus py-spy of api and edge
    .venv/bin/python -m bench.slowclients --json /tmp/slow.json  # plus every sample, for analysis

It exits 1 when the pass criterion below fails.

It starts a deployment as ``bench.run`` does: its own redis-server, ``streambridge fake-llm``,
``api``, ``edge`` and workers, all through the CLI. The per-visitor and per-IP limits are
raised, because the load generator is one visitor on one IP. The timeouts keep their defaults.
Then it runs the same real chats twice, each time in a load-generator process of its own:

1. **baseline**: ``--chats`` slots (50), staggered over one chat's duration. Each slot runs
   ``--rounds`` chats back to back, each streaming ``--words`` words at one chunk per
   ``--delay-ms`` through the edge, so about 50 chats stream at once at 20 chunks/s each;
2. **under attack**: the same chats, while a separate attacker process holds ``--api-conns``
   half-open connections to the API and ``--edge-conns`` to the edge. It reopens every
   connection the server closes, so the pressure stays at about 1,000 for the whole run:

   - *slowloris*: a partial request line and headers, then one more header byte every ~1 s;
   - *slow body*: ``POST /v1/chats`` with complete headers (a real visitor's token) and
     ``Content-Length: 100000``, then one body byte every ~1 s. The edge has no such route, so
     there it gets a 404 and then aiohttp's lingering read of the body;
   - *SSE non-readers* (edge only, ``--sse``): a valid stream with SO_RCVBUF at its minimum that
     is never read. Half are on a finished chat with a long history, half on a chat that keeps
     streaming throughout (one extra chat at 10 chunks/s, the attacker's own).

   The attacker binds its sockets to ``--source`` (127.0.0.2), a client address of its own. It
   checks each socket's TCP state (``TCP_INFO``) on every ~1 s tick, so it notices a close
   without reading. Its connection lifetimes therefore have ~1 s resolution.

Delivery lag is measured as in ``bench/load.py``, whose ``streambridge_chat`` this reuses: the
time the client receives an event minus the event's stream-id time (the worker's append). Only
events appended after the client connected count. TTFT is POST → first content. **Pass: p99
delivery lag under attack ≤ 2x the baseline p99.**

The report also gives the attacker's connections held (average, minimum) and the connections
the server closed (how many, how fast), with reconnects. It gives the api's and edge's RSS and
open fds, sampled every 0.5 s, and ``/healthz`` latency as a new client sees it. Every
process's CPU is shown as % of one core, including "other" (whatever else ran on the machine).
That shows whether the load generator or the attacker is saturated. When other processes used
more than 20 % of a core in a phase, a warning names the busiest ones: the figures are then not
this system's alone. The load generator also reports its own event-loop lag: a 10 ms sleep's
overshoot. A timeline in 1 s buckets compares the lag in the seconds with the most reconnects
against the rest.

Unless ``--no-gc-log`` is given, the deployment's processes get a ``sitecustomize`` on their
PYTHONPATH that logs each garbage-collector pass of ≥ 1 ms (and every full one). The report
counts them per phase, and finds which slow deliveries were in flight during one of the edge's.

The orchestrator runs these internal subcommands as processes:

    python -m bench.slowclients measure --api URL ...
    python -m bench.slowclients attack --api URL --edge URL ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import random
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.load import cpu_seconds, login, percentiles, streambridge_chat
from bench.run import PY, deployment

#: limits raised for the run: the load generator is one visitor on one address
LIMITS = {
    "STREAMBRIDGE_CHATS_PER_MINUTE": "1000000",
    "STREAMBRIDGE_VISITOR_CHATS_PER_MINUTE": "1000000",
    "STREAMBRIDGE_VISITOR_MAX_RUNNING_CHATS": "100000",
    "STREAMBRIDGE_VISITOR_MAX_OPEN_STREAMS": "100000",
    "STREAMBRIDGE_MAX_OPEN_STREAMS_PER_IP": "100000",
}
TCP_ESTABLISHED = 1

#: put on the deployment's PYTHONPATH: each server process logs its slow garbage-collector passes
#: (every one of at least 1 ms, and every full one) to <dir>/<pid>.log: "epoch-s generation ms collected"
GC_LOG = """
import gc, os, sys, time
_log = open(os.path.join(os.path.dirname(__file__), f"{os.getpid()}.log"), "a", buffering=1)
_log.write("# " + " ".join(sys.argv[1:]) + "\\n")
_start = [0.0]
def _gc_log(phase, info):
    if phase == "start":
        _start[0] = time.perf_counter()
        return
    ms = (time.perf_counter() - _start[0]) * 1000
    if ms >= 1 or info["generation"] == 2:
        _log.write(f"{time.time():.3f} {info['generation']} {ms:.2f} {info['collected']}\\n")
gc.callbacks.append(_gc_log)
"""


def pcts(values: list[float]) -> dict[str, float]:
    return percentiles(values, (0.50, 0.90, 0.95, 0.99, 0.999), mean=True)


# ---------------------------------------------------------------- the load generator (measure)


def chat_model(args: argparse.Namespace) -> str:
    return f"fake?words={args.words}&ttft_ms={args.ttft_ms}&delay_ms={args.delay_ms}"


def chat_seconds(args: argparse.Namespace) -> float:
    """How long one chat streams: its chunk count (as the simulated LLM cuts it) times the delay."""
    from streambridge.fake_llm import expected_text, split_text

    chunks = len(split_text(expected_text("bench 0 0", args.words)))
    return float(args.ttft_ms + chunks * args.delay_ms) / 1000


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    duration = chat_seconds(args)
    stagger = duration / args.chats
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        auth = await login(session, args.api)
        warm = "fake?words=5&ttft_ms=0&delay_ms=1"
        await asyncio.gather(*(streambridge_chat(session, args.api, auth, warm, n) for n in range(5)))
        results: list[dict[str, Any]] = []
        errors: list[str] = []

        async def slot(i: int) -> None:
            await asyncio.sleep(i * stagger)
            for r in range(args.rounds):
                try:
                    async with asyncio.timeout(duration * 3 + 30):
                        results.append(await streambridge_chat(session, args.api, auth, chat_model(args), i * 100 + r))
                except Exception as exc:  # counted and reported, never fatal
                    errors.append(f"{type(exc).__name__}: {str(exc)[:160]}")

        loop_lags: list[float] = []
        done = asyncio.Event()

        async def monitor() -> None:
            while not done.is_set():
                t = time.perf_counter()
                await asyncio.sleep(0.01)
                loop_lags.append((time.perf_counter() - t - 0.01) * 1000)

        watcher = asyncio.create_task(monitor())
        cpu, start = cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(slot(i) for i in range(args.chats)))
        wall = time.perf_counter() - start
        cpu = cpu_seconds() - cpu
        done.set()
        await watcher
    return {
        "chats": len(results),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "events": sum(r["content"] for r in results),
        "lag": pcts([lag for r in results for lag in r["lags"]]),
        "ttft": pcts([r["ttft"] for r in results if r["ttft"] is not None]),
        "pickup": pcts([r["pickup"] for r in results if r["pickup"] is not None]),
        "wall_s": round(wall, 1),
        "cpu": round(cpu / wall, 3),
        "loop_lag": pcts(loop_lags),
        # every live event: (received at, epoch s; lag, ms), for the timeline
        "samples": [(round(t, 3), round(lag, 2)) for r in results for t, lag in zip(r["at"], r["lags"], strict=True)],
    }


# ------------------------------------------------------------------------------- the attacker


@dataclass
class Kind:
    name: str  # e.g. "api slowloris"
    target: str  # "api" | "edge"
    slots: int
    held: int = 0
    opens: list[float] = field(default_factory=list)  # epoch s of each established connection
    closes: list[tuple[float, float]] = field(default_factory=list)  # (epoch s, lifetime s) of each server close
    failures: list[float] = field(default_factory=list)  # connects that failed


def tcp_state(sock: socket.socket) -> int:
    """The socket's TCP state (1: established; 7/8: closed/close-wait once the server closed)."""
    return int(struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0])


class Attacker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.kinds: list[Kind] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.stopping = False
        self.connecting = asyncio.Semaphore(64)  # at most this many connects in flight
        self.samples: list[tuple[float, int, int]] = []  # (epoch s, held on api, held on edge)

    def add(
        self, name: str, addr: tuple[str, int], count: int, request: Callable[[int], bytes], trickle: bytes, rcvbuf: int
    ) -> None:
        kind = Kind(name, name.split()[0], count)
        self.kinds.append(kind)
        for n in range(count):
            self.tasks.append(asyncio.create_task(self.hold(kind, addr, request(n), trickle, rcvbuf)))

    def held(self) -> int:
        return sum(k.held for k in self.kinds)

    async def connect(self, addr: tuple[str, int], request: bytes, rcvbuf: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if self.args.source:
                sock.bind((self.args.source, 0))
            async with self.connecting:
                await asyncio.wait_for(loop.sock_connect(sock, addr), 10)
            await loop.sock_sendall(sock, request)
        except BaseException:
            sock.close()
            raise
        return sock

    async def hold(self, kind: Kind, addr: tuple[str, int], request: bytes, trickle: bytes, rcvbuf: int) -> None:
        """Keeps one half-open connection of ``kind`` open, reopening it whenever the server closes it."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(random.uniform(0, self.args.ramp))
        while not self.stopping:
            try:
                sock = await self.connect(addr, request, rcvbuf)
            except (OSError, TimeoutError):
                kind.failures.append(time.time())
                await asyncio.sleep(0.5)
                continue
            opened = time.time()
            kind.opens.append(opened)
            kind.held += 1
            closed_by_server = False
            try:
                n = 0
                while not self.stopping:
                    await asyncio.sleep(self.args.interval * random.uniform(0.8, 1.2))
                    if tcp_state(sock) != TCP_ESTABLISHED:
                        closed_by_server = True
                        break
                    if trickle:
                        await loop.sock_sendall(sock, trickle[n % len(trickle) : n % len(trickle) + 1])
                        n += 1
            except OSError:
                closed_by_server = not self.stopping
            finally:
                kind.held -= 1
                sock.close()
            if closed_by_server:
                now = time.time()
                kind.closes.append((now, now - opened))

    async def sample(self) -> None:
        while not self.stopping:
            api = sum(k.held for k in self.kinds if k.target == "api")
            self.samples.append((time.time(), api, self.held() - api))
            await asyncio.sleep(0.25)

    async def stop(self) -> None:
        self.stopping = True
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def stats(self, start: float, end: float) -> dict[str, Any]:
        window = [(api, edge) for t, api, edge in self.samples if start <= t <= end]
        totals = [api + edge for api, edge in window] or [0]
        seconds = max(end - start, 1e-9)
        kinds = {}
        closes_by_second: Counter[int] = Counter()
        opens_by_second: Counter[int] = Counter()
        for k in self.kinds:
            closes = [life for t, life in k.closes if start <= t <= end]
            closes_by_second.update(int(t) for t, _ in k.closes if start <= t <= end)
            opens_by_second.update(int(t) for t in k.opens if start <= t <= end)
            kinds[k.name] = {
                "slots": k.slots,
                "closed_by_server": len(closes),
                "closes_per_s": round(len(closes) / seconds, 1),
                "lifetime_s": pcts(closes),
                "reconnects": sum(1 for t in k.opens if start <= t <= end),
                "connect_failures": sum(1 for t in k.failures if start <= t <= end),
            }
        return {
            "target": sum(k.slots for k in self.kinds),
            "held": {"avg": round(sum(totals) / len(totals), 1), "min": min(totals), "max": max(totals)},
            "held_api": round(sum(a for a, _ in window) / max(len(window), 1), 1),
            "held_edge": round(sum(e for _, e in window) / max(len(window), 1), 1),
            "kinds": kinds,
            "seconds": round(seconds, 1),
            "timeline": {s: [closes_by_second[s], opens_by_second[s]] for s in range(int(start), int(end) + 1)},
        }


async def attacker_chats(session: aiohttp.ClientSession, api: str, auth: dict[str, str]) -> list[tuple[str, str]]:
    """Two chats of the attacker's own, for its SSE non-readers: (id, stream path and query).

    The first has a long history (2,000 words, finished before the attack); the second streams
    throughout (10 chunks/s)."""
    paths = []
    for model in ("fake?words=2000&ttft_ms=0&delay_ms=0", "fake?words=5000&ttft_ms=0&delay_ms=100"):
        body = {"message": f"slowclients {model}", "model": model}
        async with session.post(f"{api}/v1/chats", json=body, headers=auth) as response:
            assert response.status == 202, await response.text()
            chat = await response.json()
        url = urllib.parse.urlsplit(chat["stream_url"])
        paths.append((chat["id"], f"{url.path}?{url.query}"))
    for _ in range(300):
        async with session.get(f"{api}/v1/chats/{paths[0][0]}", headers=auth) as response:
            if (await response.json())["status"] == "complete":
                return paths
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the history chat {paths[0][0]} did not complete")


def address(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


async def attack(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    a = Attacker(args)
    api, edge = address(args.api), address(args.edge)
    async with aiohttp.ClientSession() as session:
        auth = await login(session, args.api)  # the attacker is a visitor of its own
        streams = await attacker_chats(session, args.api, auth) if args.sse else []

        def slowloris(addr: tuple[str, int]) -> Callable[[int], bytes]:
            return lambda n: (
                f"GET /v1/chats/{random.getrandbits(128):032x} HTTP/1.1\r\nHost: {addr[0]}:{addr[1]}\r\nX-Slow: "
            ).encode()

        def slow_body(addr: tuple[str, int]) -> Callable[[int], bytes]:
            return lambda n: (
                f"POST /v1/chats HTTP/1.1\r\nHost: {addr[0]}:{addr[1]}\r\nAuthorization: {auth['Authorization']}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
            ).encode()

        def sse(n: int) -> bytes:
            path = streams[n % 2][1]
            return f"GET {path} HTTP/1.1\r\nHost: {edge[0]}:{edge[1]}\r\nAccept: text/event-stream\r\n\r\n".encode()

        header_bytes, rest = b"a\r\nX-Slow: ", args.edge_conns - args.sse
        a.add("api slowloris", api, args.api_conns // 2, slowloris(api), header_bytes, 0)
        a.add("api slow body", api, args.api_conns - args.api_conns // 2, slow_body(api), b" ", 0)
        a.add("edge slowloris", edge, rest // 2, slowloris(edge), header_bytes, 0)
        a.add("edge slow body", edge, rest - rest // 2, slow_body(edge), b" ", 0)
        if args.sse:
            a.add("edge SSE non-reader", edge, args.sse, sse, b"", 1)  # SO_RCVBUF 1: the kernel's minimum
        sampler = asyncio.create_task(a.sample())
        target, began = sum(k.slots for k in a.kinds), loop.time()
        while a.held() < 0.97 * target and loop.time() - began < args.ramp + 15:  # noqa: ASYNC110 - a gauge
            await asyncio.sleep(0.1)
        print(json.dumps({"ready": a.held(), "ramp_s": round(loop.time() - began, 1)}), flush=True)

        async def command(expected: str) -> None:
            while True:
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line or line.strip() == expected:  # EOF: the orchestrator is gone
                    return

        await command("start")
        start, cpu = time.time(), cpu_seconds()
        await command("stop")
        end, cpu = time.time(), cpu_seconds() - cpu
        out = a.stats(start, end) | {"cpu": round(cpu / max(end - start, 1e-9), 3)}
        await a.stop()
        sampler.cancel()
        if len(streams) > 1:
            async with session.post(f"{args.api}/v1/chats/{streams[1][0]}/cancel", headers=auth):
                pass
    return out


# --------------------------------------------------------------------------- the orchestrator


class Sampler(threading.Thread):
    """Every 0.5 s: RSS, open fds and CPU of api and edge, and /healthz latency of each."""

    def __init__(self, servers: dict[str, psutil.Process], urls: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.servers, self.urls = servers, urls
        self.stop = threading.Event()
        self.rss: dict[str, list[float]] = defaultdict(list)
        self.fds: dict[str, list[float]] = defaultdict(list)
        self.health: dict[str, list[float]] = defaultdict(list)
        self.cpu: dict[str, list[tuple[float, float]]] = defaultdict(list)  # (epoch s, % of a core)
        self.health_failures: Counter[str] = Counter()
        # every process on the machine, every 2 s: pid → [command, CPU s when first seen (0 if
        # it started during the phase), CPU s when last seen], to name what else kept the CPUs busy
        self.everyone: dict[int, list[Any]] = {pid: [cmd, cpu, cpu] for pid, (cmd, cpu) in all_cpu().items()}

    def run(self) -> None:
        for proc in self.servers.values():
            proc.cpu_percent()
        tick = 0
        while not self.stop.wait(0.5):
            for name, proc in self.servers.items():
                self.rss[name].append(proc.memory_info().rss / 2**20)
                self.fds[name].append(float(proc.num_fds()))
                self.cpu[name].append((time.time(), proc.cpu_percent()))
                self.health_check(name)
            tick += 1
            if tick % 4 == 0:
                self.census()
        self.census()

    def census(self) -> None:
        for pid, (cmd, cpu) in all_cpu().items():
            self.everyone.setdefault(pid, [cmd, 0.0, cpu])[2] = cpu

    def others(self, ours: set[int], wall: float) -> list[str]:
        """The busiest commands that are not this run's, over the phase (% of a core)."""
        used: dict[str, float] = defaultdict(float)
        for pid, (cmd, first, last) in self.everyone.items():
            if pid not in ours:
                used[cmd[:80]] += last - first
        busiest = sorted(used.items(), key=lambda item: -item[1])[:4]
        return [f"{cpu / wall:.0%} {cmd}" for cmd, cpu in busiest if cpu / wall >= 0.03]

    def health_check(self, name: str) -> None:
        url = urllib.parse.urlsplit(self.urls[name])
        start = time.perf_counter()
        try:
            conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=5)
            conn.request("GET", "/healthz")
            ok = conn.getresponse().status == 200
            conn.close()
        except OSError:
            ok = False
        if ok:
            self.health[name].append((time.perf_counter() - start) * 1000)
        else:
            self.health_failures[name] += 1


def find_processes() -> dict[str, list[psutil.Process]]:
    """The deployment's processes by role, found among this process's descendants."""
    names = {"api": "api", "edge": "edge", "worker": "workers", "fake-llm": "llm"}
    roles: dict[str, list[psutil.Process]] = {"api": [], "edge": [], "workers": [], "redis": [], "llm": []}
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmd = proc.cmdline()
            if proc.name() == "redis-server":
                roles["redis"].append(proc)
            elif "streambridge" in cmd and cmd[cmd.index("streambridge") + 1] in names:
                roles[names[cmd[cmd.index("streambridge") + 1]]].append(proc)
    missing = [role for role, procs in roles.items() if not procs]
    if missing:
        raise RuntimeError(f"no {', '.join(missing)} process found")
    return roles


def cpu_times(roles: dict[str, list[psutil.Process]]) -> dict[str, float]:
    out = {}
    for role, procs in roles.items():
        total = 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
        out[role] = total
    return out


def all_cpu() -> dict[int, tuple[str, float]]:
    """Every process on the machine: pid → (command line, CPU seconds so far)."""
    out = {}
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        t = proc.info["cpu_times"]
        if t is not None:
            out[proc.pid] = (" ".join(proc.info["cmdline"] or [])[:100], t.user + t.system)
    return out


def gc_passes(log_dir: str | None, roles: dict[str, list[psutil.Process]], t0: float, t1: float) -> dict[str, Any]:
    """Per server role: the garbage collector's passes of ≥ 1 ms (and every full one) between t0 and t1."""
    if log_dir is None:
        return {}
    out: dict[str, Any] = {}
    for role in ("api", "edge", "workers"):
        by_gen: dict[int, list[float]] = defaultdict(list)
        passes = []  # (epoch s at its end, generation, ms), for the attribution of slow deliveries
        for proc in roles[role]:
            path = Path(log_dir, f"{proc.pid}.log")
            for line in path.read_text().splitlines() if path.exists() else []:
                if not line.startswith("#"):
                    t, gen, ms_, collected = line.split()
                    if t0 <= float(t) <= t1:
                        by_gen[int(gen)].append(float(ms_))
                        passes.append((float(t), int(gen), float(ms_), int(collected)))
        out[role] = {str(g): {"n": len(v), "max": max(v), "total": round(sum(v), 1)} for g, v in sorted(by_gen.items())}
        out[f"{role}_passes"] = sorted(passes)
    return out


def machine_busy() -> float:
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def start_attacker(args: argparse.Namespace, d: dict[str, Any]) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    attacker = subprocess.Popen(
        [
            *[PY, "-m", "bench.slowclients", "attack", "--api", str(d["api"]), "--edge", d["edge"].url],
            *["--api-conns", str(args.api_conns), "--edge-conns", str(args.edge_conns), "--sse", str(args.sse)],
            *["--interval", str(args.interval), "--ramp", str(args.ramp), "--source", args.source],
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert attacker.stdout is not None
    line = attacker.stdout.readline()
    if not line:
        raise RuntimeError("the attacker did not start")
    return attacker, json.loads(line)


def tell(proc: subprocess.Popen[str], command: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(command + "\n")
    proc.stdin.flush()


def profilers(
    args: argparse.Namespace, roles: dict[str, list[psutil.Process]], phase: str
) -> list[subprocess.Popen[bytes]]:
    """py-spy on api and edge for the phase (``--profile DIR``): DIR/<phase>-<role>.txt, folded stacks."""
    if not args.profile:
        return []
    Path(args.profile).mkdir(parents=True, exist_ok=True)
    spy, spies = str(Path(PY).with_name("py-spy")), []
    for role in ("api", "edge"):
        out = f"{args.profile}/{phase}-{role}.txt"
        cmd = [spy, "record", "--nonblocking", "-r", "50", "-f", "raw", "-p", str(roles[role][0].pid), "-o", out]
        spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


def run_phase(
    args: argparse.Namespace, d: dict[str, Any], roles: dict[str, list[psutil.Process]], attacked: bool
) -> dict[str, Any]:
    attacker, ready = start_attacker(args, d) if attacked else (None, {})
    if attacker is not None:
        time.sleep(args.settle)
        roles = roles | {"attacker": [psutil.Process(attacker.pid)]}
        tell(attacker, "start")
    roles = roles | {"orchestrator": [psutil.Process()]}
    sampler = Sampler({"api": roles["api"][0], "edge": roles["edge"][0]}, {"api": d["api"], "edge": d["edge"].url})
    sampler.start()
    spies = profilers(args, roles, "attack" if attacked else "baseline")
    epoch0, children0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0, busy0, t0 = cpu_times(roles), machine_busy(), time.perf_counter()
    measurer = subprocess.Popen(measurer_args(args, str(d["api"])), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = measurer.communicate()
    wall = time.perf_counter() - t0
    cpu1, busy1 = cpu_times(roles), machine_busy()
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the measurer, reaped just now, whole life
    ours = {proc.pid for procs in roles.values() for proc in procs} | {proc.pid for proc in spies} | {measurer.pid}
    sampler.stop.set()
    sampler.join()
    for spy in spies:
        spy.send_signal(2)  # SIGINT: py-spy writes its profile and exits
        spy.wait(30)
    if measurer.returncode != 0:
        raise RuntimeError(f"the load generator failed: {stderr.decode().strip().splitlines()[-1:]}")
    result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    result["measurer_cpu_while_measuring"] = result.pop("cpu")  # its own figure, warm-up excluded
    result["cpu"] = {role: round((cpu1[role] - cpu0[role]) / wall, 3) for role in cpu0}
    used = children1.ru_utime + children1.ru_stime - children0.ru_utime - children0.ru_stime
    result["cpu"]["measurer"] = round(used / wall, 3)
    result["cpu"]["machine"] = round((busy1 - busy0) / wall, 3)
    total = sum(v for role, v in result["cpu"].items() if role != "machine")
    result["cpu"]["other"] = round(max(0.0, result["cpu"]["machine"] - total), 3)  # whatever else ran meanwhile
    result["others"] = sampler.others(ours, wall)
    result["gc"] = gc_passes(d.get("gc_log"), roles, epoch0, epoch0 + wall)
    result["servers"] = {
        name: {
            "rss_mb": pcts(sampler.rss[name]),
            "fds": pcts(sampler.fds[name]),
            "healthz_ms": pcts(sampler.health[name]),
            "healthz_failures": sampler.health_failures[name],
            "cpu_timeline": sampler.cpu[name],
        }
        for name in sampler.servers
    }
    if attacker is not None:
        tell(attacker, "stop")
        assert attacker.stdout is not None
        result["attack"] = ready | json.loads(attacker.stdout.readline())  # its own CPU figure is a cross-check
        attacker.wait(30)
    return result


def measurer_args(args: argparse.Namespace, api: str) -> list[str]:
    return [
        *[PY, "-m", "bench.slowclients", "measure", "--api", api, "--chats", str(args.chats)],
        *["--rounds", str(args.rounds), "--words", str(args.words)],
        *["--ttft-ms", str(args.ttft_ms), "--delay-ms", str(args.delay_ms)],
    ]


# ------------------------------------------------------------------------------------ report


def ms(p: dict[str, float], q: str) -> str:
    return f"{p[q]:.1f}" if q in p else "-"


def table(rows: list[tuple[str, ...]]) -> None:
    width = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, width, strict=True)).rstrip())
        if i == 0:
            print(" | ".join("-" * w for w in width))


def main_table(base: dict[str, Any], hit: dict[str, Any]) -> None:
    rows: list[tuple[str, ...]] = [("measure", "baseline", "under attack", "ratio")]
    for metric, label in (("lag", "delivery lag"), ("ttft", "TTFT"), ("pickup", "pickup (POST → started)")):
        for q in ("p50", "p95", "p99", "p99.9", "max"):
            if metric != "lag" and q in ("p99.9", "max"):
                continue
            b, h = base[metric], hit[metric]
            rows.append((f"{label} {q} (ms)", ms(b, q), ms(h, q), f"{h[q] / b[q]:.2f}×" if b.get(q) else "-"))
    rows.append(
        ("events / chats / errors", *(f"{r['lag']['n']:,} / {r['chats']} / {r['errors']}" for r in (base, hit)), "")
    )
    for name in ("api", "edge"):
        b, h = base["servers"][name], hit["servers"][name]
        rows.append((f"{name} RSS MB (max)", ms(b["rss_mb"], "max"), ms(h["rss_mb"], "max"), ""))
        rows.append(
            (f"{name} open fds (mean / max)", *(f"{r['fds']['mean']:.0f} / {r['fds']['max']:.0f}" for r in (b, h)), "")
        )
        health = [
            f"{ms(r['healthz_ms'], 'p50')} / {ms(r['healthz_ms'], 'p99')} ({r['healthz_failures']})" for r in (b, h)
        ]
        rows.append((f"{name} /healthz p50 / p99 ms (fails)", *health, ""))
    for role in ("api", "edge", "workers", "redis", "llm", "measurer", "attacker", "orchestrator", "other", "machine"):
        b, h = base["cpu"].get(role), hit["cpu"].get(role)
        label = "CPU, whole machine (of 200 %)" if role == "machine" else f"CPU {role} (% of a core)"
        rows.append((label, "-" if b is None else f"{b:.0%}", "-" if h is None else f"{h:.0%}", ""))
    for role in ("edge", "api", "workers") if base.get("gc") else ():
        cells = []
        for r in (base, hit):
            gens = r["gc"][role]
            cells.append(", ".join(f"gen{g} {v['n']}× ≤{v['max']:.0f}" for g, v in gens.items()) or "none")
        rows.append((f"{role} GC passes ≥ 1 ms (count, max ms)", *cells, ""))
    loop_lag = [f"{ms(r['loop_lag'], 'p99')} / {ms(r['loop_lag'], 'max')}" for r in (base, hit)]
    rows.append(("load generator loop lag p99 / max (ms)", *loop_lag, ""))
    table(rows)


def attacker_table(args: argparse.Namespace, att: dict[str, Any]) -> None:
    held = att["held"]
    print(
        f"attacker: target {att['target']} connections (api {args.api_conns}, edge {args.edge_conns}); held over the "
        f"measured {att['seconds']} s: avg {held['avg']}, min {held['min']}, max {held['max']} (api avg "
        f"{att['held_api']}, edge avg {att['held_edge']}); ramp {att['ramp_s']} s; attacker's own CPU {att['cpu']:.0%}"
    )
    rows: list[tuple[str, ...]] = [
        ("kind", "slots", "closed by server", "per s", "lifetime p50 / p90 / max s", "reconnects", "connect failures")
    ]
    for name, k in att["kinds"].items():
        life = k["lifetime_s"]
        lifetime = f"{ms(life, 'p50')} / {ms(life, 'p90')} / {ms(life, 'max')}" if life["n"] else "never closed"
        rows.append((name, str(k["slots"]), str(k["closed_by_server"]), f"{k['closes_per_s']}", lifetime))
        rows[-1] += (str(k["reconnects"]), str(k["connect_failures"]))
    table(rows)


def timeline(hit: dict[str, Any]) -> None:
    """Lag in the seconds with the most reconnects (the top fifth) against the other seconds."""
    reconnects = {int(s): v[1] for s, v in hit["attack"]["timeline"].items()}
    by_second: dict[int, list[float]] = defaultdict(list)
    for t, lag in hit["samples"]:
        by_second[int(t)].append(lag)
    seconds = sorted(s for s in by_second if s in reconnects)
    if len(seconds) < 5:
        return
    cut = sorted((reconnects[s] for s in seconds), reverse=True)[len(seconds) // 5]
    busy = [lag for s in seconds if reconnects[s] > cut for lag in by_second[s]]
    calm = [lag for s in seconds if reconnects[s] <= cut for lag in by_second[s]]
    busy_n = sum(1 for s in seconds if reconnects[s] > cut)
    print(
        f"timeline: lag p99 in the {busy_n} s with > {cut} reconnects: {ms(pcts(busy), 'p99')} ms "
        f"({len(busy):,} events); in the other {len(seconds) - busy_n} s: {ms(pcts(calm), 'p99')} ms "
        f"({len(calm):,} events)"
    )


def gc_attribution(name: str, r: dict[str, Any], threshold: float) -> None:
    """Which of the phase's slow deliveries were in flight while the edge's garbage collector ran."""
    if not r.get("gc"):
        return
    passes = [(end - pause / 1000, end, gen, pause, n) for end, gen, pause, n in r["gc"]["edge_passes"]]

    def during_gc(received: float, lag: float) -> tuple[float, int, float, int] | None:
        for start, end, gen, pause, n in passes:
            if start < received and end > received - lag / 1000:
                return end, gen, pause, n
        return None

    slow = [(t, lag) for t, lag in r["samples"] if lag > threshold]
    hits = [(t, lag, gc) for t, lag in slow if (gc := during_gc(t, lag))]
    print(
        f"{name}: {len(slow):,} deliveries slower than {threshold:.1f} ms; {len(hits):,} of them were in flight during "
        f"one of the edge's {len(passes)} garbage-collector passes of ≥ 1 ms"
    )
    first = min(t for t, _ in r["samples"])
    for t, lag in sorted(r["samples"], key=lambda x: -x[1])[:3]:
        gc = during_gc(t, lag)
        why = (
            f"edge gen{gc[1]} GC pass of {gc[2]:.1f} ms ({gc[3]:,} objects freed), "
            f"ended {(t - gc[0]) * 1000:.1f} ms before"
            if gc
            else "no GC"
        )
        print(f"  {lag:.1f} ms at t+{t - first:.1f} s: {why}")


def report(args: argparse.Namespace, base: dict[str, Any], hit: dict[str, Any]) -> bool:
    main_table(base, hit)
    print()
    attacker_table(args, hit["attack"])
    extra = {
        name: hit["servers"][name]["fds"]["mean"] - base["servers"][name]["fds"]["mean"] for name in ("api", "edge")
    }
    print(
        f"as the servers see it (open fds, mean, over the baseline's): api +{extra['api']:.0f}, "
        f"edge +{extra['edge']:.0f}. The attacker counts a connection as held until it notices the close "
        "(≤ ~1.2 s later)."
    )
    print()
    timeline(hit)
    b99, h99 = base["lag"]["p99"], hit["lag"]["p99"]
    for r, name in ((base, "baseline"), (hit, "under attack")):
        gc_attribution(name, r, 2 * b99)
    passed = bool(h99 <= 2 * b99)
    verdict, sign = ("PASS", "≤") if passed else ("FAIL", ">")
    print(
        f"{verdict}: delivery lag p99 under attack {h99:.1f} ms {sign} 2 × baseline p99 {b99:.1f} ms "
        f"= {2 * b99:.1f} ms ({h99 / b99:.2f}×)"
    )
    for r, name in ((base, "baseline"), (hit, "under attack")):
        if r["cpu"]["other"] > 0.2:
            print(
                f"WARNING: other processes used {r['cpu']['other']:.0%} of a core during the {name} phase: "
                f"the figures are not this system's alone; run again on a quiet machine. Busiest: {r['others']}"
            )
        if r["errors"]:
            print(f"{name}: {r['errors']} chats failed, e.g. {r['error_samples']}")
    return passed


def orchestrate(args: argparse.Namespace) -> None:
    if args.quick:
        args.rounds, args.words = 2, 40
    print(
        f"slowclients: {args.chats} chats × {args.rounds} rounds, {args.words} words at {args.delay_ms:g} ms a chunk "
        f"(~{chat_seconds(args):.1f} s a chat); attack: {args.api_conns} on api, {args.edge_conns} on edge "
        f"({args.sse} SSE non-readers); {args.workers} workers; {psutil.cpu_count()} CPUs",
        flush=True,
    )
    env = dict(LIMITS)
    with contextlib.ExitStack() as stack:
        gc_log = None
        if not args.no_gc_log:
            gc_log = stack.enter_context(tempfile.TemporaryDirectory(prefix="slowclients-gc-"))
            Path(gc_log, "sitecustomize.py").write_text(GC_LOG)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (gc_log, os.environ.get("PYTHONPATH")) if p)
        base, hit = phases(args, env, gc_log)
    print()
    passed = report(args, base, hit)
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline": base, "attack": hit, "args": vars(args)}))
    sys.exit(0 if passed else 1)


def phases(args: argparse.Namespace, env: dict[str, str], gc_log: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    with deployment(workers=args.workers, extra_env=env) as d:
        d["gc_log"] = gc_log
        roles = find_processes()
        base = run_phase(args, d, roles, attacked=False)
        print(f"baseline: {base['chats']} chats in {base['wall_s']} s, lag p99 {base['lag'].get('p99')} ms", flush=True)
        hit = run_phase(args, d, roles, attacked=True)
        print(f"attack: {hit['chats']} chats in {hit['wall_s']} s, lag p99 {hit['lag'].get('p99')} ms", flush=True)
    return base, hit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "measure", "attack"])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 40-word chats")
    parser.add_argument("--api")
    parser.add_argument("--edge")
    parser.add_argument("--chats", type=int, default=50, help="concurrent real chats")
    parser.add_argument("--rounds", type=int, default=3, help="chats each slot runs back to back")
    parser.add_argument("--words", type=int, default=80)
    parser.add_argument("--ttft-ms", type=float, default=50)
    parser.add_argument("--delay-ms", type=float, default=50, help="between chunks: 50 ms is 20 chunks/s")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--api-conns", type=int, default=500)
    parser.add_argument("--edge-conns", type=int, default=500)
    parser.add_argument("--sse", type=int, default=100, help="of --edge-conns: SSE streams never read")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between trickled bytes")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds over which the attack opens")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds between the ramp and measuring")
    parser.add_argument("--source", default="127.0.0.2", help="the attacker's address ('' for the default)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--no-gc-log", action="store_true", help="don't log the servers' garbage-collector passes")
    parser.add_argument("--profile", help="a directory: py-spy (folded stacks) of api and edge in each phase")
    args = parser.parse_args()
    if args.mode == "measure":
        print(json.dumps(asyncio.run(measure(args))), flush=True)
    elif args.mode == "attack":
        import uvloop

        print(json.dumps(uvloop.run(attack(args))), flush=True)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
