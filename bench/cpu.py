"""CPU per chat and per token, beside the upstream's own, in one run: ``python -m bench.cpu [--quick]``.

Issue 18's figures. On two shared cores wall-clock times swing with whatever else runs; the CPU
time a process spends on a chat does not. So each scenario reads, through psutil, the CPU time
(user + system) of our processes (api, edge, the workers, Redis) and of the simulated upstream
(``streambridge fake-llm``) before and after a load from ``bench/load.py``, and reports ours per
chat and per token as a ratio to the upstream's for the same chats. The load generator's own CPU
is not counted on either side.

Scenarios (one deployment from ``bench.run.deployment``: a redis-server, api, edge, one worker):

1. steady: 40 clients, each a chat at a time, ~40-token chats 10 ms apart; our CPU per chat ÷ the
   upstream's, and the delivery lag p99 the clients saw (stream-id clock, as ``bench/load.py``);
   "lag": the same load with the upstream stamping each chunk as it writes it (``stamp=1``): the
   lag from the upstream's write to the client, which the stream-id clock (from the append) misses;
2. fixed cost: 1-token chats (``max_tokens: 1``), our CPU per chat; "relay": the loads of 1, 2 and 3 through a plain
   aiohttp proxy (``bench/proxy.py``): what one Python hop costs, beside what we cost;
3. the worker's CPU per token for a slow stream (a token every 20 ms) and a fast one (no delay);
4. a 50-chat burst: TTFT p50 added over the upstream read directly;
5. capacity: concurrent chats at 50 tokens/s that one core of our processes carries, from the CPU
   per chat-second measured at a steady concurrency, then one point verified (lag p99 ≤ 50 ms).

``--ab PATH`` runs every scenario on a second deployment whose processes import streambridge from
PATH (a git worktree of another commit, put first on ``PYTHONPATH``), alternating which goes first
each round: an A/B pair from the same run. ``--with NAME:VAR=VALUE`` does the same for this tree
under other settings (``--with c2:STREAMBRIDGE_APPEND_COALESCE_MS=2``), ``--python NAME:PATH``
for this tree's processes on another interpreter (the simulated LLM, the yardstick, stays on
this one), ``--up`` for this tree as one process (``streambridge up``: api, edge and worker
on one event loop; its CPU is shown as the api's, the worker's slow/fast figure as the whole
process's), and ``--skeleton`` for the architecture with nothing on it (``bench/skeleton.py``:
a floor under these goals for this shape, as lean as we have made it; ``--skeleton-aiohttp`` the
same with its worker on aiohttp's client: what the HTTP library costs). ``--profile DIR`` records
each of our Python processes with py-spy during each scenario (collapsed stacks, a file a process
and scenario); ``--perf DIR`` samples them with ``perf record`` and prints each one's CPU by part
(the interpreter, the kernel, uvloop, libc, Redis's own code, other extensions). With capacity,
LiteLLM's peer row follows the table (``bench/peer.py``) when its executable is given
(``--litellm PATH``) or on PATH; ``--litellm off`` leaves it out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Final

import psutil

from bench.metrics_cost import chats as count_chats
from bench.run import ScenarioFailed, deployment, load


def with_children(pid: int) -> list[psutil.Process]:
    """A process and those it started (a worker's batch lane, its multiprocessing helper)."""
    process = psutil.Process(pid)
    return [process, *process.children(recursive=True)]


def our_processes(d: dict[str, Any]) -> dict[str, list[psutil.Process]]:
    """Ours by role, and the upstream, as psutil handles kept for the deployment's life. One
    process (``streambridge up``) is counted once, as the api."""
    if d.get("one_process"):
        return {
            "api": with_children(d["api_child"].proc.pid),
            "edge": [],
            "worker": [],
            "redis": [psutil.Process(d["redis_pid"])],
            "upstream": [psutil.Process(d["llm_child"].proc.pid)],
        }
    return {
        "api": [psutil.Process(d["api_child"].proc.pid)],
        "edge": [psutil.Process(d["edge"].proc.pid)],
        "worker": [p for w in d["workers"] for p in with_children(w.proc.pid)],
        "redis": [psutil.Process(d["redis_pid"])],
        "upstream": [psutil.Process(d["llm_child"].proc.pid)],
    }


def cpu_now(procs: dict[str, list[psutil.Process]]) -> dict[str, float]:
    return cpu_and_kernel_now(procs)[0]


def _times(process: psutil.Process) -> Any:
    """Its CPU times; for a process gone (a child that exited), its last reading: it adds nothing
    more, and what it spent stays counted."""
    try:
        process.last_times = process.cpu_times()  # type: ignore[attr-defined]
    except psutil.NoSuchProcess:
        pass
    return getattr(process, "last_times", None)


def cpu_and_kernel_now(procs: dict[str, list[psutil.Process]]) -> tuple[dict[str, float], dict[str, float]]:
    """CPU by role, and its system part: syscalls, and on loopback the peer's share of each write."""
    times = {role: [t for p in ps if (t := _times(p)) is not None] for role, ps in procs.items()}
    total = {role: sum(t.user + t.system for t in ts) for role, ts in times.items()}
    return total, {role: sum(t.system for t in ts) for role, ts in times.items()}


OURS = ("api", "edge", "worker", "redis")


class Used:
    """CPU seconds by role between two readings, and the chats created meanwhile."""

    def __init__(
        self, before: dict[str, float], after: dict[str, float], chats: int, kernel: dict[str, float] | None = None
    ) -> None:
        self.by_role = {role: after[role] - before[role] for role in before}
        self.chats = max(chats, 1)
        #: the system part of ``by_role``
        self.kernel = kernel or {}

    def kernel_pct(self) -> float:
        """How much of our CPU was the kernel's (the rest is user space: Python, uvloop, hiredis, Redis)."""
        return 100 * sum(self.kernel.get(r, 0.0) for r in OURS) / max(self.ours, 1e-9)

    @property
    def ours(self) -> float:
        return sum(self.by_role[r] for r in OURS)

    def per_chat_ms(self, role: str | None = None) -> float:
        return (self.ours if role is None else self.by_role[role]) / self.chats * 1000


@contextmanager
def metered(d: dict[str, Any]) -> Iterator[list[Used]]:
    procs, out = d["procs"], []
    (before, kernel), chats_before = cpu_and_kernel_now(procs), count_chats(d["redis"])
    yield out
    after, kernel_after = cpu_and_kernel_now(procs)
    kernel = {role: spent - kernel[role] for role, spent in kernel_after.items()}
    out.append(Used(before, after, count_chats(d["redis"]) - chats_before, kernel))


def model_args(words: int, delay_ms: float, ttft_ms: float = 20) -> tuple[str, ...]:
    return ("--words", str(words), "--delay-ms", str(delay_ms), "--ttft-ms", str(ttft_ms))


def steady(d: dict[str, Any], clients: int, seconds: float, *model: str) -> tuple[Used, dict[str, Any]]:
    with metered(d) as used:
        result = load(
            "ttft", "--api", d["api"], "--chats", str(clients), "--steady", str(seconds), "--no-baselines", *model
        )
    return used[0], result


def tokens_per_chat(result: dict[str, Any]) -> float:
    return float(result["tokens"]) / max(len(result["chat_ids"]), 1)


def scenario_steady(d: dict[str, Any], seconds: float) -> dict[str, float]:
    used, result = steady(d, 40, seconds, *model_args(20, 10))
    tokens = tokens_per_chat(result)
    return {
        "ours_ms": used.per_chat_ms(),
        "upstream_ms": used.per_chat_ms("upstream"),
        "ratio": used.ours / max(used.by_role["upstream"], 1e-9),
        "per_token_us": used.per_chat_ms() / tokens * 1000,
        "tokens": tokens,
        "lag_p99": float(result["lag"]["p99"]),
        "kernel_pct": used.kernel_pct(),
        **{f"{role}_ms": used.per_chat_ms(role) for role in OURS},
    }


def scenario_lag(d: dict[str, Any], seconds: float) -> dict[str, float]:
    """The steady load with each chunk stamped by the upstream as it writes it: upstream → client lag,
    beside append → client (the stream ids' clock, which misses any wait before the append)."""
    _, result = steady(d, 40, seconds, *model_args(20, 10), "--stamp")
    upstream = result.get("upstream_lag") or {}
    return {
        "upstream_p50": float(upstream.get("p50", "nan")),
        "upstream_p99": float(upstream.get("p99", "nan")),
        "append_p99": float(result["lag"]["p99"]),
    }


#: a 1-token chat: one word is cut into 1-3 chunks by the simulated LLM; max_tokens keeps one
ONE_TOKEN: Final = (*model_args(1, 10, ttft_ms=0), "--max-tokens", "1")


def scenario_fixed(d: dict[str, Any], seconds: float) -> dict[str, float]:
    used, result = steady(d, 10, seconds, *ONE_TOKEN)
    by_role = {f"{role}_ms": used.per_chat_ms(role) for role in OURS}
    return {
        "tokens": tokens_per_chat(result),
        "ours_ms": used.per_chat_ms(),
        "upstream_ms": used.per_chat_ms("upstream"),
        "ratio": used.ours / max(used.by_role["upstream"], 1e-9),
        "kernel_pct": used.kernel_pct(),
        **by_role,
    }


def scenario_slow_fast(d: dict[str, Any], seconds: float) -> dict[str, float]:
    """Long chats, so that the worker's CPU per token is not its fixed cost per chat spread thin."""
    out = {}
    for name, delay in (("slow", 20.0), ("fast", 0.0)):
        used, result = steady(d, 20, seconds, *model_args(80, delay))
        tokens = tokens_per_chat(result) * used.chats
        worker = used.by_role["api" if d.get("one_process") else "worker"]  # one process: all of it
        out[f"{name}_us"] = worker / max(tokens, 1) * 1e6
    out["ratio"] = out["slow_us"] / out["fast_us"]
    return out


def scenario_relay(d: dict[str, Any], seconds: float) -> dict[str, float]:
    """What one Python hop costs: the same loads through the plain aiohttp proxy (``bench/proxy.py``,
    on uvloop: one process, no queue, nothing kept, no resume). Steady and 1-token chats: its CPU ÷
    the upstream's over the same load; slow and fast tokens: its CPU per token, as goal 3's worker.
    The proxy is the same in every variant of a run: its figures measure the host, not the variant."""
    procs = {"proxy": [psutil.Process(d["proxy_pid"])], "upstream": d["procs"]["upstream"]}
    via = ("ttft", "--via", f"{d['proxy']}/v1", "--steady")
    load(*via, "2", "--chats", "10", *model_args(20, 10))  # warm: its first minutes ran higher, unexplained
    out = {}
    loads = {
        "steady": (40, model_args(20, 10)),
        "fixed": (10, ONE_TOKEN),
        "slow": (20, model_args(80, 20.0)),
        "fast": (20, model_args(80, 0.0)),
    }
    for name, (clients, model) in loads.items():
        before = cpu_now(procs)
        result = load(*via, str(seconds), "--chats", str(clients), *model)
        after = cpu_now(procs)
        proxy = after["proxy"] - before["proxy"]
        if name in ("slow", "fast"):  # over every token the load relayed, warm-up included, as the CPU is
            out[f"{name}_us"] = proxy / max(float(result["all_tokens"]), 1) * 1e6
        else:
            out[f"{name}_ratio"] = proxy / max(after["upstream"] - before["upstream"], 1e-9)
    out["slow_fast"] = out["slow_us"] / out["fast_us"]
    return out


def scenario_burst(d: dict[str, Any], rounds: int) -> dict[str, float]:
    urls = ("--api", d["api"], "--llm", d["llm"], "--proxy", d["proxy"])
    t = load("ttft", *urls, "--chats", "50", "--rounds", str(rounds), *model_args(20, 10))
    return {"ttft_p50": t["streambridge_ttft"]["p50"], "direct_p50": t["direct_ttft"]["p50"]}


#: 50 tokens/s: a token every 20 ms, chats of ~100 tokens (2 s)
CAPACITY_MODEL = model_args(40, 20)


def cores_while(
    d: dict[str, Any],
    clients: int,
    seconds: float,
    *extra: str,
    model: tuple[str, ...] = CAPACITY_MODEL,
    procs: dict[str, list[psutil.Process]] | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """CPU in cores by role (``procs``, else the deployment's) while ``clients`` chats stream at once,
    sampled after the ramp (the clients' first chats start over the first second) and before the end.
    ``extra``: more of ``bench.load ttft``'s options (``--stamp``; ``--via URL`` for a peer proxy)."""
    args = ["--api", d["api"], "--chats", str(clients), "--steady", str(seconds), "--no-baselines", *model, *extra]
    gen = subprocess.Popen([sys.executable, "-m", "bench.load", "ttft", *args], stdout=subprocess.PIPE, text=True)
    procs = procs or d["procs"]
    time.sleep(3)  # warm-up chats, login, the ramp
    window = max(seconds - 3, 1)
    before, t0 = cpu_now(procs), time.perf_counter()
    time.sleep(window)
    after, t1 = cpu_now(procs), time.perf_counter()
    out, _ = gen.communicate()
    if gen.returncode != 0:
        raise ScenarioFailed(f"capacity load with {clients} clients failed")
    return {r: (after[r] - before[r]) / (t1 - t0) for r in before}, dict(json.loads(out.strip().splitlines()[-1]))


def scenario_capacity(d: dict[str, Any], seconds: float, verify: bool) -> dict[str, float]:
    probe = 20
    by_role, _ = cores_while(d, probe, seconds)
    cores = sum(by_role[r] for r in OURS)
    out = {"cpu_per_chat_s_ms": cores / probe * 1000, "chats_per_core": probe / cores}
    if verify:
        # the derived count may not fit beside the load generator and upstream on 2 shared cores
        point = min(int(out["chats_per_core"]), 150)
        by_role, result = cores_while(d, point, seconds)
        cores_at = sum(by_role[r] for r in OURS)
        out |= {"verified_at": point, "verified_cores": cores_at, "verified_lag_p99": float(result["lag"]["p99"])}
    return out


@contextmanager
def profiled(d: dict[str, Any], directory: str | None, label: str) -> Iterator[None]:
    if directory is None:
        yield
        return
    os.makedirs(directory, exist_ok=True)
    spies = [
        subprocess.Popen(
            [
                os.path.join(os.path.dirname(sys.executable), "py-spy"),
                "record",
                "--nonblocking",
                "-r",
                "200",
                "-f",
                "raw",
                "-p",
                str(p.pid),
                "-o",
                f"{directory}/{label}-{role}{f'-{n}' if n else ''}.txt",  # -1, -2: what it started
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for role in ("api", "edge", "worker")
        for n, p in enumerate(d["procs"][role])
    ]
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(2)  # SIGINT: py-spy writes its file
            spy.wait(30)


#: what ``perf`` samples fall in, by shared object: the interpreter, the kernel, and the rest
_PARTS = (
    ("python", ("libpython", "python3")),
    ("kernel", ("[kernel",)),
    ("uvloop", ("loop.cpython",)),
    ("libc", ("libc.so", "libm.so", "ld-linux")),
    ("redis-server", ("redis-server", "redis-check")),
)


@contextmanager
def perf_split(d: dict[str, Any], directory: str | None, label: str) -> Iterator[None]:
    """``perf record`` of our processes (sampling by the clock: unbiased, where py-spy loses frames
    entered from C callbacks) while the scenario runs; then each process's CPU by part (``_PARTS``)."""
    if directory is None:
        yield
        return
    os.makedirs(directory, exist_ok=True)
    processes = {p.pid: role for role in OURS for p in d["procs"][role]}
    roles = dict(processes)  # perf's "pid" is the thread's id: each thread of ours, by its process's role
    for process in (p for role in OURS for p in d["procs"][role]):
        with contextlib.suppress(psutil.NoSuchProcess):
            roles |= {thread.id: processes[process.pid] for thread in process.threads()}
    data = f"{directory}/{label}.perf.data"
    with tempfile.TemporaryFile() as errors:
        recorder = subprocess.Popen(
            ["perf", "record", "-q", "-F", "499", "-p", ",".join(map(str, processes)), "-o", data],
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
        try:
            yield
        finally:
            recorder.send_signal(2)
            recorder.wait(60)
            errors.seek(0)
            said = errors.read().decode(errors="replace").strip()
    report = subprocess.run(
        ["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "pid,dso", "-g", "none"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    shares: dict[str, dict[str, float]] = {}
    for line in report.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+(\d+):\S+\s+(\S+)", line)
        if match is None or int(match[2]) not in roles:
            continue
        part = next((name for name, marks in _PARTS if any(m in match[3] for m in marks)), "extensions")
        role = shares.setdefault(roles[int(match[2])], {})
        role[part] = role.get(part, 0.0) + float(match[1])
    if not shares:
        print(f"perf {label}: no samples of ours ({said or 'perf said nothing'})", file=sys.stderr, flush=True)
    for role, parts in shares.items():
        total = sum(parts.values()) or 1.0
        split = ", ".join(f"{part} {100 * v / total:.0f} %" for part, v in sorted(parts.items(), key=lambda kv: -kv[1]))
        print(f"perf {label} {role} ({total:.0f} % of samples): {split}", file=sys.stderr, flush=True)


SCENARIOS = ("steady", "lag", "fixed", "relay", "slow_fast", "burst", "capacity")


def one_round(
    d: dict[str, Any],
    quick: bool,
    profile: str | None,
    label: str,
    only: tuple[str, ...] = SCENARIOS,
    perf: str | None = None,
) -> dict[str, dict[str, float]]:
    seconds = 5.0 if quick else 12.0
    run = {
        "steady": lambda: scenario_steady(d, seconds),
        "lag": lambda: scenario_lag(d, seconds),
        "fixed": lambda: scenario_fixed(d, seconds),
        "relay": lambda: scenario_relay(d, seconds),
        "slow_fast": lambda: scenario_slow_fast(d, seconds),
        "burst": lambda: scenario_burst(d, 1 if quick else 3),
        "capacity": lambda: scenario_capacity(d, 8 if quick else 15, verify=not quick),
    }
    out = {}
    for name in only:
        with profiled(d, profile, f"{label}-{name}"), perf_split(d, perf, f"{label}-{name}"):
            out[name] = run[name]()
    return out


def median_of(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {s: {k: statistics.median(r[s][k] for r in rounds) for k in rounds[0][s]} for s in rounds[0]}


def rows(r: dict[str, dict[str, float]]) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    if s := r.get("steady"):
        split = ", ".join(f"{role} {s[f'{role}_ms']:.2f}" for role in OURS)
        ratio = f"the upstream's {s['upstream_ms']:.2f} ms (goal ≤ 2.0×)"
        value = f"{s['ours_ms']:.2f} ms, {s['ratio']:.2f}× ({s['per_token_us']:.0f} µs/token)"
        out.append(("1. steady: our CPU per chat", value, ratio))
        note = f"{s['tokens']:.0f} tokens a chat; {s.get('kernel_pct', float('nan')):.0f} % in the kernel"
        out.append(("   by process (ms per chat)", split, note))
        out.append(("   delivery lag p99", f"{s['lag_p99']:.1f} ms", "goal ≤ 10 ms"))
    if lag := r.get("lag"):
        values = f"p50 {lag['upstream_p50']:.1f} / p99 {lag['upstream_p99']:.1f} ms"
        out.append(("   upstream → client lag", values, f"append → client p99 {lag['append_p99']:.1f} ms"))
    if f := r.get("fixed"):
        note = f"goal ≤ 1.5 ms; upstream {f['upstream_ms']:.2f} ms; {f.get('tokens', float('nan')):.1f} tokens a chat"
        value = f"{f['ours_ms']:.2f} ms, {f['ratio']:.2f}×"
        out.append(("2. fixed cost: 1-token chat", value, note))
        split = ", ".join(f"{role} {f[f'{role}_ms']:.2f}" for role in OURS)
        out.append(("   by process (ms per chat)", split, f"{f.get('kernel_pct', float('nan')):.0f} % in the kernel"))
    if relay := r.get("relay"):
        values = f"{relay['steady_ratio']:.2f}× / {relay['fixed_ratio']:.2f}× the upstream"
        note = "steady / 1-token chats: one Python hop"  # (the proxy of this variant's deployment)
        out.append(("   a plain aiohttp relay, one hop", values, note))
        values = f"{relay['slow_us']:.0f} / {relay['fast_us']:.0f} µs ({relay['slow_fast']:.2f}×)"
        out.append(("   its CPU per token, slow/fast", values, "as 3.: what a lone token costs a bare hop"))
    if sf := r.get("slow_fast"):
        values = f"{sf['slow_us']:.0f} / {sf['fast_us']:.0f} µs ({sf['ratio']:.2f}×)"
        out.append(("3. worker CPU per token, slow/fast", values, "goal ≤ 2×"))
    if b := r.get("burst"):
        added = f"+{b['ttft_p50'] - b['direct_p50']:.1f} ms over direct {b['direct_p50']:.1f} ms"
        out.append(("4. burst of 50: TTFT p50", f"{b['ttft_p50']:.1f} ms", added))
    if c := r.get("capacity"):
        per = f"{c['cpu_per_chat_s_ms']:.1f} ms CPU per chat-second"
        out.append(("5. capacity at 50 tokens/s", f"{c['chats_per_core']:.0f} chats per core", per))
        out.append(("   (20 clients ÷ their cores)", "", "bench/peer.py's table: chats streaming, lag-checked"))
        if "verified_at" in c:
            at = f"{c['verified_at']:.0f} chats: {c['verified_cores']:.2f} cores"
            out.append(("   verified", at, f"lag p99 {c['verified_lag_p99']:.1f} ms (goal ≤ 50 ms)"))
    return out


def print_table(columns: dict[str, dict[str, dict[str, float]]]) -> None:
    names = list(columns)
    table = [rows(columns[n]) for n in names]
    header = ["measure", *(f"{n}" for n in names), "note (" + names[-1] + ")"]
    lines = [[table[0][i][0], *(t[i][1] for t in table), table[-1][i][2]] for i in range(len(table[0]))]
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]
    for line in [header, ["-" * w for w in widths], *lines]:
        print(" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))


def variants_of(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Each deployment's name and environment, and the interpreter of those not on this one."""
    variants: dict[str, dict[str, str]] = {"this": {}}
    variants |= {os.path.basename(path.rstrip("/")): {"PYTHONPATH": path} for path in args.ab}
    flagged = {
        "up": (args.up, {}),
        "skeleton": (args.skeleton, {}),
        "skeleton-aiohttp": (args.skeleton_aiohttp, {"BENCH_SKELETON_LLM": "aiohttp"}),
    }
    variants |= {name: env for name, (on, env) in flagged.items() if on}
    pythons: dict[str, str] = {}

    def named(option: str, spec: str) -> tuple[str, str]:
        name, colon, rest = spec.partition(":")
        if not (name and colon and rest):
            wanted = "PATH" if option == "--python" else "VAR=VALUE[,VAR=VALUE]"
            parser.error(f"{option} {spec}: expected NAME:{wanted}")
        if name in variants:
            parser.error(f"{option} {spec}: {name} names another variant already")
        return name, rest

    for spec in args.python:
        name, path = named("--python", spec)
        found = shutil.which(path)
        if found is None:
            parser.error(f"--python {spec}: {path} is not an executable")
        variants[name], pythons[name] = {}, found
    for spec in args.settings:
        name, pairs = named("--with", spec)
        if not all("=" in pair for pair in pairs.split(",")):
            parser.error(f"--with {spec}: expected NAME:VAR=VALUE[,VAR=VALUE]")
        variants[name] = dict(pair.split("=", 1) for pair in pairs.split(","))
    for path in args.ab:
        if not os.path.isdir(os.path.join(path, "workers")):
            parser.error(f"--ab {path}: not a streambridge tree (no workers/ in it)")
    return variants, pythons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short loads, one burst, no verified capacity point")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--ab",
        metavar="PATH",
        action="append",
        default=[],
        help="also run streambridge from PATH (a worktree), in turn",
    )
    parser.add_argument(
        "--with",
        dest="settings",
        metavar="NAME:VAR=VALUE[,VAR=VALUE]",
        action="append",
        default=[],
        help="also run this tree with these settings, as NAME, in turn (e.g. c2:STREAMBRIDGE_APPEND_COALESCE_MS=2)",
    )
    parser.add_argument(
        "--up", action="store_true", help="also run this tree as one process (streambridge up), as 'up', in turn"
    )
    parser.add_argument(
        "--skeleton",
        action="store_true",
        help="also run the architecture with nothing on it (bench/skeleton.py), as 'skeleton', in turn",
    )
    parser.add_argument(
        "--skeleton-aiohttp",
        action="store_true",
        help="also run the skeleton with its worker on aiohttp's client, as 'skeleton-aiohttp', in turn",
    )
    parser.add_argument(
        "--python",
        metavar="NAME:PATH",
        action="append",
        default=[],
        help="also run this tree's processes on another interpreter (a venv's python with .[bench]), as NAME",
    )
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"some of {','.join(SCENARIOS)}")
    parser.add_argument("--profile", metavar="DIR", help="py-spy our processes, each scenario")
    parser.add_argument("--perf", metavar="DIR", help="perf-record our processes, each scenario: CPU by part")
    parser.add_argument(
        "--litellm",
        metavar="PATH|off",
        help="capacity: a LiteLLM peer row (bench/peer.py) with this executable; default litellm on PATH, if any",
    )
    args = parser.parse_args()
    if args.perf and shutil.which("perf") is None:
        parser.error("--perf needs perf on PATH (Debian: linux-perf)")
    only = tuple(args.only.split(","))
    if unknown := set(only) - set(SCENARIOS):
        parser.error(f"--only: no scenario {', '.join(sorted(unknown))} (there are {', '.join(SCENARIOS)})")
    variants, pythons = variants_of(args, parser)
    results: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in variants}
    with ExitStack() as stack:
        systems = {
            name: stack.enter_context(
                deployment(
                    1,
                    extra_env=env,
                    one_process=name == "up",
                    skeleton=name in ("skeleton", "skeleton-aiohttp"),
                    python=pythons.get(name, sys.executable),
                )
            )
            for name, env in variants.items()
        }
        for d in systems.values():
            d["procs"] = our_processes(d)
        order = list(systems)
        for n in range(args.rounds):
            for name in order[n % len(order) :] + order[: n % len(order)]:  # each goes first in turn
                label = f"{name}{n + 1}"
                results[name].append(one_round(systems[name], args.quick, args.profile, label, only, args.perf))
                print(f"round {n + 1} {name}: {results[name][-1]}", file=sys.stderr, flush=True)
        print_table({name: median_of(r) for name, r in results.items()})
        if "capacity" in only and args.litellm != "off":
            from bench import peer  # not at the top: it imports this module

            peer.report(systems["this"], args.litellm, 8 if args.quick else 15, verify=not args.quick)
    if len(results) > 1 and "steady" in only:
        for name in results:
            each = ", ".join(f"{r['steady']['ours_ms']:.2f}" for r in results[name])
            print(f"steady CPU per chat, {name}, each round: {each} ms")


if __name__ == "__main__":
    try:
        main()
    except (ScenarioFailed, RuntimeError) as exc:  # a load or a process that failed: one line, not a traceback
        sys.exit(f"bench.cpu: {exc}")
