"""LiteLLM's proxy as an optional peer row for issue 18's capacity figure: ``python -m bench.peer [--quick]``.

Capacity: concurrent chats streaming 50 tokens/s that one core carries. The same deployment's
simulated LLM serves both: our processes (api, edge, worker, Redis) behind streambridge's own
API, and a LiteLLM proxy (``litellm --config``, each simulated model routed as an ``openai/…``
model) streaming ``/v1/chat/completions`` to clients that read it as an OpenAI client would
(``bench.load ttft --via``). Both loads are the same closed loops and the same chats, with the
upstream stamping each chunk as it writes it (``stamp=1``), so that the lag p99 is upstream →
client on one clock for both. CPU is read through psutil: LiteLLM's process and its children,
our processes, the upstream's, over the same window of each load. Both are probed at the same
number of clients (``--probe``, 10: LiteLLM's one process is near a core at 20 here); then, unless
``--no-verify``, each one's derived count is run to check the lag p99 ≤ 50 ms.

LiteLLM is never a dependency: ``--litellm PATH`` names its executable (a venv of its own),
else ``shutil.which("litellm")``; when neither finds it the row is skipped with a note.
``python -m bench.cpu --only capacity --litellm PATH`` prints the same table after its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from bench.cpu import CAPACITY_MODEL, OURS, cores_while, model_args, our_processes
from bench.load import fake_model
from bench.run import ScenarioFailed, deployment
from streambridge.embedded import free_port

#: the load generator's key; LiteLLM refuses to start without a master key
KEY = "sk-bench-peer"

#: the production settings LiteLLM documents (docs.litellm.ai/docs/proxy/prod): no database, so
#: no spend or error logs written; no debug logging; one uvicorn worker (its suggested CMD)
SETTINGS: dict[str, Any] = {
    "litellm_settings": {"set_verbose": False, "request_timeout": 600},
    "general_settings": {"master_key": KEY, "disable_spend_logs": True, "disable_error_logs": True},
}
ENV = {
    "LITELLM_LOG": "ERROR",  # and uvicorn's access log with it
    "LITELLM_MODE": "PRODUCTION",  # no load_dotenv
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # the bundled cost map, not one fetched at start
    "DISABLE_SCHEMA_UPDATE": "true",  # no migrations (there is no database anyway)
}

#: ``--lean``, beyond what its production page lists: a flag of the litellm module (set through
#: ``litellm_settings``) that skips the logging handlers run for each streamed chunk
LEAN = {"disable_streaming_logging": True}

#: the steady load of goal 1 (40 clients, ~41-token chats 10 ms apart), for LiteLLM's CPU per chat
STEADY_MODEL = model_args(20, 10)


def find_litellm(option: str | None) -> str | None:
    """The executable named (an error if it is not one), else ``litellm`` on PATH, else None."""
    if not option:
        return shutil.which("litellm")
    found = option if os.path.isfile(option) and os.access(option, os.X_OK) else shutil.which(option)
    if found is None:
        raise SystemExit(f"--litellm {option}: no such executable")
    return found


def litellm_version(executable: str) -> str:
    """From the Python beside the executable (its venv's): ``litellm --version`` imports the proxy, seconds."""
    python = Path(executable).resolve().parent / "python"
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired):  # installed some other way (pipx, --user): the table matters more
        return "?"
    return out.stdout.strip() or "?"


def model_name(model: tuple[str, ...], stamp: bool) -> str:
    """The name ``bench.load`` asks for with these ``model_args``: LiteLLM routes that exact name."""
    opts = dict(zip(model[::2], model[1::2], strict=True))
    return fake_model(int(opts["--words"]), float(opts["--ttft-ms"]), float(opts["--delay-ms"]), stamp)


def config(llm: str, names: list[str], lean: bool = False) -> str:
    """LiteLLM's config; JSON is YAML. Each name goes to the simulated LLM as that model."""
    params = {"api_base": f"{llm}/v1", "api_key": "fake-key"}
    models = [{"model_name": n, "litellm_params": {"model": f"openai/{n}", **params}} for n in names]
    settings = SETTINGS | {"litellm_settings": SETTINGS["litellm_settings"] | (LEAN if lean else {})}
    return json.dumps({"model_list": models, **settings}, indent=1)


@contextmanager
def litellm_proxy(
    executable: str, llm: str, names: list[str], lean: bool = False
) -> Iterator[tuple[str, psutil.Process]]:
    """A LiteLLM proxy on a free port: its OpenAI base (.../v1), and its process (read its children
    at each load: it may start some late)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "config.yaml")
        path.write_text(config(llm, names, lean))
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMBRIDGE_", "LITELLM_"))} | ENV
        args = [executable, "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
        args += ["--num_workers", "1", "--telemetry", "False"]
        with open(Path(tmp, "litellm.log"), "w") as log:
            proc = subprocess.Popen(args, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(proc, f"http://127.0.0.1:{port}/health/liveliness", Path(tmp, "litellm.log"))
            yield f"http://127.0.0.1:{port}/v1", psutil.Process(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 120) -> None:
    """Its import takes seconds to tens of seconds on a loaded host."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"litellm exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"litellm not ready after {timeout:.0f} s")


#: ≤ 50 ms: the lag p99 the capacity figure is defined with (issue 18, goal 5)
LAG_GOAL_MS = 50.0


def measured(cores: dict[str, float], result: dict[str, Any], *, clients: int, seconds: float) -> dict[str, float]:
    """One load's figures: ``cores`` by side (``proxy``: ours or LiteLLM's; ``upstream``)."""
    lag, ttft = result.get("upstream_lag"), result.get("ttft") or result.get("streambridge_ttft")
    if not lag or not ttft or "p50" not in ttft:  # nothing parsed: a figure of 0 would read as a result
        raise ScenarioFailed(f"no stamped content arrived at {clients} clients: {json.dumps(result)[:300]}")
    # one stamp a chunk; the chats that started in the load's last S - 1 seconds, each whole
    tokens_per_s = lag["n"] / max(seconds - 1, 1)
    return {
        "clients": clients,
        "cores": cores["proxy"],
        "upstream_cores": cores["upstream"],
        "lag_p99": float(lag.get("p99", "nan")),
        "ttft_p50": float(ttft["p50"]),
        "ttft_p99": float(ttft["p99"]),
        "tokens_per_s": tokens_per_s / clients,  # under 50: the time between a client's chats, a slow first token
        # chats streaming at 50 tokens/s, on average: fewer than the clients by those gaps, which differ by proxy
        "streaming": tokens_per_s / 50,
    }


def capacity(run: Callable[[int], dict[str, float]], probe: int, verify: bool) -> dict[str, float]:
    """Chats streaming at 50 tokens/s that one core carries with lag p99 ≤ 50 ms.

    First the CPU at ``probe`` clients: chats streaming there ÷ cores, the count one core would
    carry if CPU were all. With ``verify``, that many chats are run (as clients, each streaming
    for part of its time: between chats, none) and the figure is what that load shows: if its lag
    p99 holds, chats streaming ÷ cores there (nearer a core than the probe, so less of the
    processes' constant upkeep in it); if not, up to two smaller loads (7 in 10), and the figure is
    the chats streaming at the largest that holds: lag-limited, one core would carry no more."""
    at = run(probe)
    out = at | {"chats_per_core": at["streaming"] / max(at["cores"], 1e-9)}
    out["cpu_per_chat_s_ms"] = 1000 / max(out["chats_per_core"], 1e-9)
    if not verify:
        return out
    per_client = max(at["streaming"] / probe, 1e-9)  # a client's share of a chat streaming
    # what fits beside the load generator on 2 shared cores
    clients = max(1, min(round(out["chats_per_core"] / per_client), 150))
    out["asked_at"] = clients
    for tries_left in (2, 1, 0):
        at = run(clients)
        held = at["lag_p99"] <= LAG_GOAL_MS
        out |= {"verified_at": clients, "verified_cores": at["cores"], "verified_lag_p99": at["lag_p99"]}
        out |= {"verified_tokens_per_s": at["tokens_per_s"], "held": float(held)}
        if held:
            first = clients == out["asked_at"]
            out["chats_per_core"] = at["streaming"] / max(at["cores"], 1e-9) if first else at["streaming"]
            break
        if not tries_left or clients == 1:
            out["chats_per_core"] = at["streaming"]  # an upper bound: its lag missed even there
            break
        clients = max(int(clients * 0.7), 1)
    out["cpu_per_chat_s_ms"] = at["cores"] / max(at["streaming"], 1e-9) * 1000
    return out


def compare(
    d: dict[str, Any],
    executable: str,
    seconds: float,
    verify: bool,
    probe: int = 10,
    lean: bool = False,
    litellm_first: bool = False,
) -> dict[str, dict[str, float]]:
    """Ours and LiteLLM's capacity, from the same stamped chats (probed at ``probe`` clients: LiteLLM's
    one process nears a core at 20 on the 2-core test host, and its clients there get half the
    tokens a second), and both sides' CPU per chat under goal 1's steady load, measured alike."""
    names = [model_name(CAPACITY_MODEL, True), model_name(STEADY_MODEL, False)]
    out: dict[str, dict[str, float]] = {}
    with litellm_proxy(executable, d["llm"], names, lean) as (base, main):
        via = ("--via", base, "--key", KEY)

        def load(side: str, clients: int, *extra: str, model: tuple[str, ...] = CAPACITY_MODEL) -> Any:
            if side == "streambridge":
                by_role, result = cores_while(d, clients, seconds, *extra, model=model)
                return {"proxy": sum(by_role[r] for r in OURS), "upstream": by_role["upstream"]}, result
            roles = {"proxy": [main, *main.children(recursive=True)], "upstream": d["procs"]["upstream"]}
            return cores_while(d, clients, seconds, *extra, *via, model=model, procs=roles)

        for side in ("litellm", "streambridge") if litellm_first else ("streambridge", "litellm"):

            def run(clients: int, side: str = side) -> dict[str, float]:
                return measured(*load(side, clients, "--stamp"), clients=clients, seconds=seconds)

            out[side] = capacity(run, probe, verify)
            # goal 1's shape: 40 clients, ~41-token chats 10 ms apart; CPU per chat = cores ÷ chats a second
            cores, result = load(side, 40, model=STEADY_MODEL)
            rate = max(float(result["chats_per_s"]), 1e-9)
            out[side] |= {
                "steady_ms": cores["proxy"] / rate * 1000,
                "steady_ratio": cores["proxy"] / max(cores["upstream"], 1e-9),
                "steady_tokens_per_s": float(result["tokens"]) / max(seconds - 1, 1) / 40,
            }
    return out


def rows(r: dict[str, float]) -> list[str]:
    out = [f"{r['chats_per_core']:.0f} chats per core", f"{r['cpu_per_chat_s_ms']:.1f} ms"]
    if "verified_at" in r:
        if not r["held"]:
            out[0] = f"< {r['chats_per_core']:.0f} chats per core"
            how = f"lag missed at every load tried, {r['asked_at']:.0f} down to {r['verified_at']:.0f} clients"
        elif r["verified_at"] == r["asked_at"]:
            how = "held; chats ÷ cores there"
        else:
            how = f"lag-limited: missed at {r['asked_at']:.0f} clients, held at {r['verified_at']:.0f}"
        out.append(f"{r['verified_at']:.0f} clients: lag p99 {r['verified_lag_p99']:.1f} ms ({how})")
        out.append(f"{r['verified_cores']:.2f} cores, {r['verified_tokens_per_s']:.0f} tokens/s a client")
    out += [
        f"{r['cores']:.2f} cores (upstream {r['upstream_cores']:.2f})",
        f"{r['tokens_per_s']:.0f} tokens/s, lag p99 {r['lag_p99']:.1f} ms",
        f"{r['ttft_p50']:.0f} / {r['ttft_p99']:.0f} ms",
        f"{r['steady_ms']:.2f} ms, {r['steady_ratio']:.1f}× the upstream's ({r['steady_tokens_per_s']:.0f} tokens/s)",
    ]
    return out


def print_table(r: dict[str, dict[str, float]], version: str) -> None:
    probe = f"{r['streambridge']['clients']:.0f}"
    names = ["capacity at 50 tokens/s", "CPU per chat-second"]
    names += ["verified (upstream → client)", "   at that load"] if "verified_at" in r["litellm"] else []
    names += [f"at {probe} clients: CPU", f"at {probe} clients: a client got", f"at {probe} clients: TTFT p50 / p99"]
    names += ["steady, 40 clients: CPU per chat"]
    lines = [list(t) for t in zip(names, rows(r["streambridge"]), rows(r["litellm"]), strict=True)]
    header = ["peer row: same stamped chats", "streambridge", f"LiteLLM {version}"]
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]
    for line in [header, ["-" * w for w in widths], *lines]:
        print(" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))


def report(
    d: dict[str, Any],
    option: str | None,
    seconds: float,
    verify: bool,
    probe: int = 10,
    lean: bool = False,
    rounds: int = 1,
) -> None:
    """The peer table (medians of ``rounds``, each side going first in turn: on shared cores one
    round swings), or the line that says why not."""
    executable = find_litellm(option)
    if executable is None:
        print("LiteLLM peer row skipped: no litellm executable (--litellm PATH, or litellm on PATH)")
        return
    results = []
    for n in range(rounds):
        results.append(compare(d, executable, seconds, verify, probe, lean, litellm_first=n % 2 == 1))
        print(f"LiteLLM peer, round {n + 1}: {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    # each side's median round whole (lower middle): a median per figure would pair one round's
    # verdict with another's load, and print a load never run
    table = {
        side: sorted((r[side] for r in results), key=lambda x: x["chats_per_core"])[(rounds - 1) // 2]
        for side in ("streambridge", "litellm")
    }
    print_table(table, litellm_version(executable) + (" (--lean)" if lean else ""))
    if rounds > 1:
        for side in ("streambridge", "litellm"):
            each = ", ".join(f"{r[side]['chats_per_core']:.0f}" for r in results)
            print(f"chats per core, {side}, each round: {each}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--litellm", metavar="PATH", help="the litellm executable (default: litellm on PATH)")
    parser.add_argument("--quick", action="store_true", help="8 s loads (else 15 s)")
    parser.add_argument("--no-verify", action="store_true", help="no lag p99 at the derived count")
    parser.add_argument("--probe", type=int, default=10, help="clients the CPU is measured at, for both")
    parser.add_argument("--lean", action="store_true", help="LiteLLM without its per-chunk logging handlers")
    parser.add_argument("--rounds", type=int, default=1, help="medians of this many rounds")
    args = parser.parse_args()
    if args.probe < 1:
        parser.error("--probe must be at least 1")
    with deployment(1) as d:
        d["procs"] = our_processes(d)
        report(
            d,
            args.litellm,
            8 if args.quick else 15,
            verify=not args.no_verify,
            probe=args.probe,
            lean=args.lean,
            rounds=args.rounds,
        )


if __name__ == "__main__":
    main()
