"""``streambridge status`` against real processes started through the CLI: it sees every worker, API and
edge, what they run, and a SIGKILLed worker gone within seconds; the live view draws on a terminal."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from redis.asyncio import Redis

from streambridge.shared.presence import TTL
from streambridge.shared.status import Snapshot, gather_snapshot
from tests.conftest import OwnRedis
from tests.e2e.conftest import Process, System, clean_env, create_chat, login

pytestmark = pytest.mark.e2e

SLOW = "fake?words=400&delay_ms=50"  # a chat of 20 s: it is running while the test looks


def status(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streambridge", "status", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def status_json(env: dict[str, str]) -> dict[str, Any]:
    result = status("--once", "--json", env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


async def until(redis_url: str, done: Any, timeout: float = 15) -> tuple[Snapshot, float]:
    """Snapshots, as ``status`` takes them, until ``done(snapshot)``; the last one and the seconds it took."""
    redis = Redis.from_url(redis_url)
    start = time.monotonic()
    try:
        while True:
            snapshot = await gather_snapshot(redis)
            if done(snapshot) or time.monotonic() - start > timeout:
                return snapshot, time.monotonic() - start
            await asyncio.sleep(0.1)
    finally:
        await redis.aclose()


def pids(records: list[dict[str, Any]]) -> set[int]:
    return {r["pid"] for r in records}


async def test_status_once_json_sees_every_process_of_the_deployment(system: System) -> None:
    await until(system.redis_url, lambda s: len(s.workers) == 2 and len(s.servers) == 3)
    data = status_json(system.env)
    assert pids(data["workers"]) == {w.proc.pid for w in system.workers}
    edges = [s for s in data["servers"] if s["serves"] == ["edge"]]
    assert pids(edges) == {e.proc.pid for e in system.edges}
    assert {e["port"] for e in edges} == {int(e.url.rsplit(":", 1)[1]) for e in system.edges}
    apis = [s for s in data["servers"] if s["serves"] == ["api"]]
    assert pids(apis) == {system.api.proc.pid}
    for worker in data["workers"]:
        assert worker["concurrency"] == 50
        assert worker["state"] == "running"


async def test_a_running_chat_shows_on_its_worker_and_its_stream_on_its_edge(system: System) -> None:
    async with aiohttp.ClientSession() as session:
        auth = await login(session, system.api.url)
        chat = await create_chat(session, system.api.url, auth, message="a long one", model=SLOW)
        edge = system.edges[1]
        async with session.get(f"{edge.url}/v1/chats/{chat['id']}/events", headers=auth) as stream:
            assert stream.status == 200
            await stream.content.readline()  # the stream is open and flowing

            def shown(s: Snapshot) -> bool:
                on_edge = [x.open_streams for x in s.servers if x.pid == edge.proc.pid]
                return any(chat["id"] in w.chat_ids for w in s.workers) and on_edge == [1]

            await until(system.redis_url, shown)
            data = status_json(system.env)
            runner = [w for w in data["workers"] if chat["id"] in w["chat_ids"]]
            assert len(runner) == 1
            assert runner[0]["chats"] == 1
            assert runner[0]["chats_last_minute"] >= 1
            assert data["running"] >= 1
            assert data["chats_per_minute"] >= 1
            assert [x["open_streams"] for x in data["servers"] if x["pid"] == edge.proc.pid] == [1]
        async with session.post(f"{system.api.url}/v1/chats/{chat['id']}/cancel", headers=auth) as response:
            assert response.status == 202


async def test_a_sigkilled_worker_is_gone_from_the_status_within_seconds(system: System, tmp_path: Path) -> None:
    extra = Process(["worker"], system.env, tmp_path, ready="worker started")
    try:
        seen, _ = await until(system.redis_url, lambda s: extra.proc.pid in {w.pid for w in s.workers})
        assert extra.proc.pid in {w.pid for w in seen.workers}
    finally:
        extra.kill()  # SIGKILL: no goodbye, its heartbeat just stops

    after, took = await until(system.redis_url, lambda s: extra.proc.pid not in {w.pid for w in s.workers})
    assert extra.proc.pid not in {w.pid for w in after.workers}
    assert took <= TTL + 2  # the TTL, and a loaded machine's slowness (the beat, the look)
    assert pids(status_json(system.env)["workers"]) == {w.proc.pid for w in system.workers}


def stopping_written(redis_url: str, pid: int, attached: threading.Event, timeout: float = 20) -> bool:
    """Whether a heartbeat of process ``pid`` says ``stopping``, as Redis's MONITOR sees each beat go by
    (however briefly the record says so before its process withdraws it)."""
    client = redis.Redis.from_url(redis_url, socket_timeout=timeout)
    deadline = time.monotonic() + timeout
    try:
        with client.monitor() as monitor:
            attached.set()
            for command in monitor.listen():
                text = command["command"]
                if re.search(rf"pid\W+{pid}\D", text) and "stopping" in text:
                    return True
                if time.monotonic() > deadline:
                    return False
    finally:
        client.close()
    return False


async def test_an_edge_holding_a_stream_says_stopping_during_its_graceful_stop(system: System) -> None:
    edge = system.start_edge()
    try:
        async with aiohttp.ClientSession() as session:
            auth = await login(session, system.api.url)
            chat = await create_chat(session, system.api.url, auth, message="a long one", model=SLOW)
            async with session.get(f"{edge.url}/v1/chats/{chat['id']}/events", headers=auth) as stream:
                assert stream.status == 200
                await stream.content.readline()
                attached = threading.Event()
                seen = asyncio.create_task(
                    asyncio.to_thread(stopping_written, system.redis_url, edge.proc.pid, attached)
                )
                assert await asyncio.to_thread(attached.wait, 10)
                edge.proc.send_signal(signal.SIGTERM)
                assert await seen
            assert await asyncio.to_thread(edge.proc.wait, 20) == 0  # and its stop was graceful
            async with session.post(f"{system.api.url}/v1/chats/{chat['id']}/cancel", headers=auth) as response:
                assert response.status == 202
    finally:
        edge.stop()


async def test_a_stopped_up_withdraws_both_its_parts_at_once(system: System, tmp_path: Path) -> None:
    """``up`` announces its API + edge and its worker apart; a clean stop withdraws both, not waiting for a TTL."""
    own_db = system.redis_url.rsplit("/", 1)[0] + "/1"
    env = {**system.env, "STREAMBRIDGE_REDIS_URL": own_db}
    up = Process(["up", "--port", "0"], env, tmp_path)
    try:
        await until(own_db, lambda s: len(s.workers) == 1 and len(s.servers) == 1)
        data = status_json(env)
        assert data["servers"][0]["serves"] == ["api", "edge"]
        assert data["servers"][0]["pid"] == data["workers"][0]["pid"] == up.proc.pid
    finally:
        assert up.stop() == 0
    data = status_json(env)
    assert (data["workers"], data["servers"]) == ([], [])


def test_the_live_view_draws_on_a_terminal_and_ctrl_c_exits_0(system: System) -> None:
    main, child = pty.openpty()
    env = {**system.env, "COLUMNS": "160", "LINES": "50", "TERM": "xterm-256color"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streambridge", "status", "--interval", "0.2"],
        env=env,
        stdin=child,
        stdout=child,
        stderr=child,
    )
    os.close(child)
    screen = b""
    try:
        deadline = time.monotonic() + 20
        while b"api and edges (3" not in screen and time.monotonic() < deadline:
            if select.select([main], [], [], 0.5)[0]:
                screen += os.read(main, 65536)
        text = screen.decode(errors="replace")
        assert "workers (2)" in text, text
        assert "api and edges (3" in text, text
        assert "queue" in text
        assert "started/min (live workers)" in text
        assert "\x1b[" in text  # drawn for a terminal: the view redraws in place
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)


def test_the_live_view_says_redis_is_unreachable_and_ctrl_c_still_exits_0_at_once() -> None:
    main, child = pty.openpty()
    env = clean_env(STREAMBRIDGE_REDIS_URL="redis://127.0.0.1:9/0", COLUMNS="160", TERM="xterm-256color")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streambridge", "status"], env=env, stdin=child, stdout=child, stderr=child
    )
    os.close(child)
    screen = b""
    try:
        deadline = time.monotonic() + 20
        while b"trying again" not in screen and time.monotonic() < deadline:
            if select.select([main], [], [], 0.5)[0]:
                screen += os.read(main, 65536)
        assert b"cannot read the deployment from Redis" in screen, screen
        assert b"Traceback" not in screen
        proc.send_signal(signal.SIGINT)
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)


def test_json_mode_prints_one_snapshot_a_line_until_sigterm(system: System) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "streambridge", "status", "--json", "--interval", "0.2"],
        env=system.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = [read_line(proc) for _ in range(3)]
        proc.send_signal(signal.SIGTERM)
        _, errors = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, errors
    assert [len(json.loads(line)["workers"]) for line in lines] == [2, 2, 2]


def read_line(proc: subprocess.Popen[str], timeout: float = 20) -> str:
    """The next line of ``proc``'s stdout, or a failure past ``timeout`` s (never a hang)."""
    assert proc.stdout is not None
    with ThreadPoolExecutor(1) as pool:
        line = pool.submit(proc.stdout.readline)
        try:
            return line.result(timeout)
        except FuturesTimeout:
            proc.kill()  # the read ends, and so does the pool
            raise AssertionError(f"no line within {timeout} s") from None


def test_a_reader_that_leaves_early_is_no_error(system: System) -> None:
    """``status --json | head -1``: once head has its line, the pipe closes; status exits 0, silently."""
    command = f"set -o pipefail; {sys.executable} -m streambridge status --json --interval 0.1 | head -1"
    result = subprocess.run(
        ["bash", "-c", command], env=system.env, capture_output=True, text=True, timeout=60, check=False
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert len(json.loads(result.stdout)["workers"]) == 2


def test_sigterm_while_redis_does_not_answer_exits_0_at_once() -> None:
    """``status --once`` waiting on a frozen Redis (SIGSTOPped: it accepts connections, answers nothing)
    leaves at once on SIGTERM, exit 0, rather than being killed by it or waiting out the read timeout."""
    own = OwnRedis()
    proc: subprocess.Popen[str] | None = None
    try:
        os.kill(own.process.pid, signal.SIGSTOP)
        proc = subprocess.Popen(
            [sys.executable, "-m", "streambridge", "status", "--once"],
            env=clean_env(STREAMBRIDGE_REDIS_URL=own.url(0)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2)  # started, and waiting for Redis's answer (its read timeout is 5 s)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, errors = proc.communicate(timeout=20)
        assert proc.returncode == 0, errors
        assert time.monotonic() - sent < 1.5
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        os.kill(own.process.pid, signal.SIGCONT)
        own.stop()


@pytest.mark.parametrize(
    ("env", "code", "message"),
    [
        ({}, 2, "streambridge: STREAMBRIDGE_REDIS_URL: required by `streambridge status`"),
        ({"STREAMBRIDGE_REDIS_URL": "http://nope"}, 2, "streambridge: STREAMBRIDGE_REDIS_URL: malformed URL"),
        ({"STREAMBRIDGE_REDIS_URL": "redis://127.0.0.1:9/0"}, 1, "streambridge: status: cannot read the deployment"),
    ],
)
def test_status_without_a_usable_redis_is_one_line(env: dict[str, str], code: int, message: str) -> None:
    result = status("--once", env=clean_env(**env))
    assert result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(message)
