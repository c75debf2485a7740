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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from streambridge.sse import SSEMessage, SSEParser
from tests.conftest import OwnRedis

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

    def __init__(self, args: list[str], env: dict[str, str], logs: Path, ready: str = "listening on") -> None:
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
        self.stdout: list[str] = []
        found = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.stdout.append(line)
                if ready in line:
                    match = LISTENING.search(line)
                    self.url = match.group(1) if match else ""
                    found.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not found.wait(20):
            self.stop()
            raise RuntimeError(f"streambridge {' '.join(args)} did not start:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.stop()

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
    try:
        llm = Process(["fake-llm", "--port", "0", "--ttft-ms", "20", "--delay-ms", "5"], clean_env(), logs)
        started.append(llm)
        env = clean_env(STREAMBRIDGE_REDIS_URL=redis.url(0), STREAMBRIDGE_LLM_BASE_URL=f"{llm.url}/v1")
        edges = [Process(["edge", "--port", "0"], env, logs) for _ in range(2)]
        started += edges
        api = Process(["api", "--port", "0"], {**env, "STREAMBRIDGE_PUBLIC_EDGE_URL": edges[0].url}, logs)
        started.append(api)
        workers = [Process(["worker"], env, logs, ready="worker started") for _ in range(2)]
        started += workers
        yield System(redis.url(0), f"{llm.url}/v1", api, edges, workers, env, logs)
    finally:
        for process in reversed(started):
            process.stop()
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
