"""The benchmark, as one command: ``python -m bench.run`` (``--quick`` for a smaller run).

Starts what it needs (its own redis-server, the simulated LLM, a plain aiohttp proxy as a
baseline, api, edge and workers through the CLI) and runs the load generator in its own
process; prints a table, each figure beside its baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import redis

from streambridge.embedded import free_port, redis_server_binary
from streambridge.shared import keys

PY = sys.executable


class Child:
    def __init__(self, args: list[str], env: dict[str, str], ready: str = "listening on") -> None:
        self._errors = tempfile.TemporaryFile()  # its stderr: the reason, should it not start
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=self._errors, text=True)
        self.url = ""
        self.said: list[str] = []  # what it printed up to its ready line
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.said.append(line)
            if ready in line:
                match = re.search(r"(http://\S+)", line)
                self.url = match.group(1) if match else ""
                break
        else:
            self.proc.wait(10)
            self._errors.seek(0)
            said = self._errors.read().decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{' '.join(args[:4])} did not start: {' / '.join(said) or 'no output'}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def streambridge(*args: str, env: dict[str, str], ready: str = "listening on", python: str = PY) -> Child:
    return Child([python, "-m", "streambridge", *args], env, ready)


@contextmanager
def deployment(
    workers: int,
    extra_env: dict[str, str] | None = None,
    streams_url: str | None = None,
    *,
    one_process: bool = False,
    skeleton: bool = False,
    python: str = PY,
) -> Iterator[dict[str, object]]:
    """A deployment on a redis-server of its own; the chats' own keys on ``streams_url`` when given
    (``STREAMBRIDGE_STREAMS_REDIS_URL``: a ``redis-cluster://`` URL), the queue and the rest on that one.
    ``one_process``: api, edge and one worker in one ``streambridge up`` (named as all three).
    ``skeleton``: api, edge and one worker of ``bench/skeleton.py`` in place of ours (the
    architecture with no guarantee on it).
    ``python``: the interpreter our processes run on (the simulated LLM and the proxy keep this one's)."""
    port = free_port()
    # a Unix socket beside the port: ``extra_env`` STREAMBRIDGE_REDIS_URL=unix puts our processes on it
    sock = os.path.join(tempfile.mkdtemp(prefix="sb-bench-"), "redis.sock")
    args = ["--port", str(port), "--save", "", "--appendonly", "no", "--maxclients", "20000"]
    args += ["--unixsocket", sock, "--unixsocketperm", "700"]
    redis_proc = subprocess.Popen([redis_server_binary(), *args], stdout=subprocess.DEVNULL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBRIDGE_")}
    children: list[Child] = []
    proxy: subprocess.Popen[bytes] | None = None
    try:
        time.sleep(0.3)
        llm = streambridge("fake-llm", "--port", "0", env=env)
        children.append(llm)
        proxy_port = free_port()
        proxy = subprocess.Popen([PY, "-m", "bench.proxy", f"{llm.url}/v1", str(proxy_port)], env=env)
        env |= {"STREAMBRIDGE_REDIS_URL": f"redis://127.0.0.1:{port}/0", "STREAMBRIDGE_LLM_BASE_URL": f"{llm.url}/v1"}
        env |= {"STREAMBRIDGE_LOG_LEVEL": "WARNING", "STREAMBRIDGE_WORKER_CONCURRENCY": "2000"}
        env |= {"STREAMBRIDGE_WORKER_METRICS_PORT": "0"}  # several workers on one machine
        env |= {"STREAMBRIDGE_CHATS_PER_MINUTE": "1000000"}  # the load generator is one visitor
        lifted = ("VISITOR_CHATS_PER_MINUTE", "VISITOR_MAX_RUNNING_CHATS", "VISITOR_MAX_OPEN_STREAMS")
        env |= {f"STREAMBRIDGE_{name}": "1000000" for name in (*lifted, "MAX_OPEN_STREAMS_PER_IP")}
        env |= {"STREAMBRIDGE_STREAMS_REDIS_URL": streams_url} if streams_url else {}
        env |= extra_env or {}
        if env.get("STREAMBRIDGE_REDIS_URL") == "unix":
            env["STREAMBRIDGE_REDIS_URL"] = f"unix://{sock}?db=0"
        if one_process:
            edge = api = streambridge("up", "--port", "0", env=env, python=python)
            children.append(api)
            workers_ = [api]
            ready(f"{api.url}/readyz")  # its worker's startup (the batch lane) follows the listening line
            until = time.monotonic() + 10
            while not psutil.Process(api.proc.pid).children() and time.monotonic() < until:
                time.sleep(0.1)  # the lane: counted as ours only once it is there
        elif skeleton:
            edge = Child([python, "-m", "bench.skeleton", "edge"], env)
            api_env = {**env, "STREAMBRIDGE_PUBLIC_EDGE_URL": edge.url}
            api = Child([python, "-m", "bench.skeleton", "api"], api_env)
            children += [edge, api]
            workers_ = [Child([python, "-m", "bench.skeleton", "worker"], env, ready="worker started")]
            children += workers_
        else:
            edge = streambridge("edge", "--port", "0", env=env, python=python)
            api_env = {**env, "STREAMBRIDGE_PUBLIC_EDGE_URL": edge.url}
            api = streambridge("api", "--port", "0", env=api_env, python=python)
            children += [edge, api]
            workers_ = [streambridge("worker", env=env, ready="worker started", python=python) for _ in range(workers)]
            children += workers_
        time.sleep(0.5)
        yield {
            "redis": redis.Redis(port=port),
            "llm": llm.url,
            "llm_child": llm,
            "redis_pid": redis_proc.pid,
            "proxy": f"http://127.0.0.1:{proxy_port}",
            "proxy_pid": proxy.pid,
            "api": api.url,
            "api_child": api,
            "edge": edge,
            "workers": workers_,
            "env": env,
            "one_process": one_process,
        }
    finally:
        if proxy is not None:
            proxy.terminate()
        for child in reversed(children):
            child.stop()
        redis_proc.terminate()
        try:
            redis_proc.wait(10)
        except subprocess.TimeoutExpired:
            redis_proc.kill()
            redis_proc.wait()
        finally:
            shutil.rmtree(os.path.dirname(sock), ignore_errors=True)


def ready(url: str, timeout: float = 30.0) -> None:
    """Waits for ``url`` to answer 200."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # refused, or 503 (urllib's HTTPError is an OSError)
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 in {timeout:g} s")
        time.sleep(0.1)


class ScenarioFailed(Exception):
    pass


def load(*args: str) -> dict[str, Any]:
    out = subprocess.run([PY, "-m", "bench.load", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise ScenarioFailed(f"{args[0]} failed: {last}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def pickups(client: redis.Redis, chat_ids: list[str]) -> dict[str, float]:
    """What each worker recorded on the chat it started: arq's enqueue time → the job's start."""
    from bench.load import percentiles

    with client.pipeline(transaction=False) as pipe:
        for chat_id in chat_ids:
            pipe.hget(keys.chat(chat_id), "pickup_ms")
        values = [float(v) for v in pipe.execute() if v]
    return percentiles(values)


def redis_cpu(client: redis.Redis, seconds: float) -> float:
    before = redis_cpu_seconds(client)
    time.sleep(seconds)
    return (redis_cpu_seconds(client) - before) / seconds * 100


def idle_streams(d: dict[str, object], streams: int) -> dict[str, float]:
    edge = psutil.Process(d["edge"].proc.pid)  # type: ignore[attr-defined]
    rss_before = edge.memory_info().rss
    gen = subprocess.Popen(
        [PY, "-m", "bench.load", "idle", "--api", str(d["api"]), "--streams", str(streams)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert gen.stdout is not None
    assert gen.stdin is not None
    opened = json.loads(gen.stdout.readline())["open"]
    time.sleep(1)
    rss_after = edge.memory_info().rss
    redis_port = d["redis"].connection_pool.connection_kwargs["port"]  # type: ignore[attr-defined]
    redis_connections = sum(1 for c in edge.net_connections() if c.raddr and c.raddr.port == redis_port)
    gen.stdin.write("\n")
    gen.stdin.flush()
    gen.wait(60)
    return {
        "open": opened,
        "kb_per_stream": round((rss_after - rss_before) / max(opened, 1) / 1024, 1),
        "redis_connections": redis_connections,
    }


def ttft_rows(load_name: str, t: dict[str, object], client: redis.Redis) -> list[tuple[str, str, str, str]]:
    """TTFT against both baselines, pickup and delivery lag, for one load of the ``ttft`` scenario."""
    direct, proxy, sb = t["direct_ttft"], t["proxy_ttft"], t["streambridge_ttft"]
    rate = f"{t['chats_per_s']} chats/s" if "chats_per_s" in t else ""
    loadgen = f"load generator CPU {t['streambridge_loadgen_cpu']:.0%} (direct {t['direct_loadgen_cpu']:.0%})"
    rows = [(load_name, rate, "", loadgen)]
    for q in ("p50", "p99"):
        rows.append(
            (
                f"  TTFT {q}",
                f"{sb[q]:.1f} ms",  # type: ignore[index]
                f"direct {direct[q]:.1f} ms, proxy {proxy[q]:.1f} ms",  # type: ignore[index]
                f"+{sb[q] - direct[q]:.1f} ms vs direct ({sb[q] / direct[q]:.2f}×)",  # type: ignore[index]
            )
        )
    pickup, created, lag = pickups(client, t["chat_ids"]), t["pickup"], t["lag"]  # type: ignore[arg-type]
    rows.append(
        (
            "  pickup (arq enqueue → job start)",
            f"p50 {pickup['p50']:.1f} ms, p99 {pickup['p99']:.1f} ms",
            "≤ 5 / 20 ms (goal)",
            f"{pickup['n']} chats, as the workers recorded it",
        )
    )
    rows.append(
        (
            "  POST → started (API + queue + start)",
            f"p50 {created['p50']:.0f} ms, p99 {created['p99']:.0f} ms",  # type: ignore[index]
            "",
            "1 ms resolution",
        )
    )
    rows.append(
        (
            "  delivery lag (append → client)",
            f"p50 {lag['p50']:.1f} ms, p99 {lag['p99']:.1f} ms",  # type: ignore[index]
            "≤ 2 / 10 ms (goal)",
            f"stream-id clock, ±1 ms; {lag['n']:,} events",  # type: ignore[index]
        )
    )
    return rows


#: a thing's CPU seconds so far (a process's, a Redis's): sampled while a scenario runs
CpuProbe = Callable[[], float]


def process_cpu(pid: int) -> CpuProbe:
    process = psutil.Process(pid)
    return lambda: sum(process.cpu_times()[:2])


def redis_cpu_seconds(client: redis.Redis) -> float:
    """What ``INFO cpu`` says the server has used, all its threads, user and system."""
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


Samples = list[tuple[float, dict[str, float]]]


@contextmanager
def sampled(probes: dict[str, CpuProbe]) -> Iterator[Samples]:
    """Every probe, every 0.25 s (epoch s, values), in a thread, while the block runs."""
    samples: Samples = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            samples.append((time.time(), {name: probe() for name, probe in probes.items()}))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield samples
    finally:
        done.set()
        sampler.join()


def cores(samples: Samples, start: float, end: float) -> tuple[dict[str, float], float, float]:
    """Each probe's CPU in cores over the samples taken between ``start`` and ``end`` (epoch s), and
    the first and last of those samples' times; zeros if fewer than two fall in it."""
    inside = [s for s in samples if start <= s[0] <= end]
    if len(inside) < 2:
        return dict.fromkeys(samples[0][1] if samples else {}, 0.0), start, start
    (t0, first), (t1, last) = inside[0], inside[-1]
    return {name: (last[name] - first[name]) / (t1 - t0) for name in first}, t0, t1


def fan_out_run(
    d: dict[str, object], chats: int, readers: int, probes: dict[str, CpuProbe]
) -> tuple[dict[str, Any], dict[str, float]]:
    """``chats`` chats at 5 events/s, each read by ``readers`` clients on the one edge: the load
    generator's result, and each probe's CPU in cores while events flowed (opening the streams and
    the burst of ends are not counted). ``flowing_events_per_s`` is what the readers received in
    that same window."""
    with sampled(probes) as samples:
        f = load(
            "fanout",
            *("--api", str(d["api"]), "--chats", str(chats), "--readers", str(readers), "--seconds", "10"),
            # every chat created and every reader connected before the first token
            *("--ttft-ms", str(3000 + chats * readers + 3 * chats)),
        )
    cpu, t0, t1 = cores(samples, f["streaming_from"] + 1, f["streaming_to"] - 1)
    received = sum(n for at, n in f["received_per_100ms"].items() if t0 * 10 <= int(at) < t1 * 10)
    f["flowing_events_per_s"] = received / (t1 - t0) if t1 > t0 else 0.0
    return f, cpu


def fan_out(d: dict[str, object], chats: int, readers: int) -> tuple[str, str, str, str]:
    name = f"fan-out: {chats * readers:,} streams × 5 ev/s ({chats:,} chats × {readers})"
    try:
        f, cpu = fan_out_run(d, chats, readers, {"edge": process_cpu(d["edge"].proc.pid)})  # type: ignore[attr-defined]
    except ScenarioFailed as exc:
        return (name, "failed", str(exc)[:60], "")
    edge_cpu = cpu["edge"]
    lag, rate, loadgen = f["lag"], int(f["events_per_s"]), float(f["loadgen_cpu"])
    steady = f["lag_all_open"]
    return (
        name,
        f"{rate:,} events/s delivered",
        f"lag p50 {steady['p50']:.1f}, p99 {steady['p99']:.1f} ms all open; p99 {lag['p99']:.1f} ms with the ends",
        f"edge {edge_cpu:.0%} of a core ({edge_cpu / max(rate, 1) * 1e6:.1f} µs/event), load gen. {loadgen:.0%}",
    )


def one_worker_throughput(quick: bool) -> tuple[str, str, str, str]:
    """Goal 5 is about one worker process: a deployment with one worker, several runs, and the
    worker's own CPU per event (what it could append with a core to itself)."""
    rates, cpu, events = [], 0.0, 0
    with deployment(workers=1) as d:
        worker = psutil.Process(d["workers"][0].proc.pid)  # type: ignore[index]
        for _ in range(1 if quick else 3):
            before = sum(worker.cpu_times()[:2])
            args = ("--api", str(d["api"]), "--llm", str(d["llm"]), "--chats", "20", "--words")
            tp = load("throughput", *args, "600" if quick else "1500")
            cpu += sum(worker.cpu_times()[:2]) - before
            events += int(tp["events"])  # type: ignore[call-overload]
            rates.append(int(tp["append_rate"]))  # type: ignore[call-overload]
    per_event = cpu / max(events, 1) * 1e6
    return (
        "events appended per s, one worker",
        f"{sorted(rates)[len(rates) // 2]:,} (runs: {', '.join(f'{r:,}' for r in rates)})",
        "≥ 50,000 (goal)",
        f"worker CPU {per_event:.1f} µs/event: {1e6 / per_event:,.0f}/s on a core of its own",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller loads, for a smoke run")
    args = parser.parse_args()
    quick = args.quick
    rows: list[tuple[str, str, str, str]] = []
    one_worker = one_worker_throughput(quick)

    ttft_load = ("--chats", "50")
    steady_for = ("--steady", "6" if quick else "15")
    with deployment(workers=4) as d:
        idle_cpu = redis_cpu(d["redis"], 3 if quick else 5)  # type: ignore[arg-type]
        rows.append(("Redis CPU, 4 idle workers", f"{idle_cpu:.2f} %", "≤ 2 % (goal)", ""))
        urls = ("--api", str(d["api"]), "--llm", str(d["llm"]), "--proxy", str(d["proxy"]))
        steady = load("ttft", *urls, *ttft_load, *steady_for)
        rows += ttft_rows("4 workers, steady: 50 clients, each a chat at a time", steady, d["redis"])  # type: ignore[arg-type]
        burst = load("ttft", *urls, *ttft_load, "--rounds", "1" if quick else "3")
        rows += ttft_rows("4 workers, burst: 50 chats created at once", burst, d["redis"])  # type: ignore[arg-type]
        tp = load(
            "throughput",
            *("--api", str(d["api"]), "--llm", str(d["llm"]), "--chats", "20", "--words", "200" if quick else "600"),
        )
        rows.append(
            (
                "events appended per s, 4 workers (20 chats)",
                f"{tp['append_rate']:,}",
                f"direct read {tp['direct_rate']:,}/s",
                f"{tp['append_rate'] / tp['direct_rate']:.2f}×",
            )
        )  # type: ignore[operator]

    # Sized for this machine: one worker process runs hundreds of chats as tasks, and on 2 cores
    # shared by every process of the benchmark, four of them mostly compete for the CPU.
    with deployment(workers=1) as d:
        urls = ("--api", str(d["api"]), "--llm", str(d["llm"]), "--proxy", str(d["proxy"]))
        steady = load("ttft", *urls, *ttft_load, *steady_for)
        rows += ttft_rows("1 worker, steady: 50 clients, each a chat at a time", steady, d["redis"])  # type: ignore[arg-type]
        burst = load("ttft", *urls, *ttft_load, "--rounds", "1" if quick else "3")
        rows += ttft_rows("1 worker, burst: 50 chats created at once", burst, d["redis"])  # type: ignore[arg-type]
        rows.append(one_worker)
        streams = 2000 if quick else 10000
        i = idle_streams(d, streams)
        rows.append(("idle streams on one edge", f"{i['open']:,}", f"{streams:,} asked", ""))
        rows.append(("edge memory per idle stream", f"{i['kb_per_stream']} KB", "≤ 20 KB (goal)", ""))
        rows.append(
            ("edge Redis connections", f"{i['redis_connections']}", "≤ 4 (goal)", f"with {i['open']:,} streams")
        )
        for chats in (20,) if quick else (40, 200):
            rows.append(fan_out(d, chats, readers=50))
        # A chat app's usual case: each stream its own chat, so one Pub/Sub message per event written
        rows.append(fan_out(d, 200 if quick else 1000, readers=1))

    print_table(rows)


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    width = [max(len(r[c]) for r in rows) for c in range(4)]
    header = ("measure", "streambridge", "baseline / goal", "ratio / note")
    width = [max(w, len(h)) for w, h in zip(width, header, strict=True)]
    for row in [header, tuple("-" * w for w in width), *rows]:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, width, strict=True)))


if __name__ == "__main__":
    main()
