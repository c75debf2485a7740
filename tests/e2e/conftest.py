"""Real processes, started through the CLI exactly as an operator would, on a redis-server of our own."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streambridge.embedded import free_port
from streambridge.sse import SSEMessage, SSEParser
from tests.conftest import OwnRedis

#: how long a process may take to say it is ready, from its start; several start at once on a loaded 2-core machine
READY_WITHIN = 60
LISTENING = re.compile(r"listening on (http://\S+)")
E2E_ENV = {
    "STREAMBRIDGE_HEARTBEAT_INTERVAL": "1",
    "STREAMBRIDGE_RETRY_BASE_DELAY": "0.05",
    "STREAMBRIDGE_LOG_LEVEL": "INFO",
    # a stop says "not ready" for no time: no load balancer here; the drain has a test of its own
    "STREAMBRIDGE_SHUTDOWN_DRAIN": "0",
    # several workers on this one machine: each serves /metrics on a free port of its own
    "STREAMBRIDGE_WORKER_METRICS_PORT": "0",
    # these suites run many chats as one visitor from one address; the limits have suites of their own
    "STREAMBRIDGE_VISITOR_CHATS_PER_MINUTE": "100000",
    "STREAMBRIDGE_VISITOR_MAX_RUNNING_CHATS": "100000",
    "STREAMBRIDGE_VISITOR_MAX_OPEN_STREAMS": "100000",
    "STREAMBRIDGE_VISITOR_LOGINS_PER_MINUTE": "100000",
}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBRIDGE_") and k != "OPENAI_API_KEY"}
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **E2E_ENV, **extra}


class Process:
    """``streambridge ARGS`` as a child process; ``url`` is where it said it listens."""

    def __init__(
        self, args: list[str], env: dict[str, str], logs: Path, ready: str = "listening on", *, wait: bool = True
    ) -> None:
        """Starts the process and, unless ``wait=False``, waits for its ready line (see ``start_together``)."""
        self.args = args
        self.log_path = logs / f"{args[0]}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streambridge", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.url = ""
        self.ready = False
        self.stdout: list[str] = []
        found = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.stdout.append(line)
                if ready in line:
                    match = LISTENING.search(line)
                    self.url = match.group(1) if match else ""
                    self.ready = True
                    found.set()
            found.set()  # it exited without saying it is ready: no need to wait out the deadline

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        self._found = found
        self._deadline = time.monotonic() + READY_WITHIN
        if wait:
            self.wait_ready()

    def wait_ready(self) -> Process:
        """Blocks until the ready line; a process that never says it stops, and the test errs with its log."""
        if not self._found.wait(max(0.0, self._deadline - time.monotonic())) or not self.ready:
            self.stop()
            raise RuntimeError(f"streambridge {' '.join(self.args)} did not start:\n{self.log_path.read_text()}")
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.stop()

    def terminate(self) -> None:
        """SIGTERM without waiting: ``stop()`` waits. ``stop_all`` stops several at once this way."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode


def start_together(*processes: Process) -> list[Process]:
    """Waits for the ready lines of processes started with ``wait=False``: they boot side by side
    (most of a start is Python importing), so this takes about as long as the slowest, not the sum.
    If one does not start, all of them are stopped."""
    try:
        for process in processes:
            process.wait_ready()
    except BaseException:
        stop_all(processes)
        raise
    return list(processes)


def stop_all(processes: Iterable[Process]) -> None:
    """SIGTERM to each, then waits for each: they shut down side by side, not one after another."""
    processes = list(processes)
    for process in processes:
        process.terminate()
    for process in processes:
        process.stop()


def fake_llm(logs: Path, *options: str) -> tuple[Process, str]:
    """``streambridge fake-llm OPTIONS``, not waited for, and its base URL (``.../v1``) for the others' env:
    its port is picked beforehand, so the processes that call it can start beside it."""
    port = free_port()
    llm = Process(["fake-llm", "--port", str(port), *options], clean_env(), logs, wait=False)
    return llm, f"http://127.0.0.1:{port}/v1"


@dataclass
class System:
    redis_url: str
    llm_url: str
    api: Process
    edges: list[Process]
    workers: list[Process]
    env: dict[str, str]
    logs: Path

    def start_edge(self, **settings: str) -> Process:
        return Process(["edge", "--port", "0"], {**self.env, **settings}, self.logs)


@pytest.fixture(scope="module")
def system() -> Iterator[System]:
    """redis-server, fake-llm, api, two edges and two workers, each its own process."""
    redis = OwnRedis()
    logs = Path(tempfile.mkdtemp(prefix="sb-e2e-"))
    started: list[Process] = []
    edges: list[Process] = []
    workers: list[Process] = []
    try:
        llm, llm_url = fake_llm(logs, "--ttft-ms", "20", "--delay-ms", "5")
        started.append(llm)
        env = clean_env(STREAMBRIDGE_REDIS_URL=redis.url(0), STREAMBRIDGE_LLM_BASE_URL=llm_url)
        edges += [Process(["edge", "--port", "0"], env, logs, wait=False) for _ in range(2)]
        started += edges
        # a chat a test leaves running holds its worker's stop for the grace (10 s): these stop at the module's
        # end, where no test measures it (tests that do start workers of their own, from ``env``)
        worker_env = {**env, "STREAMBRIDGE_SHUTDOWN_GRACE": "1"}
        workers += [Process(["worker"], worker_env, logs, ready="worker started", wait=False) for _ in range(2)]
        started += workers
        edges[0].wait_ready()  # the api's env names it
        api = Process(["api", "--port", "0"], {**env, "STREAMBRIDGE_PUBLIC_EDGE_URL": edges[0].url}, logs, wait=False)
        started.append(api)
        start_together(*started)
        yield System(redis.url(0), llm_url, api, edges, workers, env, logs)
    finally:
        # with the processes a test put in place of one it killed (in the lists the System holds)
        replacements = [p for p in [*edges, *workers] if p not in started]
        stop_all([*reversed(started), *replacements])
        redis.stop()


async def login(session: aiohttp.ClientSession, api: str) -> dict[str, str]:
    async with session.post(f"{api}/v1/auth/visitor") as response:
        assert response.status == 201
        token = (await response.json())["token"]
    return {"Authorization": f"Bearer {token}"}


async def create_chat(session: aiohttp.ClientSession, api: str, auth: dict[str, str], **body: object) -> dict[str, str]:
    async with session.post(f"{api}/v1/chats", json=body, headers=auth) as response:
        assert response.status == 202, await response.text()
        return dict(await response.json())


async def read_events(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str] | None = None,
    *,
    limit: int | None = None,
) -> list[SSEMessage]:
    """Events (not comments) from one connection; stops after ``limit`` of them, dropping the connection."""
    parser = SSEParser()
    messages: list[SSEMessage] = []
    async with session.get(url, headers=headers) as response:
        assert response.status == 200, await response.text()
        async for chunk in response.content.iter_any():
            messages += parser.feed(chunk)
            if limit is not None and len(messages) >= limit:
                return messages[:limit]
    return messages


def metrics_url(process: Process) -> str:
    """Where a worker said it serves /metrics (``streambridge worker metrics listening on …``)."""
    for line in process.stdout:
        if "worker metrics listening on" in line:
            match = LISTENING.search(line)
            assert match is not None
            return match.group(1)
    raise AssertionError(f"the worker announced no metrics port: {process.stdout}")


async def scrape(session: aiohttp.ClientSession, base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with session.get(f"{base}/metrics") as response:
        assert response.status == 200, await response.text()
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
