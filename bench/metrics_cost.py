"""What metrics cost: CPU per chat with ``STREAMBRIDGE_METRICS`` on and off, under the benchmark's
steady load, in one run. ``python -m bench.metrics_cost [--rounds 4] [--steady 10]``

Two deployments side by side (``bench.run.deployment``: a redis-server each, api, edge, one worker),
one with metrics on, one off. Rounds alternate which goes first (on/off, then off/on: a drift of
the host's speed over the run weighs on both alike); each round runs the steady scenario of
``bench/load.py`` (``ttft --steady``: 50 clients, each a chat at a time) on one deployment, then on
the other, while the idle one waits. CPU per chat: the api, edge and worker processes' CPU time and
Redis's (``INFO cpu``) over the load, divided by the chats it created (warm-up chats included: the
CPU they took is counted too). The deployment with metrics on is scraped as Prometheus would, every
``SCRAPE_EVERY`` s (api, edge and the worker's port), during its load: the scrapes' cost is counted.
"""

from __future__ import annotations

import argparse
import re
import statistics
import threading
import timeit
import urllib.request
from typing import Any

import psutil
import redis

from bench.run import deployment, load
from streambridge.shared import keys


def cpu_seconds(d: dict[str, Any]) -> float:
    """The deployment's CPU so far: its api, edge and workers (user + system), and its Redis."""
    procs = [d["edge"].proc.pid, d["api_child"].proc.pid, *(w.proc.pid for w in d["workers"])]
    ours = sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in procs)
    info = d["redis"].info("cpu")
    return ours + float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


#: seconds between two scrapes of the deployment with metrics on (Prometheus's default is 60; 1 is dear)
SCRAPE_EVERY = 1.0
_CHAT_PREFIX = keys.chat("").encode()


def chats(client: redis.Redis) -> int:
    """The chats' records: ``sb:chat:{id}``, not their ``:events`` and ``:lease`` keys beside them."""
    found = client.scan_iter(match=keys.chat("*"), count=1000)
    return sum(1 for key in found if b":" not in key[len(_CHAT_PREFIX) :])


def metrics_urls(d: dict[str, Any]) -> list[str]:
    workers = [
        match.group(1)
        for w in d["workers"]
        for line in w.said
        if "worker metrics listening on" in line and (match := re.search(r"(http://\S+)", line))
    ]
    assert len(workers) == len(d["workers"]), "a worker announced no metrics port"
    return [f"{url}/metrics" for url in (str(d["api"]), d["edge"].url, *workers)]


def scrape_every(urls: list[str], stop: threading.Event, scraped: list[int]) -> None:
    while not stop.wait(SCRAPE_EVERY):
        for url in urls:
            with urllib.request.urlopen(url, timeout=10) as response:
                response.read()
            scraped[0] += 1


def one_load(d: dict[str, Any], clients: int, seconds: float, scrape: bool) -> dict[str, float]:
    stop, scraped = threading.Event(), [0]
    scraper = threading.Thread(target=scrape_every, args=(metrics_urls(d), stop, scraped), daemon=True)
    before_cpu, before_chats = cpu_seconds(d), chats(d["redis"])
    if scrape:
        scraper.start()
    urls = ("--api", str(d["api"]), "--llm", str(d["llm"]), "--proxy", str(d["proxy"]))
    try:
        result = load("ttft", *urls, "--chats", str(clients), "--steady", str(seconds), "--no-baselines")
    finally:
        stop.set()
        if scrape:
            scraper.join()
    used, n = cpu_seconds(d) - before_cpu, chats(d["redis"]) - before_chats
    return {
        "chats": n,
        "chats_per_s": float(result["chats_per_s"]),  # type: ignore[arg-type]
        "cpu_ms_per_chat": used / max(n, 1) * 1000,
        "ttft_p50": float(result["streambridge_ttft"]["p50"]),  # type: ignore[index]
        "scrapes": scraped[0],
    }


#: metric calls a chat makes besides the edge's delivery lag: created; open/close stream; pickup,
#: TTFT, finished, duration, tokens, token rate (and a retry or a refusal, now and then)
FIXED_CALLS_PER_CHAT = 10


def lag_observations_per_chat(d: dict[str, Any]) -> float:
    """The edge's delivery lag observations (one per notification it read) per chat, on ``d``."""
    with urllib.request.urlopen(f"{d['edge'].url}/metrics", timeout=10) as response:
        text = response.read().decode()
    prefix = "streambridge_delivery_lag_seconds_count"
    lag = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))
    return lag / max(chats(d["redis"]), 1)


def call_costs_us() -> tuple[float, float]:
    """One observation of the edge's delivery lag (``LoopHistogram``) and one of prometheus-client's
    histograms (the dearest of the other calls), timed in this process, in µs."""
    from prometheus_client import CollectorRegistry, Histogram

    from streambridge.shared.metrics import LAG_BUCKETS, LoopHistogram

    n = 200_000
    lag = LoopHistogram("bench_lag", "", LAG_BUCKETS, registry=None)
    histogram = Histogram("bench_h", "", buckets=LAG_BUCKETS, registry=CollectorRegistry())
    return tuple(  # type: ignore[return-value]
        min(timeit.repeat(lambda h=h: h.observe(0.003), number=n, repeat=5)) / n * 1e6 for h in (lag, histogram)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="on/off pairs (default 4)")
    parser.add_argument("--steady", type=float, default=10, help="seconds of load per run (default 10)")
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    rows = []
    with (
        deployment(workers=1, extra_env={"STREAMBRIDGE_METRICS": "true"}) as on,
        deployment(workers=1, extra_env={"STREAMBRIDGE_METRICS": "false"}) as off,
    ):
        systems = {"on": on, "off": off}
        for n in range(args.rounds):
            for mode in ("on", "off") if n % 2 == 0 else ("off", "on"):
                r = one_load(systems[mode], args.clients, args.steady, scrape=mode == "on")  # type: ignore[arg-type]
                results[mode].append(r)
                rows.append((str(n + 1), mode, r))
                print(f"round {n + 1} metrics {mode}: {r}", flush=True)
        lags = lag_observations_per_chat(on)  # type: ignore[arg-type]
    print()
    print("round | metrics | chats | chats/s | CPU per chat | TTFT p50")
    print("----- | ------- | ----: | ------: | -----------: | -------:")
    for n, mode, r in rows:
        print(
            f"{n} | {mode} | {r['chats']:.0f} | {r['chats_per_s']:.1f} | "
            f"{r['cpu_ms_per_chat']:.2f} ms | {r['ttft_p50']:.1f} ms"
        )
    median = {m: statistics.median(r["cpu_ms_per_chat"] for r in results[m]) for m in results}
    change = (median["on"] / median["off"] - 1) * 100
    print(
        f"\nmedian CPU per chat: on {median['on']:.2f} ms, off {median['off']:.2f} ms: "
        f"{change:+.1f} % with metrics on (goal: within 3 %)"
    )
    for m in results:
        each = sorted(r["cpu_ms_per_chat"] for r in results[m])
        print(f"  {m}: {', '.join(f'{x:.2f}' for x in each)} ms (spread {each[-1] - each[0]:.2f} ms)")
    print(f"  scrapes of the 'on' deployment: {sum(r['scrapes'] for r in results['on']):.0f}")
    # The direct estimate: what the calls themselves cost, free of the host's noise between runs.
    lag_us, other_us = call_costs_us()
    added = (lags * lag_us + FIXED_CALLS_PER_CHAT * other_us) / 1000
    print(
        f"metric calls per chat: {lags:.0f} delivery lag observations at {lag_us:.2f} µs, "
        f"{FIXED_CALLS_PER_CHAT} others at most {other_us:.2f} µs (timed here): {added:.3f} ms per chat, "
        f"{added / median['off'] * 100:.1f} % of the CPU per chat with metrics off"
    )


if __name__ == "__main__":
    main()
