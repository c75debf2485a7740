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

from bench.cpu import CAPACITY_MODEL, OURS, cores_while, median_of, model_args, our_processes
from bench.load import fake_model
from bench.run import deployment
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
    if option:
        return option if os.access(option, os.X_OK) else shutil.which(option)
    return shutil.which("litellm")


def litellm_version(executable: str) -> str:
    """From the Python beside the executable (its venv's): ``litellm --version`` imports the proxy, seconds."""
    python = Path(executable).parent / "python"
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
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
) -> Iterator[tuple[str, list[psutil.Process]]]:
    """A LiteLLM proxy on a free port: its OpenAI base (.../v1), and its process with its children."""
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
            main = psutil.Process(proc.pid)
            yield f"http://127.0.0.1:{port}/v1", [main, *main.children(recursive=True)]
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


def measured(cores: dict[str, float], clients: int, seconds: float, result: dict[str, Any]) -> dict[str, float]:
    """One load's figures: ``cores`` by side (``proxy``: ours or LiteLLM's; ``upstream``)."""
    lag = result.get("upstream_lag") or {"n": 0}
    ttft = result.get("ttft") or result["streambridge_ttft"]
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
    """Chats per core from the CPU at ``probe`` clients, per chat streaming at 50 tokens/s (``bench.cpu``'s
    divides by the clients, their gaps between chats included: ~5% more for ours); with ``verify`` the lag
    p99 at that many clients, and if it misses the goal at up to two smaller counts (7 in 10): the largest
    that meets it."""
    at = run(probe)
    streaming = max(at["streaming"], 1e-9)
    out = at | {
        "chats_per_core": streaming / max(at["cores"], 1e-9),
        "cpu_per_chat_s_ms": at["cores"] / streaming * 1e3,
    }
    if not verify:
        return out
    point = min(int(out["chats_per_core"]), 150)  # what fits beside the load generator on 2 shared cores
    for _ in range(3):
        at = run(point)
        out |= {"verified_at": point, "verified_cores": at["cores"], "verified_lag_p99": at["lag_p99"]}
        out["verified_tokens_per_s"] = at["tokens_per_s"]
        if at["lag_p99"] <= LAG_GOAL_MS or point <= 1:
            break
        point = max(int(point * 0.7), 1)
    return out


def compare(
    d: dict[str, Any], executable: str, seconds: float, verify: bool, probe: int = 10, lean: bool = False
) -> dict[str, dict[str, float]]:
    """Ours and LiteLLM's capacity, from the same stamped chats at ``probe`` clients (LiteLLM's one process
    nears a core at 20 on the 2-core test host, and its clients there get half the tokens a second); its
    steady CPU per chat."""

    def ours(clients: int) -> dict[str, float]:
        by_role, result = cores_while(d, clients, seconds, "--stamp")
        cores = {"proxy": sum(by_role[r] for r in OURS), "upstream": by_role["upstream"]}
        return measured(cores, clients, seconds, result)

    out = {"streambridge": capacity(ours, probe, verify)}
    names = [model_name(CAPACITY_MODEL, True), model_name(STEADY_MODEL, False)]
    with litellm_proxy(executable, d["llm"], names, lean) as (base, procs):
        roles = {"proxy": procs, "upstream": d["procs"]["upstream"]}
        via = ("--via", base, "--key", KEY)

        def litellm(clients: int) -> dict[str, float]:
            cores, result = cores_while(d, clients, seconds, "--stamp", *via, procs=roles)
            return measured(cores, clients, seconds, result)

        out["litellm"] = capacity(litellm, probe, verify)
        # goal 1's shape: CPU per chat from cores ÷ chats a second, the upstream's over the same window
        cores, result = cores_while(d, 40, seconds, *via, model=STEADY_MODEL, procs=roles)
        rate = max(float(result["chats_per_s"]), 1e-9)
        out["litellm"] |= {
            "steady_ms": cores["proxy"] / rate * 1000,
            "steady_upstream_ms": cores["upstream"] / rate * 1000,
            "steady_ratio": cores["proxy"] / max(cores["upstream"], 1e-9),
        }
    return out


def rows(r: dict[str, float]) -> list[str]:
    out = [
        f"{r['chats_per_core']:.0f} chats per core",
        f"{r['cpu_per_chat_s_ms']:.1f} ms",
        f"{r['cores']:.2f} cores (upstream {r['upstream_cores']:.2f})",
        f"{r['tokens_per_s']:.0f} tokens/s, lag p99 {r['lag_p99']:.1f} ms",
        f"{r['ttft_p50']:.0f} / {r['ttft_p99']:.0f} ms",
    ]
    if "verified_at" in r:
        met = "meets" if r["verified_lag_p99"] <= LAG_GOAL_MS else "misses"
        out.append(f"{r['verified_at']:.0f} chats: lag p99 {r['verified_lag_p99']:.1f} ms ({met} ≤ 50)")
        out.append(f"{r['verified_cores']:.2f} cores, {r['verified_tokens_per_s']:.0f} tokens/s a client")
    return out


def print_table(r: dict[str, dict[str, float]], version: str) -> None:
    probe = f"{r['streambridge']['clients']:.0f}"
    names = [
        "capacity at 50 tokens/s",
        "CPU per chat-second",
        f"at {probe} clients: CPU",
        f"at {probe} clients: a client got",
        f"at {probe} clients: TTFT p50 / p99",
    ]
    names += ["verified (upstream → client)", "   at that count"] if "verified_at" in r["litellm"] else []
    lines = [list(t) for t in zip(names, rows(r["streambridge"]), rows(r["litellm"]), strict=True)]
    peer = r["litellm"]
    ratio = f"{peer['steady_ms']:.2f} ms ({peer['steady_ratio']:.1f}× the upstream's {peer['steady_upstream_ms']:.2f})"
    lines.append(["steady: CPU per chat", "bench.cpu's row 1", ratio])
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
    """The peer table (medians of ``rounds``: on shared cores one round swings), or the line that says why not."""
    executable = find_litellm(option)
    if executable is None:
        print("LiteLLM peer row skipped: no litellm executable (--litellm PATH, or litellm on PATH)")
        return
    results = []
    for n in range(rounds):
        results.append(compare(d, executable, seconds, verify, probe, lean))
        print(f"LiteLLM peer, round {n + 1}: {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    print_table(median_of(results), litellm_version(executable) + (" (--lean)" if lean else ""))
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
