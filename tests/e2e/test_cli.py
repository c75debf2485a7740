"""The CLI's promises: ``up`` runs everything from nothing, ``chat`` streams an answer, every
command exits 0 after SIGTERM, and a bad setting is one line naming it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from streambridge.fake_llm import DEFAULT_CONFIG, expected_reasoning, expected_text, expected_tool_call
from tests.e2e.conftest import Process, System, clean_env, create_chat, login, start_together, stop_all

pytestmark = pytest.mark.e2e


def streambridge(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streambridge", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """``streambridge up`` with nothing configured: embedded Redis and the simulated LLM."""
    # a 1 s grace: a test leaves a chat running (its client was stopped), which held the stop 10 s; none measures it
    env = clean_env(STREAMBRIDGE_SHUTDOWN_GRACE="1")
    process = Process(["up", "--port", "0"], env, tmp_path_factory.mktemp("up"))
    yield process
    assert process.stop() == 0


def test_up_with_nothing_configured_answers_streambridge_chat(up: Process) -> None:
    result = streambridge("chat", "hello", "--url", up.url, env=clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_text("hello", DEFAULT_CONFIG.words) + "\n"
    log = up.log_path.read_text()
    assert "embedded Redis" in log
    assert "simulated LLM" in log


def test_chat_prints_a_tool_call_as_such_and_the_reasoning_apart_from_it(up: Process) -> None:
    model = "fake?reasoning=5&tool=get_weather"
    result = streambridge("chat", "weather in Paris?", "--url", up.url, "--model", model, env=clean_env())
    assert result.returncode == 0, result.stderr
    arguments = expected_tool_call("weather in Paris?", "get_weather").function.arguments
    assert result.stdout == f"tool call: get_weather({arguments})\n"
    assert result.stderr == f"reasoning: {expected_reasoning('weather in Paris?', 5)}\n"


def test_chat_exits_non_zero_when_the_chat_fails(up: Process) -> None:
    result = streambridge("chat", "hello", "--url", up.url, "--model", "fake?fail=401", env=clean_env())
    assert result.returncode == 1
    assert "failed after 1 attempt" in result.stderr


def test_chat_against_nothing_is_one_clear_line() -> None:
    result = streambridge("chat", "hello", "--url", "http://127.0.0.1:9", env=clean_env())
    assert result.returncode == 1
    assert result.stderr.startswith("streambridge chat:")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"STREAMBRIDGE_REDIS_URL": "http://nope"}, "STREAMBRIDGE_REDIS_URL"),
        ({"STREAMBRIDGE_WORKER_CONCURRENCY": "lots"}, "STREAMBRIDGE_WORKER_CONCURRENCY"),
        ({"STREAMBRIDGE_SPEED": "fast"}, "STREAMBRIDGE_SPEED"),
    ],
)
@pytest.mark.parametrize("command", [["up"], ["api"], ["edge"], ["worker"]])
def test_a_bad_setting_stops_every_server_with_one_line_naming_it(
    command: list[str], env: dict[str, str], variable: str
) -> None:
    result = streambridge(*command, env=clean_env(**env), timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"streambridge: {variable}:")


@pytest.mark.parametrize("command", [["api"], ["edge"], ["worker"]])
def test_standalone_servers_need_a_redis_url(command: list[str]) -> None:
    result = streambridge(*command, env=clean_env(), timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"streambridge: STREAMBRIDGE_REDIS_URL: required by `streambridge {command[0]}` (only `up` embeds Redis)"
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_every_server_command_exits_0_after_a_signal(system: System, tmp_path: Path, sig: signal.Signals) -> None:
    processes = start_together(  # side by side; each is signalled once it says it is ready
        *(
            Process(args, system.env, tmp_path, ready=ready, wait=False)
            for args, ready in [
                (["api", "--port", "0"], "listening on"),
                (["edge", "--port", "0"], "listening on"),
                (["worker"], "worker started"),
                (["fake-llm", "--port", "0"], "listening on"),
            ]
        )
    )
    try:
        for process in processes:
            process.proc.send_signal(sig)
        for process in processes:
            assert process.proc.wait(20) == 0, f"{process.args[0]}: {process.log_path.read_text()}"
    finally:
        stop_all(processes)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fake-llm", "--fail", "bogus"], "streambridge: fake-llm: fail must be"),
        (["fake-llm", "--words", "-1"], "streambridge: fake-llm:"),
        (["api", "--port", "70000"], "is not a port"),
        (["chat", "hi", "--url", "notaurl"], "streambridge chat: --url 'notaurl' is not an http(s) URL"),
    ],
)
def test_bad_flags_are_one_line_not_a_traceback(args: list[str], message: str) -> None:
    result = streambridge(*args, env=clean_env(STREAMBRIDGE_REDIS_URL="redis://127.0.0.1:1/0"), timeout=30)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_chat_exits_0_on_sigterm_mid_stream(up: Process) -> None:
    chat = subprocess.Popen(
        [sys.executable, "-m", "streambridge", "chat", "a long one", "--url", up.url, "--model", "fake?words=400"],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    chat.send_signal(signal.SIGTERM)
    _, err = chat.communicate(timeout=20)
    assert chat.returncode == 0, err
    assert "Traceback" not in err


def test_an_edge_told_to_stop_ends_its_open_streams_at_once(system: System) -> None:
    edge = system.start_edge()

    async def hold_a_stream_open_then_stop_the_edge() -> float:
        async with aiohttp.ClientSession() as session:
            auth = await login(session, system.api.url)
            chat = await create_chat(session, system.api.url, auth, message="long", model="fake?words=2000")
            async with session.get(f"{edge.url}/v1/chats/{chat['id']}/events", headers=auth) as response:
                await response.content.readany()
                started = time.monotonic()
                edge.proc.send_signal(signal.SIGTERM)
                async for _ in response.content.iter_any():
                    pass  # the edge ends the response (no terminal event: the client would resume)
                return time.monotonic() - started

    try:
        took = asyncio.run(hold_a_stream_open_then_stop_the_edge())
        assert edge.proc.wait(10) == 0
    finally:
        edge.stop()
    assert took < 5, f"the edge kept the stream open {took:.1f} s after SIGTERM"
