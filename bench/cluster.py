"""Redis Cluster against one Redis, in one run: ``python -m bench.cluster`` (``--quick`` for a smaller run).

The same loads on two deployments (``bench.run.deployment``, one worker, one edge): **one Redis**
holding everything, as today, and a **control** redis-server with the chats' own keys on a 6-node
Redis Cluster (3 primaries + 3 replicas, ``tests.cluster.RedisCluster``) through
``STREAMBRIDGE_STREAMS_REDIS_URL``. Three loads on each:

- fan-out (``bench.load fanout``): delivery lag, events delivered, and CPU per event appended of
  every Redis (``INFO cpu`` of the control Redis and of every cluster node, replicas too: they apply
  what their primary did; net of what each spends idle, measured just before), of the edge (per
  event delivered) and of the worker, sampled while events flow;
- full speed (``bench.load throughput``, 20 chats): the same CPU per event when appends are batched;
- creations (``bench.load ttft --steady``: 50 clients, each a chat at a time): the control Redis's
  CPU per chat created and run (the API's CREATE and ADMIT, the worker's start and finish, the
  edge's stream slot), net of what it spends idle, whence the chats a second one core of it takes;
  and the memory each chat (a 30-word answer) leaves on the streams Redis's primaries till it
  expires.

Rounds alternate which deployment goes first; the table gives each figure's median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from bench.run import (
    CpuProbe,
    ScenarioFailed,
    cores,
    deployment,
    fan_out_run,
    load,
    process_cpu,
    redis_cpu_seconds,
    sampled,
)
from streambridge.shared import keys
from tests.cluster import RedisCluster

MODES = ("one Redis", "cluster")
Figures = dict[str, float]


@contextmanager
def system(mode: str) -> Iterator[tuple[dict[str, object], list[redis.Redis], list[redis.Redis]]]:
    """A deployment, and the clients of the streams Redis's primaries and replicas (none when it is
    the control one)."""
    if mode == "one Redis":
        with deployment(workers=1) as d:
            yield d, [], []
        return
    cluster = RedisCluster()
    try:
        primaries = cluster.primaries()
        replicas = [node.client for node in cluster.nodes if node not in primaries]
        with deployment(workers=1, streams_url=cluster.url) as d:
            yield d, [node.client for node in primaries], replicas
    finally:
        cluster.stop()


def all_cpu(nodes: list[redis.Redis]) -> CpuProbe:
    return lambda: sum(redis_cpu_seconds(node) for node in nodes)


def probes(d: dict[str, object], primaries: list[redis.Redis], replicas: list[redis.Redis]) -> dict[str, CpuProbe]:
    return {
        "control": all_cpu([d["redis"]]),  # type: ignore[list-item]
        "primaries": all_cpu(primaries),
        "replicas": all_cpu(replicas),
        "edge": process_cpu(d["edge"].proc.pid),  # type: ignore[attr-defined]
        "worker": process_cpu(d["workers"][0].proc.pid),  # type: ignore[index]
    }


REDIS = ("control", "primaries", "replicas")


def idle(watch: dict[str, CpuProbe], seconds: float) -> dict[str, float]:
    """Each Redis's CPU in cores with nothing to do but heartbeats, scans and (cluster) its bus."""
    before = {name: watch[name]() for name in REDIS}
    time.sleep(seconds)
    return {name: (watch[name]() - value) / seconds for name, value in before.items()}


def fan_out_figures(
    d: dict[str, object], watch: dict[str, CpuProbe], chats: int, readers: int, rest: Figures
) -> Figures:
    f, cpu = fan_out_run(d, chats, readers, watch)
    delivered = f["flowing_events_per_s"]
    appended = delivered / readers  # each content event reaches each of its chat's readers
    per_appended = 1e6 / max(appended, 1)
    net = {name: (cpu[name] - rest[name]) * per_appended for name in REDIS}
    return {
        "lag p50 (ms)": f["lag_all_open"]["p50"],
        "lag p99 (ms)": f["lag_all_open"]["p99"],
        "events/s delivered": delivered,
        "events/s appended": appended,
        "Redis CPU per event, every node, net of idle (µs)": sum(net.values()),
        "  control Redis (µs)": net["control"],
        "  streams primaries (µs)": net["primaries"],
        "  streams replicas (µs)": net["replicas"],
        "edge CPU per delivered event (µs)": cpu["edge"] * 1e6 / max(delivered, 1),
        "worker CPU per event (µs)": cpu["worker"] * per_appended,
    }


def held(store: list[redis.Redis]) -> tuple[int, int]:
    """Bytes used and chats held (their hashes) on the Redis that hold the chats' own keys."""
    memory = sum(int(node.info("memory")["used_memory"]) for node in store)
    pattern = keys.chat("*")
    return memory, sum(sum(1 for _ in node.scan_iter(match=pattern, count=1000, _type="hash")) for node in store)


def creation_figures(
    d: dict[str, object], watch: dict[str, CpuProbe], seconds: float, rest: Figures, store: list[redis.Redis]
) -> Figures:
    urls = ("--api", str(d["api"]), "--llm", str(d["llm"]))
    memory, chats = held(store)
    with sampled(watch) as samples:
        t = load("ttft", *urls, "--no-baselines", "--chats", "50", "--steady", str(seconds))
    cpu, _, _ = cores(samples, *t["streambridge_counted"])
    rate = t["chats_per_s"]
    control = (cpu["control"] - rest["control"]) / rate
    memory_after, chats_after = held(store)
    return {
        "chats/s created (50 clients)": rate,
        "control Redis CPU per chat (µs)": control * 1e6,
        "streams primaries CPU per chat (µs)": (cpu["primaries"] - rest["primaries"]) / rate * 1e6,
        "chats/s one control core takes": (1 - rest["control"]) / control,
        "streams memory per ended chat, primaries (KB)": (memory_after - memory) / max(chats_after - chats, 1) / 1024,
    }


def full_speed_figures(d: dict[str, object], watch: dict[str, CpuProbe], words: int, rest: Figures) -> Figures:
    """20 chats as fast as the simulated LLM sends: the sink's batches and the appender's pipelines
    as full as they get, where the fan-out's 5 events/s per chat send about one event per call."""
    before, start = {name: probe() for name, probe in watch.items()}, time.time()
    tp = load("throughput", "--api", str(d["api"]), "--llm", str(d["llm"]), "--chats", "20", "--words", str(words))
    seconds = time.time() - start
    used = {name: watch[name]() - before[name] - rest.get(name, 0) * seconds for name in watch}
    per_event = 1e6 / tp["events"]
    return {
        "full speed: events/s appended (20 chats)": tp["append_rate"],
        "full speed: Redis CPU per event, every node (µs)": sum(used[name] for name in REDIS) * per_event,
        "full speed: streams primaries (µs)": used["primaries"] * per_event,
        "full speed: worker CPU per event (µs)": used["worker"] * per_event,
    }


def measure(mode: str, chats: int, readers: int, steady: float, words: int) -> Figures:
    with system(mode) as (d, primaries, replicas):
        watch = probes(d, primaries, replicas)
        rest = idle(watch, 3)
        figures = {"Redis CPU idle, every node (% of a core)": sum(rest.values()) * 100}
        figures |= fan_out_figures(d, watch, chats, readers, rest)
        figures |= full_speed_figures(d, watch, words, rest)
        store = primaries or [d["redis"]]  # type: ignore[list-item]
        return figures | creation_figures(d, watch, steady, rest, store)


def slot_renewals(streams: int, seconds: float = 30) -> str:
    """The control Redis's CPU per stream slot renewed (``api/slots.py``: every open stream's, every
    ``RENEW_EVERY`` s): ``streams`` idle streams held on one edge, against the same Redis idle."""
    from streambridge.api.slots import RENEW_EVERY

    with deployment(workers=1) as d:
        watch = all_cpu([d["redis"]])  # type: ignore[list-item]
        before = watch()
        time.sleep(seconds)
        rest = (watch() - before) / seconds
        args = [sys.executable, "-m", "bench.load", "idle", "--api", str(d["api"]), "--streams", str(streams)]
        gen = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert gen.stdin is not None
        assert gen.stdout is not None
        opened = json.loads(gen.stdout.readline())["open"]
        time.sleep(RENEW_EVERY)  # the slots opened in a burst renew on their own schedule from here
        before = watch()
        time.sleep(seconds)
        held = (watch() - before) / seconds
        gen.stdin.write("\n")
        gen.stdin.flush()
        gen.wait(60)
    per_renewal = (held - rest) / (opened / RENEW_EVERY) * 1e6
    return (
        f"{opened:,} idle streams: control Redis {held:.2%} of a core, {rest:.2%} without them; "
        f"{per_renewal:.1f} µs per slot renewed ({opened / RENEW_EVERY:,.0f} renewals/s)"
    )


def table(results: dict[str, list[Figures]]) -> list[tuple[str, str, str, str]]:
    one, cluster = ({k: statistics.median(r[k] for r in results[m]) for k in results[m][0]} for m in MODES)
    rows = [("rounds measured", str(len(results[MODES[0]])), str(len(results[MODES[1]])), "")]
    for name, a in one.items():
        b = cluster[name]
        fmt: Callable[[float], str] = (lambda v: f"{v:,.0f}") if max(abs(a), abs(b)) >= 100 else (lambda v: f"{v:.1f}")
        rows.append((name, fmt(a), fmt(b), f"{b / a:.2f}×" if a else "—"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller loads, for a smoke run")
    parser.add_argument("--chats", type=int, help="fan-out chats (default 200; 100 with --quick)")
    parser.add_argument("--readers", type=int, help="fan-out readers per chat (default 5; 2 with --quick)")
    parser.add_argument("--rounds", type=int, default=1, help="each deployment this many times, alternating")
    parser.add_argument("--slots", type=int, metavar="STREAMS", help="only: slot renewals with this many idle streams")
    args = parser.parse_args()
    if args.slots:
        print(slot_renewals(args.slots))
        return
    chats = args.chats or (100 if args.quick else 200)
    args.readers = args.readers or (2 if args.quick else 5)
    steady = 6 if args.quick else 15
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    results: dict[str, list[Figures]] = {mode: [] for mode in MODES}
    for n in range(args.rounds):
        for mode in MODES if n % 2 == 0 else MODES[::-1]:
            try:
                results[mode].append(measure(mode, chats, args.readers, steady, 200 if args.quick else 600))
            except ScenarioFailed as exc:  # said, and left out of the medians
                print(f"round {n + 1}, {mode}: {exc}", flush=True)
                continue
            print(f"round {n + 1}, {mode}: {results[mode][-1]}", flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    shape = f"{chats * args.readers:,} streams × 5 ev/s ({chats:,} chats × {args.readers})"
    print(f"fan-out: {shape}, one edge, one worker")
    print_table(table(results))


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    """Markdown, numbers right-aligned."""
    header = ("measure", "one Redis", "control + 6-node cluster", "cluster ÷ one Redis")
    width = [max(len(r[c]) for r in [header, *rows]) for c in range(4)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, width, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 1) + (":" if c else "-") for c, w in enumerate(width)) + "|")
    for name, *cells in rows:
        numbers = " | ".join(c.rjust(w) for c, w in zip(cells, width[1:], strict=True))
        print(f"| {name.ljust(width[0])} | {numbers} |")


if __name__ == "__main__":
    main()
